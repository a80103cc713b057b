"""Reading the archive (filters, attribution, export, replay), sessions and the
archive settings: pure functions, tested by tables."""
from __future__ import annotations

import datetime as dt
import os
from types import SimpleNamespace

import pytest

from agentwarden import logquery
from agentwarden.daemon.sessions import Sessions, derived_id
from agentwarden.errors import AgentwardenError
from agentwarden.settings import ArchiveSettings

NOW = 1_700_000_000.0
T0 = int(NOW * 1e9)


def ev(kind: str, seq: int, pid: int = 10, **fields) -> dict:
    base = {"kind": kind, "seq": seq, "time": T0 + seq * 1000, "pid": pid, "tid": pid, "ppid": 1,
            "uid": 0, "gid": 0, "comm": "sh", "cgroup_id": 5, "agent_cgroup_id": 5,
            "agent": "coder", "session": "s1"}
    if kind == "exec":
        base.update(syscall="execve", filename="/bin/sh", exec_path="/bin/sh", argv=["sh"],
                    argv_truncated=False, resolved_exec_path="/bin/sh", ret=0, error=None)
    if kind == "open":
        base.update(syscall="openat", path="notes.txt", resolved_path="/work/notes.txt", flags=0,
                    ret=3, error=None)
    base.update(fields)
    return base


@pytest.mark.parametrize("text,expected", [
    ("1700000000", T0),
    ("1700000000.5", T0 + 500_000_000),
    ("10m", T0 - 600 * 10**9),
    ("2h", T0 - 7200 * 10**9),
    ("1d", T0 - 86400 * 10**9),
    ("2023-11-14T22:13:20+00:00", T0),
    ("2023-11-14T22:13:20Z", T0),
])
def test_times(text, expected):
    assert logquery.parse_time(text, "--since", now=NOW) == expected


def test_local_times_and_bad_times():
    local = dt.datetime(2024, 5, 1, 10, 0).astimezone()
    assert logquery.parse_time("2024-05-01T10:00", "--since") == int(local.timestamp() * 1e9)
    for bad in ("yesterday", "10 minutes", "-5m", ""):
        with pytest.raises(AgentwardenError, match="--until .* give a time like"):
            logquery.parse_time(bad, "--until")


def test_seq_ranges():
    assert logquery.parse_seq_range("12") == (12, 12)
    assert logquery.parse_seq_range("12..20") == (12, 20)
    assert logquery.parse_seq_range("12..")[0] == 12
    with pytest.raises(AgentwardenError, match="give a seq"):
        logquery.parse_seq_range("twelve")


RECORDS = [
    ev("exec", 1, argv=["sh", "-c", "cat notes.txt"], verdict={"decision": "allow", "rule": "r1",
                                                               "policy_hash": "sha256:p"}),
    ev("open", 2, pid=11, verdict={"decision": "violation", "rule": None, "policy_hash": "sha256:p"}),
    {"kind": "violation", "seq": 3, "time": T0 + 3000, "agent": "coder", "pid": 11, "comm": "cat",
     "event": "open", "event_seq": 2, "attempted": "read /work/notes.txt", "decision": "violation",
     "rule": None, "reason": "no rule", "policy_hash": "sha256:p", "mode": "enforce",
     "action": "kill", "action_taken": "killed process 11", "session": "s1"},
    {"kind": "health", "seq": 4, "time": T0 + 4000, "stage": "probe", "counters": {}},
    ev("open", 5, pid=12, agent="other", session="s2", resolved_path="/etc/passwd", path="/etc/passwd"),
    {"kind": "admin", "seq": 6, "time": T0 + 6000, "action": "freeze", "agent": "coder", "uid": 0,
     "user": "root", "result": "froze x", "sessions": ["s1"]},
]


@pytest.mark.parametrize("kwargs,seqs", [
    ({}, [1, 2, 3, 5, 6]),                               # health and tags only when asked for
    ({"kinds": {"health"}}, [4]),
    ({"agent": "coder"}, [1, 2, 3, 6]),
    ({"session": "s1"}, [1, 2, 3, 6]),                   # admin actions name the sessions they touched
    ({"pid": 11}, [2, 3]),
    ({"verdict": "violation"}, [2, 3]),
    ({"verdict": "allow"}, [1]),
    ({"path": "/work/*"}, [2, 3]),                       # the violation matches through its event
    ({"path": "/work"}, []),
    ({"path": "/**"}, [1, 2, 3, 5]),
    ({"path": "/bin/s?"}, [1]),
    ({"since": T0 + 2000, "until": T0 + 5000}, [2, 3, 5]),
    ({"seqs": (2, 3)}, [2, 3]),
])
def test_filters(kwargs, seqs):
    if "path" in kwargs:
        kwargs["path"] = logquery.compile_path_glob(kwargs["path"])
    flt = logquery.Filter(**kwargs)
    assert [r["seq"] for r in RECORDS if flt.matches(r)] == seqs


