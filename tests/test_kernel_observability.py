"""Metrics and SIEM exports on the real kernel: a daemon and probe with
`metrics_listen` on, a real workload in an agent cgroup (grep -r, find, tar,
python3, a violation) and a held exec under `agentwarden run`; then real HTTP
scrapes of /metrics (urllib, parsed by prometheus_client's own parser) whose
counters must equal what the archive holds, and `log export --format ocsf|ecs`
of that archive, every line checked against the published field names."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from agentwarden import siem
from conftest import AgentCgroup, Warden, wait_for
from siem_schema import ecs_problems, ocsf_problems
from test_kernel_sessions import SHELL, _name, _policy, wait_hold

pytestmark = pytest.mark.kernel

TOOLS = ["/usr/bin/grep", "/usr/bin/find", "/usr/bin/tar", "/usr/bin/python3*", "/usr/bin/date *"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def observed(kernel, tmp_path_factory):
    """A warden of this module alone (its counters start at zero), serving metrics."""
    tmp = tmp_path_factory.mktemp("observe")
    port = free_port()
    w = Warden(tmp, env={"AGENTWARDEN_METRICS_LISTEN": f"127.0.0.1:{port}"})
    w.metrics_url = f"http://127.0.0.1:{port}/metrics"
    yield w
    w.stop()


def scrape(warden: Warden) -> dict:
    """name{labels} -> value, from a real HTTP GET parsed by the Prometheus client's parser."""
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(warden.metrics_url, timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        body = response.read().decode()
    values = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def test_metrics_count_what_the_archive_holds_and_exports_follow_ocsf_and_ecs(observed, kernel, tmp_path):
    warden = observed
    first = wait_for(lambda: (lambda m: m if m.get("agentwarden_probe_up") == 1 else None)(scrape(warden)),
                     timeout=20, what="metrics saying the probe is up")
    assert first["agentwarden_daemon_up"] == 1 and first["agentwarden_holds_pending"] == 0
    # While the program compiled, the probe said so, and then how long it took.
    started = warden.output()
    compiling = started.index("agentwarden-probe: compiling the BPF program (BCC, against the headers in ")
    loaded = re.search(r"agentwarden-probe: BPF program loaded and attached in (\d+\.\d) s", started)
    assert loaded and loaded.start() > compiling and 0 < float(loaded.group(1)) < 300
    assert first.get('agentwarden_decisions_total{verdict="violation"}', 0) == 0
    assert all(first[f'agentwarden_dropped_records_total{{stage="{s}"}}'] == 0
               for s in ("kernel", "probe-backlog", "transport", "daemon-ingest", "archive"))

    agent = _name("obs")
    cg = AgentCgroup(kernel, warden, agent)
    try:
        cg.tag()
        work = tmp_path / "work"
        (work / "src").mkdir(parents=True)
        (work / "src" / "a.txt").write_text("needle\n")
        warden.set_policy(agent, _policy(agent, on_violation="alert", exec_allow=SHELL + TOOLS[:4],
                                         exec_hold=TOOLS[4:], write_allow=[f"{tmp_path}/**", "/dev/null"]))
        # The agent's work: tools it really runs, and one exec its policy does not allow.
        done = cg.run(["/bin/sh", "-c", f"grep -r needle {work}/src; find {work} -name '*.txt'; "
                       f"tar cf {work}/src.tar -C {work} src; /usr/bin/python3 -c 'open(\"{work}/out\", \"w\").write(\"x\")'; "
                       "/usr/bin/id -u"], text=True, env={"PATH": "/usr/bin:/bin", "HOME": str(work)})
        assert done.returncode == 0, done.stderr
        assert "needle" in done.stdout and (work / "src.tar").exists()

        # A held exec under `agentwarden run`: pending in the metrics until approved.
        held = subprocess.Popen([sys.executable, "-m", "agentwarden", "run", "--agent", agent, "--",
                                 "/bin/sh", "-c", "/usr/bin/date +held-%Y"], env=warden.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        [hold] = wait_hold(warden, agent)
        wait_for(lambda: scrape(warden)["agentwarden_holds_pending"] == 1, what="holds_pending 1")
        warden.cli("approve", hold["id"], "--reason", "metrics test")
        out, err = held.communicate(timeout=30)
        assert out.startswith("held-"), err
        warden.settle()
    finally:
        cg.remove()

    records = warden.records()
    kinds = Counter(r["kind"] for r in records)
    verdicts = Counter(r["verdict"]["decision"] for r in records if isinstance(r.get("verdict"), dict))
    holds = Counter(r["state"] for r in records if r["kind"] == "hold")
    decided = [r for r in records if r["kind"] == "hold" and r["state"] == "approved"]
    # The one exec the policy does not allow, and nothing else (no false alarm).
    assert [r["attempted"] for r in records if r["kind"] == "violation"] == ["exec /usr/bin/id -u (/usr/bin/id)"]
    assert holds == {"pending": 1, "approved": 1} and len(decided) == 1

    def matches_archive():
        m = scrape(warden)
        wanted = {**{f'agentwarden_daemon_records_total{{kind="{k}"}}': kinds[k]
                     for k in ("exec", "open", "change", "fork", "exit", "hold")},
                  **{f'agentwarden_decisions_total{{verdict="{v}"}}': n for v, n in verdicts.items()},
                  **{f'agentwarden_hold_records_total{{state="{s}"}}': n for s, n in holds.items()},
                  "agentwarden_violations_total": kinds["violation"],
                  "agentwarden_holds_pending": 0,
                  "agentwarden_hold_wait_seconds_count": 1}
        differ[:] = [(k, m.get(k, 0), v) for k, v in wanted.items() if m.get(k, 0) != v]
        return None if differ else m
    differ: list = []
    try:
        metrics = wait_for(matches_archive, timeout=10, what="metrics equal to the archive's counts")
    except AssertionError:
        raise AssertionError(f"metric, scraped, in the archive: {differ}") from None

    assert metrics["agentwarden_hold_wait_seconds_sum"] == pytest.approx(decided[0]["waited"])
    assert metrics['agentwarden_hold_wait_seconds_bucket{le="+Inf"}'] == 1
    # Every event archived was decoded by the probe and emitted by the kernel first.
    events = sum(kinds[k] for k in ("exec", "open", "chdir", "fork", "exit", "fd", "change", "sidedoor", "move"))
    assert metrics["agentwarden_daemon_events_total"] == events
    assert metrics["agentwarden_probe_records_decoded_total"] >= events
    kernel = sum(v for k, v in metrics.items() if k.startswith("agentwarden_kernel_records_total"))
    assert kernel >= events and metrics["agentwarden_probe_tagged_cgroups"] >= 0
    assert all(v == 0 for k, v in metrics.items() if k.startswith("agentwarden_dropped_records_total"))
    # The supervisor answered the held exec in Python: its round trip is in the histogram.
    assert metrics["agentwarden_session_round_trip_seconds_count"] >= 1
    assert metrics['agentwarden_session_calls_total{outcome="held"}'] >= 1
    assert metrics["agentwarden_fastpath_running"] in (0, 1)
    # The archive: bytes written are in the segment, and all of it durable after the settle.
    segment = Path(warden.status()["daemon"]["archive"]) / warden.status()["daemon"]["archive_state"]["segment"]
    assert 0 < metrics["agentwarden_archive_bytes_written_total"] <= segment.stat().st_size
    assert metrics["agentwarden_archive_ok"] == 1 and metrics["agentwarden_archive_lag_records"] >= 0
    assert metrics["agentwarden_probe_up"] == 1 and 0 <= metrics["agentwarden_probe_last_heartbeat_age_seconds"] < 5

    # -- the same archive for a SIEM ------------------------------------------------------
    mapped_kinds = Counter({k: n for k, n in kinds.items() if k in ("exec", "exit", "open", "violation", "hold")})
    mapped_kinds["change"] = sum(1 for r in records if r["kind"] == "change" and r["syscall"] in siem.FILE_CHANGES)
    for fmt, problems in (("ocsf", ocsf_problems), ("ecs", ecs_problems)):
        result = warden.cli("log", "export", "--format", fmt)
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        assert len(lines) == sum(mapped_kinds.values())
        assert "left out (" in result.stderr and "fork" in result.stderr
        for line in lines:
            assert problems(line) == [], line
    ocsf = [json.loads(line) for line in warden.cli("log", "export", "--format", "ocsf").stdout.splitlines()]
    by_class = Counter(e["class_uid"] for e in ocsf)
    assert by_class[1007] == kinds["exec"] + kinds["exit"] and by_class[2004] == kinds["violation"] + 2
    launched = [e for e in ocsf if e["class_uid"] == 1007 and e["activity_id"] == 1]
    assert any(e["process"].get("cmd_line", "").startswith("grep -r needle") for e in launched)
    [finding] = [e for e in ocsf if e["class_uid"] == 2004 and "/usr/bin/id" in e["finding_info"]["title"]]
    assert finding["unmapped"]["agentwarden"]["agent"] == agent and finding["severity_id"] == 4
    pending = [e for e in ocsf if e["class_uid"] == 2004 and e["activity_id"] == 1
               and e["unmapped"]["agentwarden"].get("hold_id") == hold["id"]]
    assert len(pending) == 1 and pending[0]["device"]["hostname"] == socket.gethostname()
    ecs = [json.loads(line) for line in warden.cli("log", "export", "--format", "ecs", "--agent", agent,
                                                   "--kind", "exec").stdout.splitlines()]
    assert {d["process"]["name"] for d in ecs} >= {"grep", "find", "tar", "id", "date"}
    assert all(d["agentwarden"]["agent"] == agent and d["event"]["category"] == ["process"] for d in ecs)


def test_a_violation_a_session_refused_is_counted_too(observed, kernel):
    """An exec.deny in a `run` session is refused by the supervisor before it
    runs (no kernel event for the daemon to judge): its violation record counts
    in agentwarden_violations_total like the daemon's own."""
    warden = observed
    agent = _name("obsdeny")
    cg = AgentCgroup(kernel, warden, agent)
    shells = ", ".join(f'"{s}"' for s in SHELL)
    try:
        cg.tag()
        warden.set_policy(agent, f'[agent.{agent}]\nmode = "enforce"\non-violation = "hold"\n'
                                 f'[agent.{agent}.exec]\nallow = [{shells}]\ndeny = ["/usr/bin/id"]\n'
                                 f'[agent.{agent}.files]\nread-allow = ["/**"]\nwrite-allow = ["/dev/null"]\n')
        done = subprocess.run([sys.executable, "-m", "agentwarden", "run", "--agent", agent, "--",
                               "/bin/sh", "-c", "/usr/bin/id -u; echo after"], env=warden.env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout == "after\n", done.stderr
        warden.settle()
    finally:
        cg.remove()
    records = warden.records()
    refused = [r for r in records if r["kind"] == "violation" and r.get("agent") == agent]
    assert [r["action_taken"] for r in refused] == ["refused: EPERM"], refused
    everyone = sum(1 for r in records if r["kind"] == "violation")
    wait_for(lambda: scrape(warden)["agentwarden_violations_total"] == everyone,
             what=f"agentwarden_violations_total == {everyone} (the archive's violation records)")
