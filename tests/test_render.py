"""How records look in `agentwarden tail` and `tail --json`."""
from __future__ import annotations

import json
import os
import time

import pytest

from agentwarden import render
from agentwarden.settings import Settings

T = 1_700_000_000_123_456_789  # 2023-11-14 22:13:20.123 UTC
TASK = {"time": T, "pid": 4242, "tid": 4242, "ppid": 1, "uid": 1000, "gid": 1000,
        "comm": "python3", "cgroup_id": 9001, "agent_cgroup_id": 9000, "agent": "coder"}
HEAD = "22:13:20.123 coder        {kind} pid 4242   "


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def exec_(**changes):
    return {"kind": "exec", **TASK, "syscall": "execve", "filename": "./ls",
            "exec_path": "./ls", "argv": ["ls", "-l"], "argv_truncated": False, "dirfd": -100,
            "at_flags": 0, "ret": 0, "error": None, "died_before_return": False,
            "filename_unreadable": False, "filename_truncated": False,
            "resolved_filename": "/home/agent/ls", "resolved_exec_path": "/usr/bin/ls", **changes}


def open_(**changes):
    return {"kind": "open", **TASK, "syscall": "openat", "path": "notes.txt", "dirfd": -100,
            "flags": os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "mode": 0o644, "resolve": 0,
            "ret": 3, "error": None, "path_unreadable": False, "path_truncated": False,
            "resolved_path": "/home/agent/notes.txt", **changes}


def chdir(**changes):
    return {"kind": "chdir", **TASK, "syscall": "chdir", "path": "src", "dirfd": -100, "ret": 0,
            "error": None, "path_unreadable": False, "path_truncated": False,
            "resolved_path": "/home/agent/src", **changes}


@pytest.mark.parametrize("ns,shown", [
    (T, "22:13:20.123"),
    (0, "00:00:00.000"),
    (1_700_000_000_999_999_999, "22:13:20.999"),  # must not round up to :21
    (1_700_000_059_999_000_000, "22:14:19.999"),
    (1_700_000_000_000_999_999, "22:13:20.000"),
])
def test_clock(ns, shown):
    assert render.clock(ns) == shown


@pytest.mark.parametrize("flags,mode", [
    (os.O_RDONLY, "r"),
    (os.O_WRONLY, "w"),
    (os.O_RDWR, "rw"),
    (3, "?"),
    (os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "w+create+trunc"),
    (os.O_RDWR | os.O_APPEND, "rw+append"),
    (os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY, "r"),
])
def test_open_mode(flags, mode):
    assert render.open_mode(flags) == mode


def test_exec_shows_the_kernel_path_and_argv():
    assert render.human(exec_()) == HEAD.format(kind="exec ") + " /usr/bin/ls  [ls -l] -> ok"


def test_exec_falls_back_to_resolved_then_given_filename():
    assert render.human(exec_(resolved_exec_path=None)) == \
        HEAD.format(kind="exec ") + " /home/agent/ls  [ls -l] -> ok"
    assert render.human(exec_(resolved_exec_path=None, resolved_filename=None)) == \
        HEAD.format(kind="exec ") + " ./ls  [ls -l] -> ok"


def test_exec_failed_truncated_and_non_utf8():
    record = exec_(ret=-2, error="ENOENT", argv=["cat", b"\xff"], argv_truncated=True,
                   resolved_exec_path=None, resolved_filename=b"/tmp/\xfe")
    assert render.human(record) == \
        HEAD.format(kind="exec ") + " /tmp/\\xfe  [cat \\xff …] -> ENOENT"


def test_open():
    assert render.human(open_()) == \
        HEAD.format(kind="open ") + " /home/agent/notes.txt w+create+trunc -> fd 3"


def test_open_failed_unresolved_non_utf8():
    record = open_(path=b"caf\xe9", resolved_path=None, flags=os.O_RDONLY, ret=-13,
                   error="EACCES")
    assert render.human(record) == HEAD.format(kind="open ") + " caf\\xe9 r -> EACCES"


def test_chdir():
    assert render.human(chdir()) == HEAD.format(kind="chdir") + " /home/agent/src -> ok"
    assert render.human(chdir(ret=-20, error="ENOTDIR", resolved_path=None)) == \
        HEAD.format(kind="chdir") + " src -> ENOTDIR"


