"""The wire schema: round trips, and every malformed message becomes WireError."""
from __future__ import annotations

import random

import msgpack
import pytest

from agentwarden import wire
from agentwarden.wire import WireError

TASK = {"time": 1_700_000_000_123_456_789, "pid": 4242, "tid": 4243, "ppid": 1, "uid": 1000,
        "gid": 1000, "comm": "python3", "cgroup_id": 9001, "agent_cgroup_id": 9000}

RECORDS = {
    "exec": {"kind": "exec", **TASK, "syscall": "execve", "filename": "/usr/bin/ls",
             "exec_path": "/usr/bin/ls", "argv": ["ls", "-l", b"\xff\xfe"],
             "argv_truncated": False, "dirfd": -100, "at_flags": 0, "ret": 0, "error": None,
             "died_before_return": False, "filename_unreadable": False,
             "filename_truncated": False, "killed_in_kernel": False, "kernel_rule": None,
             "not_approved": False},
    "open": {"kind": "open", **TASK, "syscall": "openat", "path": b"/tmp/\xff.txt", "dirfd": -100,
             "flags": 0o2000101, "mode": 0o644, "resolve": 0, "ret": 3, "error": None,
             "path_unreadable": False, "path_truncated": False, "killed_in_kernel": True,
             "kernel_rule": "deny /tmp/** (policy.toml:7)"},
    "chdir": {"kind": "chdir", **TASK, "syscall": "chdir", "path": "/tmp", "dirfd": -100,
              "ret": -2, "error": "ENOENT", "path_unreadable": False, "path_truncated": False},
    "fork": {"kind": "fork", **TASK, "child_pid": 4250},
    "exit": {"kind": "exit", **TASK},
    "change": {"kind": "change", **TASK, "syscall": "renameat2", "path": "a", "dirfd": 3,
               "path2": b"/tmp/\xff", "dirfd2": -100, "mode": 0, "new_uid": -1, "new_gid": -1, "length": 0,
               "at_flags": 1, "ret": 0, "error": None, "path_unreadable": False, "path_truncated": False,
               "path2_unreadable": False, "path2_truncated": False, "killed_in_kernel": False,
               "kernel_rule": None},
    "sidedoor": {"kind": "sidedoor", **TASK, "syscall": "io_uring_setup", "door": "io_uring", "fd": -100,
                 "arg": 8, "path": "", "ret": -1, "error": "EPERM", "path_unreadable": False,
                 "path_truncated": False, "killed_in_kernel": True,
                 "kernel_rule": "syscalls.allow without 'io_uring'"},
    "move": {"kind": "move", **TASK, "moved_pid": 42, "dst_cgroup_id": 77, "dst_agent_cgroup_id": 0,
             "dst_path": "/escape", "dst_path_truncated": False, "left": True,
             "killed_in_kernel": True, "kernel_rule": "on-violation kill: leaving the agent's cgroups",
             "kill_pending": False},
    "fd": {"kind": "fd", **TASK, "syscall": "fcntl_dupfd_cloexec", "fd": 3, "arg": 3, "ret": 4,
           "error": None, "cloexec": True},
    "gap": {"kind": "gap", "time": 5, "stage": "kernel", "count": 17, "detail": None},
    "health": {"kind": "health", "time": 6, "stage": "probe", "counters": {"decoded": 3}},
    "tags": {"kind": "tags", "time": 7, "agents": {"9000": {"agent": "coder", "path": "/x"}}},
    "violation": {"kind": "violation", "time": 8, "agent": "coder", "pid": 4242, "comm": "curl",
                  "event": "exec", "event_seq": 17, "attempted": "exec curl x (/usr/bin/curl)",
                  "decision": "violation", "rule": None, "reason": "matches no allow rule",
                  "policy_hash": "sha256:ab", "mode": "enforce", "action": "kill",
                  "action_taken": "killed process 4242"},
    "policy": {"kind": "policy", "time": 9, "status": "refused", "policy_hash": "sha256:ab",
               "files": ["/etc/agentwarden/policy.d/a.toml"], "detail": "a.toml:3: bad"},
    "hold": {"kind": "hold", "time": 11, "hold_id": "h1-ab12", "state": "approved",
             "session": "s-1", "agent": "coder", "on_behalf_of": "alice", "task": "fix bug",
             "pid": 4242, "action": "exec git push (/usr/bin/git)", "rule": "exec.hold x at a:1",
             "policy_hash": "sha256:ab", "required": 1, "approvers": ["bob"], "reason": "ok",
             "waited": 1.5, "denial": None,
             "approvals": [{"uid": 1001, "name": "bob", "reason": "ok", "time": 10}]},
    "release": {"kind": "release", "time": 11, "hold_id": "h1-ab12", "remembered": False,
                "session": "s-1", "agent": "coder", "on_behalf_of": "alice", "task": "fix bug",
                "tid": 4242, "syscall": "execve", "event": "exec", "paths": ["/usr/bin/git"],
                "flags": 0},
    "supervision": {"kind": "supervision", "time": 12, "state": "started", "session": "s-1",
                "agent": "coder", "on_behalf_of": "alice", "task": "fix bug", "user": "coder",
                "host": "h", "cgroup": "/sys/fs/cgroup/agents/coder/session-1", "pid": 4242},
    "admin": {"kind": "admin", "time": 10, "action": "freeze", "agent": "coder", "uid": 1000,
              "user": "alice", "result": "froze /sys/fs/cgroup/agents/coder"},
    "session": {"kind": "session", "time": 11, "session": "coder-0a1b2c3d4e5f", "status": "active",
                "agent": "coder", "source": "tag", "cgroup_id": 9000, "cgroup": "/x",
                "person": "alice", "task": "fix #12", "user": "root", "host": "h1",
                "boot_id": "b0", "policy_hash": None},
    "archive": {"kind": "archive", "time": 12, "event": "torn-tail-cut", "detail": "cut 7 bytes",
                "bytes_cut": 7},
    "drift": {"kind": "drift", "time": 14, "change_id": "c-1a2b3c4d5e", "state": "changed",
              "path": "/etc/app.conf", "agent": "coder", "session": "s-1", "person": "alice", "task": "tune",
              "syscalls": ["rename"], "hold_id": "h2-ab12", "approvers": ["root"], "reason": "try it",
              "policy_hash": "sha256:x", "source": "session",
              "before": {"kind": "file", "sha256": "a" * 64, "size": 3, "mode": 0o644, "uid": 0, "gid": 0},
              "after": {"kind": "absent"}, "expires": 15, "admin": None},
    "watch": {"kind": "watch", "time": 13, "state": "lost", "probe_pid": 41,
              "detail": "the probe (pid 41) exited without being asked to; agents frozen until it "
                        "watches again", "action_taken": "froze /sys/fs/cgroup/agents/coder"},
    "fleet": {"kind": "fleet", "time": 14, "event": "refused", "hold_id": "h1-ab12",
              "signer": "ed25519:0123456789abcdef",
              "detail": "fleet decision refused: signed by key ed25519:0123456789abcdef (claims "
                        "'mallory'), which is not in this host's fleet_admin_keys"},
}