def test_filter_errors():
    with pytest.raises(AgentwardenError, match="use one of allow, hold, violation, deny"):
        logquery.Filter(verdict="bad")
    with pytest.raises(AgentwardenError, match="--path 'x/\\*': is not an absolute path"):
        logquery.compile_path_glob("x/*")
    assert not logquery.Filter().any and logquery.Filter(pid=1).any


HEADER = SimpleNamespace(host="h1", boot_id="b1")


def test_export_lines_have_the_stable_fields_and_the_session():
    attribution = logquery.Attribution()
    attribution.see({"kind": "policy", "status": "loaded", "policy_hash": "sha256:p"})
    attribution.see({"kind": "session", "session": "s1", "agent": "coder", "person": "alice",
                     "task": "fix #12", "user": "bob"})
    opened = ev("open", 7, path=b"/tmp/\xff", resolved_path=b"/tmp/\xff", flags=os.O_WRONLY | os.O_CREAT,
                verdict={"decision": "allow", "rule": "files.write-allow", "policy_hash": "sha256:q"})
    line = logquery.export_record(opened, HEADER, attribution)
    assert list(line)[:len(logquery.EXPORT_COMMON)] == list(logquery.EXPORT_COMMON)
    assert line["schema"] == "agentwarden.export.v1"
    assert (line["host"], line["boot_id"], line["agent"], line["session"], line["person"],
            line["task"], line["session_user"]) == ("h1", "b1", "coder", "s1", "alice", "fix #12", "bob")
    assert line["policy_hash"] == "sha256:q"  # the verdict's own policy wins
    assert (line["verdict_decision"], line["verdict_rule"]) == ("allow", "files.write-allow")
    assert "verdict" not in line
    assert line["path"] == "/tmp/\\xff" and line["access"] == "w+create"
    assert line["time_iso"] == "2023-11-14T22:13:20.000007000Z"
    fork = logquery.export_record(ev("fork", 8, child_pid=99, session=None, agent=None), HEADER, attribution)
    assert fork["session"] is None and fork["person"] is None and fork["policy_hash"] == "sha256:p"
    health = logquery.export_record({"kind": "health", "seq": 9, "time": T0, "stage": "probe",
                                     "counters": {"decoded": 1}}, HEADER, attribution)
    assert health["pid"] is None and health["counters"] == {"decoded": 1}


def _tree_records():
    return [
        {"kind": "session", "seq": 0, "time": T0, "session": "s1", "status": "active", "agent": "coder",
         "source": "tag", "cgroup_id": 5, "cgroup": "/cg", "person": "alice", "task": "t", "user": "bob",
         "host": "h1", "boot_id": "b1", "policy_hash": "sha256:p"},
        ev("exec", 1, pid=10, argv=["sh", "-c", "x"], ppid=1),
        ev("fork", 2, pid=10, child_pid=11),
        ev("fork", 3, pid=10, child_pid=13),            # a thread: nothing of its own follows
        ev("exec", 4, pid=11, argv=["cat", "notes.txt"], filename="/usr/bin/cat",
           resolved_exec_path="/usr/bin/cat", ppid=10),
        ev("open", 5, pid=11),
        ev("fork", 6, pid=10, child_pid=12),
        ev("exec", 7, pid=12, argv=["curl", "x"], filename="/usr/bin/curl",
           resolved_exec_path="/usr/bin/curl", ppid=10),
        {"kind": "violation", "seq": 8, "time": T0 + 8000, "agent": "coder", "pid": 12, "comm": "curl",
         "event": "exec", "event_seq": 7, "attempted": "exec curl x (/usr/bin/curl)",
         "decision": "violation", "rule": None, "reason": "r", "policy_hash": "sha256:p",
         "mode": "enforce", "action": "kill", "action_taken": "killed process 12", "session": "s1"},
        ev("exit", 9, pid=12), ev("exit", 10, pid=11), ev("exit", 11, pid=10),
        ev("exec", 12, pid=50, session="s2"),           # another session
        {"kind": "admin", "seq": 13, "time": T0 + 13000, "action": "thaw", "agent": "coder", "uid": 0,
         "user": "root", "result": "thawed /cg", "sessions": ["s1"]},
    ]


def test_replay_builds_the_tree_and_timeline():
    replay = logquery.build_replay(_tree_records(), "s1")
    assert replay.roots == [10]
    assert replay.children == {10: [11, 12]}
    assert 13 not in replay.processes and 50 not in replay.processes
    assert replay.processes[11].program() == "cat notes.txt"
    assert replay.processes[12].violations[0]["action_taken"] == "killed process 12"
    assert [r["seq"] for r in replay.timeline] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13]
    text = "\n".join(logquery.replay_text(replay))
    assert "session s1: agent coder, person alice, task t, user bob" in text
    assert "10 sh -c x  [/bin/sh]" in text
    assert "├─ 11 cat notes.txt  [/usr/bin/cat]" in text and "└─ 12 curl x  [/usr/bin/curl]" in text
    assert "open r /work/notes.txt -> fd 3" in text
    assert "VIOLATION exec curl x (/usr/bin/curl): violation -> killed process 12" in text
    assert "ADMIN root thaw coder: thawed /cg" in text
    as_json = replay.as_json(lambda r: {"seq": r["seq"]})
    assert [p["pid"] for p in as_json["processes"]] == [10, 11, 12]
    assert as_json["processes"][0]["children"] == [11, 12]