def test_fork_and_exit():
    assert render.human({"kind": "fork", **TASK, "child_pid": 4250}) == \
        HEAD.format(kind="fork ") + " child 4250"
    assert render.human({"kind": "exit", **TASK}) == HEAD.format(kind="exit ") + " (python3)"
    assert render.human({"kind": "exit", **TASK, "comm": b"\xffx"}) == \
        HEAD.format(kind="exit ") + " (\\xffx)"


def test_fd():
    def fd(**changes):
        return {"kind": "fd", **TASK, "syscall": "fcntl_dupfd_cloexec", "fd": 3, "arg": 3, "ret": 4,
                "error": None, "cloexec": True, "resolved_path": "/home/agent/src", **changes}
    assert render.human(fd()) == HEAD.format(kind="fd   ") + " fcntl_dupfd_cloexec 3 (/home/agent/src) -> fd 4"
    assert render.human(fd(syscall="close", ret=0, resolved_path=None)) == \
        HEAD.format(kind="fd   ") + " close 3 -> ok"
    assert render.human(fd(syscall="close", ret=-4, error="EINTR")) == \
        HEAD.format(kind="fd   ") + " close 3 (/home/agent/src) -> EINTR"


def change(**changes):
    return {"kind": "change", **TASK, "syscall": "renameat2", "path": "a", "dirfd": 3, "path2": "b",
            "dirfd2": -100, "mode": 0, "new_uid": -1, "new_gid": -1, "length": 0, "at_flags": 0, "ret": 0,
            "error": None, "resolved_path": "/src/a", "resolved_path2": "/home/agent/b", **changes}


@pytest.mark.parametrize("fields, shown", [
    ({}, "renameat2 /src/a -> /home/agent/b -> ok"),
    ({"resolved_path2": None, "error": "EXDEV", "ret": -18}, "renameat2 /src/a -> b -> EXDEV"),
    ({"syscall": "symlinkat", "path": "../x"}, "symlinkat /home/agent/b -> ../x -> ok"),
    ({"syscall": "fchmodat", "path2": "", "resolved_path2": None, "mode": 0o755}, "fchmodat /src/a mode 0o755 -> ok"),
    ({"syscall": "fchown", "path": "", "path2": "", "resolved_path": None, "new_uid": 0},
     "fchown fd 3 to 0:-1 -> ok"),
    ({"syscall": "ftruncate", "path": "", "path2": "", "length": 7}, "ftruncate /src/a to 7 bytes -> ok"),
    ({"syscall": "unlinkat", "path2": "", "resolved_path2": None}, "unlinkat /src/a -> ok"),
])
def test_change(fields, shown):
    assert render.human(change(**fields)) == HEAD.format(kind="change") + " " + shown


def test_sidedoor():
    door = {"kind": "sidedoor", **TASK, "syscall": "chroot", "door": "chroot", "fd": -100, "arg": 0,
            "path": "jail", "resolved_path": "/home/agent/jail", "ret": 0, "error": None}
    assert render.human(door) == HEAD.format(kind="sidedoor") + " chroot /home/agent/jail (side door chroot) -> ok"
    uring = {**door, "syscall": "io_uring_setup", "door": "io_uring", "path": "", "resolved_path": None}
    assert render.sidedoor(uring) == "io_uring_setup (side door io_uring)"


def test_unknown_agent_shows_its_cgroup_id():
    assert render.human({"kind": "fork", **TASK, "agent": None, "child_pid": 1}) == \
        "22:13:20.123 cgroup:9000  fork  pid 4242    child 1"


def test_long_agent_name_is_not_cut():
    assert render.human({"kind": "exit", **TASK, "agent": "a-very-long-agent"}) == \
        "22:13:20.123 a-very-long-agent exit  pid 4242    (python3)"


def test_gap():
    gap = {"kind": "gap", "time": T, "stage": "kernel", "count": 17, "detail": "ring buffer full"}
    assert render.human(gap) == "22:13:20.123 LOST 17 records at stage kernel: ring buffer full"
    assert render.human({**gap, "detail": None}) == "22:13:20.123 LOST 17 records at stage kernel"