def record(of: str, **changes) -> dict:
    """A sample record of kind `of` with fields changed, or removed when set to DROP."""
    r = {**RECORDS[of], **changes}
    return {k: v for k, v in r.items() if v is not DROP}


DROP = object()


def batch_bytes(records, **changes) -> bytes:
    msg = {"v": wire.SCHEMA_VERSION, "type": "batch", "source": "probe", "seq": 7,
           "records": records, **changes}
    return msgpack.packb({k: v for k, v in msg.items() if v is not DROP}, use_bin_type=True)


def test_every_kind_has_a_sample_record():
    assert set(RECORDS) == set(wire.RECORD_FIELDS)


def test_round_trip_keeps_every_record_exactly():
    records = [dict(r) for r in RECORDS.values()]
    records[0]["resolved_path"] = "/extra/fields/are/allowed"
    batch = wire.decode_batch(wire.encode_batch("probe", 12, records))
    assert batch == wire.Batch("probe", 12, records)
    # bytes stay bytes, str stays str
    assert batch.records[1]["path"] == b"/tmp/\xff.txt"
    assert batch.records[0]["argv"] == ["ls", "-l", b"\xff\xfe"]


def test_empty_batch_round_trips():
    assert wire.decode_batch(wire.encode_batch("daemon", 0, [])) == wire.Batch("daemon", 0, [])