def test_picking_a_session():
    sessions = {"s1": {"agent": "coder"}, "s2": {"agent": "other"}, "s3": {"agent": "other"}}
    assert logquery.pick_session("s2", sessions) == "s2"
    assert logquery.pick_session("coder", sessions) == "s1"
    with pytest.raises(AgentwardenError, match="agent 'other' has 2 sessions; name one: s2, s3"):
        logquery.pick_session("other", sessions)
    with pytest.raises(AgentwardenError, match="no session 'nope'"):
        logquery.pick_session("nope", sessions)


def test_sessions_from_tags():
    sessions = Sessions("h1", "boot1")
    tags = {"5": {"agent": "coder", "path": "/nonexistent/cg"},
            "6": {"agent": "writer", "path": "/nonexistent/w", "session": "run-1", "task": "t",
                  "on_behalf_of": "alice", "user": "bob"}}
    started = sessions.update(tags, "sha256:p", now=1)
    assert [(r["session"], r["status"], r["source"]) for r in started] == \
        [(derived_id("boot1", 5, "coder"), "active", "tag"), ("run-1", "active", "xattr")]
    assert derived_id("boot1", 5, "coder").startswith("coder-")
    assert derived_id("boot1", 5, "coder") != derived_id("boot2", 5, "coder")
    writer = started[1]
    assert (writer["person"], writer["task"], writer["user"], writer["host"], writer["policy_hash"]) == \
        ("alice", "t", "bob", "h1", "sha256:p")
    assert sessions.update(tags, "sha256:p", now=2) == []          # nothing changed
    changed = sessions.update({**tags, "6": {**tags["6"], "task": "t2"}}, "sha256:p", now=3)
    assert [(r["session"], r["task"]) for r in changed] == [("run-1", "t2")]
    ended = sessions.update({"6": {**tags["6"], "task": "t2"}}, "sha256:p", now=4)
    assert [(r["agent"], r["status"]) for r in ended] == [("coder", "ended")]
    assert sessions.session_of(5) == derived_id("boot1", 5, "coder")  # late events still attributed
    assert sessions.of_agent("writer") == ["run-1"] and sessions.of_agent("*") == ["run-1"]
    restated = sessions.restate("sha256:new", now=5)
    assert [(r["session"], r["policy_hash"], r["time"]) for r in restated] == [("run-1", "sha256:new", 5)]


def test_archive_settings_from_the_environment():
    s = ArchiveSettings.from_env({"AGENTWARDEN_ARCHIVE_SYNC_INTERVAL": "0.2s",
                                  "AGENTWARDEN_ARCHIVE_SEGMENT_BYTES": "16M",
                                  "AGENTWARDEN_ARCHIVE_SEGMENT_AGE": "2h",
                                  "AGENTWARDEN_ARCHIVE_RETAIN_AGE": "90d",
                                  "AGENTWARDEN_ARCHIVE_RETAIN_BYTES": "10G",
                                  "AGENTWARDEN_ARCHIVE_COMPRESS": "zlib",
                                  "AGENTWARDEN_ARCHIVE_ON_DISK_FULL": "Kill",
                                  "AGENTWARDEN_ARCHIVE_KEY_FILE": "/root/k"})
    assert (s.sync_interval, s.segment_bytes, s.segment_age, s.retain_age, s.retain_bytes, s.compress,
            s.on_disk_full, str(s.key_file), s.key_file_required) == \
        (0.2, 16 << 20, 7200, 90 * 86400, 10 << 30, "zlib", "kill", "/root/k", True)
    defaults = ArchiveSettings.from_env({})
    assert (defaults.sync_interval, defaults.compress, defaults.on_disk_full, defaults.key_file_required) == \
        (0.5, "xz", "freeze", False)
    for env, message in [({"AGENTWARDEN_ARCHIVE_SEGMENT_BYTES": "big"}, "is not a size"),
                         ({"AGENTWARDEN_ARCHIVE_SYNC_INTERVAL": "soon"}, "is not a duration"),
                         ({"AGENTWARDEN_ARCHIVE_SYNC_INTERVAL": "5m"}, "outside 0.01..60 s"),
                         ({"AGENTWARDEN_ARCHIVE_COMPRESS": "bz2"}, "use one of xz, zlib, none"),
                         ({"AGENTWARDEN_ARCHIVE_ON_DISK_FULL": "panic"}, "use one of freeze, kill, continue")]:
        with pytest.raises(AgentwardenError, match=message):
            ArchiveSettings.from_env(env)