def test_as_json_turns_bytes_into_escaped_text():
    record = exec_(argv=["cat", b"\xff"], filename=b"./\xfe", resolved_filename=None,
                   resolved_exec_path=b"/bin/\x80")
    line = render.as_json(record)
    assert "\n" not in line
    decoded = json.loads(line)
    assert decoded["argv"] == ["cat", "\\xff"]
    assert decoded["filename"] == "./\\xfe"
    assert decoded["resolved_filename"] is None
    assert decoded["resolved_exec_path"] == "/bin/\\x80"
    assert decoded["exec_path"] == "./ls"
    assert list(decoded) == sorted(decoded)


def test_as_json_exact_line():
    record = {"kind": "gap", "time": 5, "stage": "kernel", "count": 2, "detail": None,
              "nested": {"b": [b"\xff", "é"]}}
    assert render.as_json(record) == (
        '{"count": 2, "detail": null, "kind": "gap", '
        '"nested": {"b": ["\\\\xff", "\\u00e9"]}, "stage": "kernel", "time": 5}')


def test_as_json_refuses_other_objects():
    with pytest.raises(TypeError, match="cannot serialise object"):
        render.as_json({"kind": "gap", "x": object()})


# ---- status, holds, settings ---------------------------------------------------------

NOW = 1_700_000_100_000_000_000


def test_status_of_a_busy_daemon():
    st = {"daemon": {"pid": 1, "events_per_second": 3.4, "counters": {"events": 9}, "archive": "/a",
                     "archive_state": {"state": "ok", "durable_seq": 5, "error": None, "keyed": True}},
          "probe": {"last_seen": NOW - 2_000_000_000, "health": {"tagged_cgroups": 1, "decoded": 7},
                    "tags": {"12": {"agent": "coder", "path": "/x"}}},
          "sessions": {"fast_path": "running", "fast": {"continued": 4, "ruled": 2}, "sessions": 1, "holds": 2},
          "drops": {"b": 1, "a": 2}}
    assert render.status(st, NOW) == [
        "daemon: up (pid 1), 3 events/s, 9 events, archive /a",
        "archive: ok, durable up to seq 5",
        "probe:  up, 1 tagged cgroups, 7 records decoded",
        "  agent coder            /x (id 12)",
        "sessions: 1 running, 2 holds pending, exec fast path running (4 calls answered, 2 of them by "
        "the compiled rules; 0 exec filenames from the kernel's copy)",
        "drops:  a=2, b=1"]


def test_status_of_a_full_archive_and_a_silent_probe():
    st = {"daemon": {"pid": 1, "events_per_second": 0, "counters": {}, "archive": "/a",
                     "archive_state": {"state": "full", "durable_seq": 5, "error": "disk full",
                                       "on_disk_full": {"frozen": []}, "keyed": False}},
          "probe": {"last_seen": NOW - 20_000_000_000, "health": {}, "tags": {}},
          "sessions": {"fast_path": "not built"}, "drops": {}}
    assert render.status(st, NOW) == [
        "daemon: up (pid 1), 0 events/s, 0 events, archive /a",
        "archive: full, durable up to seq 5, disk full; agents frozen: none (not keyed)",
        "probe:  SILENT for 20s, 0 tagged cgroups, 0 records decoded",
        "sessions: 0 running, 0 holds pending, exec fast path off: not built",
        "drops:  none"]
    st["probe"]["last_seen"] = 0
    assert "probe:  no contact yet" in render.status(st, NOW)


def test_holds():
    assert render.holds([]) == ["no pending holds"]
    hold = {"id": "h1", "agent": "a", "session": "s", "on_behalf_of": "", "waited": 3.2, "timeout_in": 10,
            "approvals": [1], "required": 2, "action": "exec x", "rule": None}
    assert render.holds([hold, {**hold, "on_behalf_of": "bob", "rule": "exec.hold"}]) == [
        "h1  agent a  session s  for -  waiting 3s (timeout in 10s)  approvals 1/2",
        "    exec x",
        "    rule: no rule allows it",
        "h1  agent a  session s  for bob  waiting 3s (timeout in 10s)  approvals 1/2",
        "    exec x",
        "    rule: exec.hold"]


def test_settings_as_toml_and_json():
    settings = Settings(origins={name: "default" for name in Settings().values()})
    lines = render.settings_toml(settings, [])
    assert lines[0] == "# files read: none"
    assert 'run_dir = "/run/agentwarden"                   # default' in lines
    assert "health_interval = 1.0                          # default" in lines
    assert json.loads(render.settings_json(settings, []))["settings"]["run_dir"] == "/run/agentwarden"