@pytest.mark.parametrize("raw", [
    b"", b"\xc1", b"garbage that is not msgpack", b"\x92\x01",  # \x92: array of 2, one given
])
def test_garbage_is_rejected(raw):
    with pytest.raises(WireError):
        wire.decode_batch(raw)


def test_truncated_msgpack_is_rejected():
    raw = wire.encode_batch("probe", 1, [RECORDS["open"]])
    for cut in (1, len(raw) // 2, len(raw) - 1):
        with pytest.raises(WireError, match="not msgpack"):
            wire.decode_batch(raw[:cut])


def test_trailing_bytes_are_rejected():
    with pytest.raises(WireError, match="not msgpack"):
        wire.decode_batch(wire.encode_batch("probe", 1, []) + b"\x00")


@pytest.mark.parametrize("msg", [[1, 2], "batch", 1, None])
def test_message_must_be_a_map(msg):
    with pytest.raises(WireError, match="message is not a map"):
        wire.decode_batch(msgpack.packb(msg))


@pytest.mark.parametrize("version", [0, 2, "1", None, True, 1.0, DROP])
def test_wrong_schema_version_is_rejected(version):
    with pytest.raises(WireError, match="schema version"):
        wire.decode_batch(batch_bytes([], v=version))


@pytest.mark.parametrize("type_", ["control", None, 1, DROP])
def test_unknown_message_type_is_rejected(type_):
    with pytest.raises(WireError, match="unknown message type"):
        wire.decode_batch(batch_bytes([], type=type_))


@pytest.mark.parametrize("changes", [
    {"source": DROP}, {"source": b"probe"}, {"source": 1},
    {"seq": DROP}, {"seq": "7"}, {"seq": True}, {"seq": 7.0},
])
def test_batch_needs_source_and_integer_seq(changes):
    with pytest.raises(WireError, match="lacks a source name or sequence number"):
        wire.decode_batch(batch_bytes([], **changes))


@pytest.mark.parametrize("records", [DROP, None, {"kind": "exit"}, "records"])
def test_records_must_be_a_list(records):
    with pytest.raises(WireError, match="records is not a list"):
        wire.decode_batch(batch_bytes(records))


@pytest.mark.parametrize("item", [1, "exit", [RECORDS["exit"]], None])
def test_record_must_be_a_map(item):
    with pytest.raises(WireError, match="not a map"):
        wire.decode_batch(batch_bytes([RECORDS["exit"], item]))


@pytest.mark.parametrize("kind", ["execve", "", None, 1, DROP, ["exec"]])
def test_unknown_kind_is_rejected(kind):
    with pytest.raises(WireError, match="unknown record kind"):
        wire.decode_batch(batch_bytes([record("exit", kind=kind)]))


@pytest.mark.parametrize("kind,field", [
    (kind, field) for kind, fields in wire.RECORD_FIELDS.items() for field in fields])
def test_each_missing_field_is_rejected(kind, field):
    with pytest.raises(WireError, match=f"{kind} record lacks field '{field}'"):
        wire.decode_batch(batch_bytes([record(kind, **{field: DROP})]))


@pytest.mark.parametrize("kind,field,value", [
    ("exec", "pid", True),            # bool where int is required
    ("exec", "ret", False),
    ("open", "flags", True),
    ("gap", "count", True),
    ("exec", "pid", "4242"),
    ("exec", "pid", 4242.0),
    ("exec", "argv_truncated", 0),    # int where bool is required
    ("open", "path_truncated", 1),
    ("open", "path", 5),
    ("open", "path", None),
    ("exec", "argv", "ls -l"),
    ("exec", "argv", ["ls", 5]),      # argv items are str or bytes
    ("exec", "argv", ["ls", None]),
    ("exec", "syscall", b"execve"),
    ("chdir", "error", 2),
    ("exit", "comm", None),
    ("health", "counters", [1]),
    ("tags", "agents", "coder"),
    ("gap", "detail", b"x"),
])
def test_wrong_field_types_are_rejected(kind, field, value):
    with pytest.raises(WireError, match=f"{kind} record field '{field}'"):
        wire.decode_batch(batch_bytes([record(kind, **{field: value})]))


@pytest.mark.parametrize("count,last_time", [(0, 1), (-3, 1), (True, 1), ("9", 1), (2.0, 1), (5, None),
                                              (5, "later")])
def test_a_record_of_repeated_opens_needs_a_positive_count_and_a_last_time(count, last_time):
    # Seen once valid, a signature takes the fast path: the count is checked there too.
    wire.decode_batch(batch_bytes([record("open", count=3, last_time=2)]))
    with pytest.raises(WireError, match="open record has a malformed count"):
        wire.decode_batch(batch_bytes([record("open", count=count, last_time=last_time)]))


def test_optional_fields_accept_none_and_str():
    for detail in (None, "ring buffer full"):
        batch = wire.decode_batch(batch_bytes([record("gap", detail=detail)]))
        assert batch.records[0]["detail"] == detail


def test_one_bad_record_rejects_the_batch():
    good = [RECORDS["exit"]] * 3
    with pytest.raises(WireError):
        wire.decode_batch(batch_bytes(good + [record("exit", pid=None)] + good))


def test_oversized_message_is_rejected_before_parsing():
    raw = b"\x00" * (wire.MAX_MESSAGE_BYTES + 1)
    with pytest.raises(WireError, match="exceeds"):
        wire.decode_batch(raw)


def test_too_many_records_is_rejected():
    raw = batch_bytes([RECORDS["gap"]] * (wire.MAX_RECORDS_PER_BATCH + 1))
    assert len(raw) <= wire.MAX_MESSAGE_BYTES
    with pytest.raises(WireError, match="not msgpack"):
        wire.decode_batch(raw)


def test_invalid_utf8_in_a_str_is_rejected():
    # a msgpack str (not bin) holding invalid UTF-8
    raw = batch_bytes([]).replace(b"\xa5probe", b"\xa5pr\xffbe")
    with pytest.raises(WireError, match="not msgpack"):
        wire.decode_batch(raw)


def test_unhashable_map_key_is_rejected():
    # fixmap of 1 entry whose key is an array: msgpack cannot build that dict
    with pytest.raises(WireError):
        wire.decode_batch(b"\x81\x91\x01\x01")


def test_fuzz_only_wire_errors():
    rng = random.Random(20240611)
    valid = wire.encode_batch("probe", 3, list(RECORDS.values()))
    outcomes = {"ok": 0, "error": 0}
    for case in range(500):
        choice = case % 4
        if choice == 0:
            raw = rng.randbytes(rng.randrange(0, 200))
        elif choice == 1:
            raw = valid[:rng.randrange(0, len(valid))]
        elif choice == 2:  # flip a few bytes of a valid batch
            data = bytearray(valid)
            for _ in range(rng.randrange(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            raw = bytes(data)
        else:  # a valid prefix followed by noise
            raw = valid[:rng.randrange(len(valid))] + rng.randbytes(rng.randrange(1, 50))
        try:
            batch = wire.decode_batch(raw)
        except WireError:
            outcomes["error"] += 1
        else:
            assert isinstance(batch, wire.Batch)
            outcomes["ok"] += 1
    assert outcomes["error"] > 400


def test_decode_control():
    assert wire.decode_control(wire.pack({"cmd": "status", "id": 3})) == {"cmd": "status", "id": 3}


@pytest.mark.parametrize("raw,match", [
    (b"\xc1", "not msgpack"),
    (b"", "not msgpack"),
    (msgpack.packb({"cmd": "status"})[:-1], "not msgpack"),
    (msgpack.packb(["status"]), "string 'cmd'"),
    (msgpack.packb({"cmd": 1}), "string 'cmd'"),
    (msgpack.packb({"cmd": b"status"}, use_bin_type=True), "string 'cmd'"),
    (msgpack.packb({"command": "status"}), "string 'cmd'"),
    (b"\x00" * (wire.MAX_CONTROL_BYTES + 1), "exceeds"),
])
def test_decode_control_rejects(raw, match):
    with pytest.raises(WireError, match=match):
        wire.decode_control(raw)


def test_decode_control_fuzz_only_wire_errors():
    rng = random.Random(7)
    for _ in range(300):
        try:
            msg = wire.decode_control(rng.randbytes(rng.randrange(0, 64)))
        except WireError:
            continue
        assert isinstance(msg["cmd"], str)


@pytest.mark.parametrize("raw,expected", [
    (b"/usr/bin/ls", "/usr/bin/ls"),
    ("é".encode(), "é"),
    (b"/tmp/\xff", b"/tmp/\xff"),
    (b"", ""),
])
def test_from_c(raw, expected):
    assert wire.from_c(raw) == expected


def test_text_escapes_non_utf8_bytes():
    assert wire.text("/a") == "/a"
    assert wire.text(b"/tmp/\xff") == "/tmp/\\xff"


def test_kernel_rules_carry_the_side_doors_of_killing_agents():
    raw = wire.encode_kernel_rules("sha256:x", [], {"coder": ["io_uring"], "other": []})
    assert wire.decode_kernel_rules(raw)["sidedoors"] == {"coder": ["io_uring"], "other": []}
    for bad in ({"coder": "io_uring"}, {"coder": [1]}, ["coder"]):
        with pytest.raises(wire.WireError, match="sidedoors"):
            wire.decode_kernel_rules(wire.pack({"type": "kernel-rules", "policy_hash": None, "rules": [],
                                                "sidedoors": bad}))
    rule = {"agent": "a", "path": "/x", "exact": True, "applies": "change", "rule": "r"}
    with pytest.raises(wire.WireError, match="applies to 'change'"):
        wire.decode_kernel_rules(wire.encode_kernel_rules(None, [rule], {}))


def test_kernel_rules_carry_the_agents_killed_on_leaving():
    raw = wire.encode_kernel_rules("sha256:x", [], {}, ["coder"])
    assert wire.decode_kernel_rules(raw)["kill_on_leave"] == ["coder"]
    old = wire.pack({"v": 1, "type": "kernel-rules", "policy_hash": None, "rules": []})
    assert wire.decode_kernel_rules(old)["kill_on_leave"] == []
    with pytest.raises(wire.WireError, match="kill_on_leave"):
        wire.decode_kernel_rules(wire.pack({"type": "kernel-rules", "policy_hash": None, "rules": [],
                                            "kill_on_leave": [1]}))
    with pytest.raises(wire.WireError, match="applies"):
        wire.decode_kernel_rules(wire.encode_kernel_rules(None, [
            {"agent": "a", "path": "/x", "exact": True, "applies": "move", "rule": "r"}], {}))


def test_kernel_rules_say_whose_execs_wake_the_probe_at_once():
    """Absent (an older daemon): the probe keeps every exec prompt; present,
    even empty, it is the whole list."""
    assert "exec_prompt" not in wire.decode_kernel_rules(wire.encode_kernel_rules("sha256:x", [], {}))
    raw = wire.encode_kernel_rules("sha256:x", [], {}, [], ["coder"])
    assert wire.decode_kernel_rules(raw)["exec_prompt"] == ["coder"]
    assert wire.decode_kernel_rules(wire.encode_kernel_rules(None, [], {}, [], []))["exec_prompt"] == []
    for bad in ("coder", [1], None):
        with pytest.raises(wire.WireError, match="exec_prompt"):
            wire.decode_kernel_rules(wire.pack({"type": "kernel-rules", "policy_hash": None, "rules": [],
                                                "exec_prompt": bad}))


@pytest.mark.parametrize("fields", [0, 14, 15, 16, 40, 65535, 65536])
def test_a_packed_batch_is_the_batch_packed(fields):
    """The daemon publishes events from their archived bodies: the bytes must
    be encode_batch's, whatever the size of each map's header."""
    records = []
    for n in (fields, 3):
        record = {"kind": "open", **{f"x{i}": i for i in range(n)}, "path": b"/\xff"}
        body = wire.pack(record)
        record["seq"] = 2 ** 40 + n
        assert wire.pack_with_last(body, "seq", record["seq"]) == wire.pack(record)
        records.append(record)
    packed = [wire.pack(r) for r in records]
    assert wire.encode_packed_batch("daemon", 7, packed) == wire.encode_batch("daemon", 7, records)
    assert wire.encode_packed_batch("daemon", 8, []) == wire.encode_batch("daemon", 8, [])
    assert wire.encode_packed_batch("daemon", 9, packed * 10) == wire.encode_batch("daemon", 9, records * 10)
    with pytest.raises(ValueError):
        wire.pack_with_last(wire.pack([1]), "seq", 1)
