"""The OCSF and ECS mappings (agentwarden/siem.py), checked against the
published field names (tests/data/, cited there). The kernel test
test_kernel_observability.py exports a real session's archive the same way."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from agentwarden import logquery, siem
from siem_schema import ecs_problems, ocsf_problems

HEADER = SimpleNamespace(host="host1", boot_id="b00t")
NS = 1_796_000_000_123_456_789
TASK = dict(time=NS, pid=42, tid=42, ppid=7, uid=1000, gid=1000, comm="sh", cgroup_id=9, agent_cgroup_id=9,
            agent="coder", session="coder-1", verdict={"decision": "allow", "rule": "exec.allow /usr/bin/*",
                                                      "policy_hash": "sha256:ab"})


def line(record: dict, seq: int = 5) -> dict:
    attribution = logquery.Attribution()
    attribution.see({"kind": "session", "session": "coder-1", "agent": "coder", "person": "alice",
                     "task": "fix #12", "user": "coder"})
    return logquery.export_record({"seq": seq, **record}, HEADER, attribution)


CHANGES = sorted(siem.FILE_CHANGES)
SAMPLES = {
    "exec": dict(kind="exec", **TASK, syscall="execve", filename="/usr/bin/grep", exec_path="/usr/bin/grep",
                 resolved_exec_path="/usr/bin/grep", argv=["grep", "-r", "x", "."], ret=0, error=None),
    "failed exec": dict(kind="exec", **TASK, syscall="execve", filename="nope", exec_path="", argv=["nope"],
                        ret=-2, error="ENOENT"),
    "exit": dict(kind="exit", **TASK),
    "read": dict(kind="open", **TASK, syscall="openat", path="a.txt", resolved_path="/w/a.txt",
                 flags=os.O_RDONLY, ret=3, error=None),
    # Repeated opens folded in the kernel: one record for 49 of them.
    "repeated reads": dict(kind="open", **TASK, syscall="openat", path="/w/a.txt", resolved_path="/w/a.txt",
                           flags=os.O_RDONLY, ret=3, error=None, count=49, last_time=NS + 2_000_000_000),
    "write": dict(kind="open", **TASK, syscall="openat", path="b.txt", resolved_path="/w/b.txt",
                  flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC, ret=3, error=None),
    **{f"change {c}": dict(kind="change", **TASK, syscall=c, path="/w/x", path2="/w/y" if "ren" in c else "",
                           resolved_path="/w/x", ret=0, error=None) for c in CHANGES},
    "violation": dict(kind="violation", time=NS, agent="coder", pid=42, comm="curl", event="exec", event_seq=4,
                      attempted="exec curl http://x (/usr/bin/curl)", decision="violation",
                      rule=None, reason="not in exec.allow", policy_hash="sha256:ab", mode="enforce",
                      action="kill", action_taken="killed pid 42", session="coder-1"),
    **{f"hold {s}": dict(kind="hold", time=NS, hold_id="h1-ab", state=s, session="coder-1", agent="coder",
                         on_behalf_of="alice", task="fix #12", pid=42, action="exec /usr/bin/date",
                         rule='exec.hold "/usr/bin/date"', policy_hash="sha256:ab", required=1,
                         approvers=[], reason=None if s == "pending" else "ok", waited=3.5, approvals=[],
                         denial=None)
       for s in ("pending", "approval", "approved", "denied", "timed-out", "abandoned")},
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_mapped_kind_follows_ocsf_and_ecs(name):
    exported = line(SAMPLES[name])
    assert siem.mapped(exported)
    ocsf, ecs = siem.to_ocsf(exported), siem.to_ecs(exported)
    assert ocsf_problems(ocsf) == []
    assert ecs_problems(ecs) == []
    # The same event in both: time, host, attribution.
    assert ocsf["time"] == NS // 1_000_000 and ecs["@timestamp"] == "2026-11-30T00:53:20.123456789Z"
    assert ocsf["metadata"]["product"] == {"name": "agentwarden", "vendor_name": "agentwarden",
                                           "version": siem.PRODUCT["version"]}
    assert ocsf["metadata"]["version"] == "1.8.0"
    assert ocsf["unmapped"]["agentwarden"]["agent"] == ecs["agentwarden"]["agent"] == "coder"
    assert ecs["agentwarden"]["person"] == "alice" and ecs["host"]["hostname"] == "host1"


def test_classes_and_activities():
    def ocsf(name):
        event = siem.to_ocsf(line(SAMPLES[name]))
        return event["class_uid"], event["activity_id"], event["type_uid"], event["severity_id"]
    assert ocsf("exec") == (1007, 1, 100701, 1)
    assert ocsf("exit") == (1007, 2, 100702, 1)
    assert ocsf("read") == (1001, 14, 100114, 1)
    assert ocsf("change unlinkat") == (1001, 4, 100104, 1)
    assert ocsf("change renameat2") == (1001, 5, 100105, 1)
    assert ocsf("change chmod") == (1001, 7, 100107, 1)
    assert ocsf("violation") == (2004, 1, 200401, 4)
    assert ocsf("hold pending") == (2004, 1, 200401, 3)
    assert ocsf("hold denied") == (2004, 3, 200403, 3)
    exec_event = siem.to_ocsf(line(SAMPLES["exec"]))
    assert exec_event["process"]["cmd_line"] == "grep -r x ." and exec_event["actor"]["process"]["pid"] == 42
    assert exec_event["device"]["hostname"] == "host1" and exec_event["status_id"] == 1
    assert siem.to_ocsf(line(SAMPLES["failed exec"]))["status"] == "Failure"
    renamed = siem.to_ocsf(line(SAMPLES["change rename"]))
    assert (renamed["file"]["path"], renamed["file_result"]["path"]) == ("/w/x", "/w/y")

    def ecs(name):
        doc = siem.to_ecs(line(SAMPLES[name]))
        return doc["event"]["kind"], doc["event"]["category"], doc["event"]["type"], doc["event"]["outcome"]
    assert ecs("exec") == ("event", ["process"], ["start"], "success")
    assert ecs("failed exec")[3] == "failure"
    assert ecs("read")[2] == ["access"] and ecs("write")[2] == ["change"]
    assert ecs("change unlink")[2] == ["deletion"] and ecs("change mkdir")[2] == ["creation"]
    assert ecs("violation")[:3] == ("alert", ["intrusion_detection"], ["denied"])   # killed
    assert ecs("hold approved")[2] == ["allowed"] and ecs("hold timed-out")[2] == ["denied"]
    doc = siem.to_ecs(line(SAMPLES["exec"]))
    assert doc["process"]["args"] == ["grep", "-r", "x", "."] and doc["process"]["executable"] == "/usr/bin/grep"
    assert doc["rule"]["name"] == "exec.allow /usr/bin/*"


def test_kinds_without_a_class_are_not_mapped():
    for record in (dict(kind="fork", **TASK, child_pid=43), dict(kind="gap", time=NS, stage="kernel", count=1,
                                                                   detail=None)):
        assert not siem.mapped(line(record))


def test_the_checks_catch_what_is_not_in_the_schemas():
    event = siem.to_ocsf(line(SAMPLES["exec"]))
    assert ocsf_problems({**event, "agent": "coder"}) == ["process_activity: 'agent' is not an attribute of the class"]
    broken = {**event, "metadata": {"product": event["metadata"]["product"]}, "type_uid": 100799}
    assert {"metadata: required 'version' missing",
            "process_activity: type_uid 100799 is not class_uid * 100 + activity_id"} <= set(ocsf_problems(broken))
    assert ocsf_problems({**event, "time": NS}) == ["process_activity: time 1796000000123456789 is not "
                                                    "milliseconds since the epoch"]
    doc = siem.to_ecs(line(SAMPLES["exec"]))
    assert ecs_problems({**doc, "process": {**doc["process"], "cmdline": "x"}}) == ["'process.cmdline' is not an ECS field"]
    assert ecs_problems({**doc, "event": {**doc["event"], "type": ["deletion"]}}) == [
        "event.type 'deletion' is not expected with categories ['process']"]


def test_a_record_of_repeated_opens_says_how_many_and_when_in_both():
    exported = line(SAMPLES["repeated reads"])
    ocsf, ecs = siem.to_ocsf(exported), siem.to_ecs(exported)
    assert (ocsf["count"], ocsf["start_time"], ocsf["end_time"]) == (49, NS // 1_000_000, NS // 1_000_000 + 2000)
    assert ecs["event"]["start"] == "2026-11-30T00:53:20.123456789Z"
    assert ecs["event"]["end"] == "2026-11-30T00:53:22.123456789Z"
    assert ecs["agentwarden"]["count"] == 49
