"""Kernel records -> wire records, with ctypes classes standing in for BCC's.

BCC builds ctypes classes from bpf/agentwarden.h (the scratch maps' leaf types);
these hand-written ones mirror that header the same way (u64 -> c_ulonglong,
s32 -> c_int, char[N] -> c_char * N, nested structs as Structure fields). The
constants are read from the real header. test_classes_mirror_the_header keeps
the stand-ins honest about field names and order.
"""
from __future__ import annotations

import ctypes as ct
import re

import pytest

from agentwarden import wire
from agentwarden.probe.decode import Decoder, DecodeError, Layout
from agentwarden.headers import EVENT_HEADER, bpf_dir, header_constants

C = header_constants()
BOOT_TO_WALL = 1_700_000_000_000_000_000
from agentwarden.paths import AT_FDCWD


class AwHeader(ct.Structure):
    _fields_ = [("ts_ns", ct.c_ulonglong), ("cgroup_id", ct.c_ulonglong),
                ("agent_cgroup_id", ct.c_ulonglong), ("kind", ct.c_uint), ("pid", ct.c_uint),
                ("tgid", ct.c_uint), ("ppid", ct.c_uint), ("uid", ct.c_uint), ("gid", ct.c_uint),
                ("comm", ct.c_char * C["AW_COMM_LEN"])]


class AwExec(ct.Structure):
    _fields_ = [("h", AwHeader), ("ret", ct.c_longlong), ("dirfd", ct.c_int),
                ("at_flags", ct.c_uint), ("syscall", ct.c_uint), ("flags", ct.c_uint),
                ("argc", ct.c_uint), ("argv_len", ct.c_uint),
                ("deny_rule", ct.c_uint), ("real_argc", ct.c_uint),
                ("filename", ct.c_char * C["AW_MAX_PATH"]),
                ("exec_path", ct.c_char * C["AW_MAX_PATH"]),
                ("argv", ct.c_char * (C["AW_ARGV_BYTES"] + C["AW_ARG_MAX"]))]


class AwFile(ct.Structure):
    _fields_ = [("h", AwHeader), ("ret", ct.c_longlong), ("open_flags", ct.c_ulonglong),
                ("mode", ct.c_ulonglong), ("resolve", ct.c_ulonglong), ("dirfd", ct.c_int),
                ("syscall", ct.c_uint), ("flags", ct.c_uint), ("path_len", ct.c_uint),
                ("deny_rule", ct.c_uint), ("reserved", ct.c_uint),
                ("path", ct.c_char * C["AW_MAX_PATH"])]


class AwTask(ct.Structure):
    _fields_ = [("h", AwHeader), ("child_pid", ct.c_uint), ("reserved", ct.c_uint)]


class AwFd(ct.Structure):
    _fields_ = [("h", AwHeader), ("ret", ct.c_longlong), ("arg", ct.c_ulonglong), ("fd", ct.c_int),
                ("syscall", ct.c_uint), ("flags", ct.c_uint), ("reserved", ct.c_uint)]


class AwChange(ct.Structure):
    _fields_ = [("h", AwHeader), ("ret", ct.c_longlong), ("length", ct.c_longlong), ("dirfd", ct.c_int),
                ("dirfd2", ct.c_int), ("mode", ct.c_uint), ("new_uid", ct.c_int), ("new_gid", ct.c_int),
                ("at_flags", ct.c_uint), ("syscall", ct.c_uint), ("flags", ct.c_uint),
                ("path_len", ct.c_uint), ("path2_len", ct.c_uint), ("deny_rule", ct.c_uint),
                ("reserved", ct.c_uint), ("paths", ct.c_char * (2 * C["AW_MAX_PATH"]))]


class AwMove(ct.Structure):
    _fields_ = [("h", AwHeader), ("dst_cgroup_id", ct.c_ulonglong),
                ("dst_agent_cgroup_id", ct.c_ulonglong), ("moved_pid", ct.c_uint),
                ("flags", ct.c_uint), ("path_len", ct.c_uint), ("reserved", ct.c_uint),
                ("dst_path", ct.c_char * C["AW_CGROUP_PATH_MAX"])]


def _header_fields(struct_name: str) -> list[str]:
    text = (bpf_dir() / EVENT_HEADER).read_text()
    body = re.search(rf"struct {struct_name} \{{(.*?)\}};", text, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    return re.findall(r"(\w+)(?:\[[^\]]*\])?;", body)


@pytest.mark.parametrize("cls,name", [(AwHeader, "aw_header"), (AwExec, "aw_exec"),
                                      (AwFile, "aw_file"), (AwTask, "aw_task"), (AwFd, "aw_fd"),
                                      (AwChange, "aw_change"), (AwMove, "aw_move")])
def test_classes_mirror_the_header(cls, name):
    assert [f[0] for f in cls._fields_] == _header_fields(name)


def header(kind: int, **fields) -> AwHeader:
    h = AwHeader(ts_ns=123_456_789, cgroup_id=9001, agent_cgroup_id=9000, kind=kind, pid=4243,
                 tgid=4242, ppid=1, uid=1000, gid=1001, comm=b"python3")
    for name, value in fields.items():
        setattr(h, name, value)
    return h


TASK = {"time": BOOT_TO_WALL + 123_456_789, "pid": 4242, "tid": 4243, "ppid": 1, "uid": 1000,
        "gid": 1001, "comm": "python3", "cgroup_id": 9001, "agent_cgroup_id": 9000}


def exec_record(argv: bytes = b"ls\0-l\0", send: int | None = None, h: dict | None = None,
                **fields) -> bytes:
    """An aw_exec as the BPF program sends it: only argv_len bytes of argv."""
    e = AwExec(h=header(C["AW_KIND_EXEC"], **(h or {})), ret=0, dirfd=AT_FDCWD, at_flags=0,
               syscall=C["AW_SYS_EXECVE"], flags=C["AW_EXEC_SEEN_BY_KERNEL"],
               argc=argv.count(b"\0"), argv_len=len(argv), filename=b"/usr/bin/ls",
               exec_path=b"/usr/bin/ls")
    ct.memmove(ct.addressof(e) + AwExec.argv.offset, argv, len(argv))
    for name, value in fields.items():
        setattr(e, name, value)
    size = AwExec.argv.offset + len(argv) if send is None else send
    return bytes(e)[:size]


def file_record(kind: int = C["AW_KIND_OPEN"], path: bytes = b"/etc/passwd\0",
                send: int | None = None, **fields) -> bytes:
    """An aw_file as sent: only path_len bytes of path (path_len counts the NUL)."""
    f = AwFile(h=header(kind), ret=3, open_flags=0o2000101, mode=0o644, resolve=0,
               dirfd=AT_FDCWD, syscall=C["AW_SYS_OPENAT"], flags=0, path_len=len(path))
    ct.memmove(ct.addressof(f) + AwFile.path.offset, path, len(path))
    for name, value in fields.items():
        setattr(f, name, value)
    size = AwFile.path.offset + len(path) if send is None else send
    return bytes(f)[:size]


def task_record(kind: int, child_pid: int = 0) -> bytes:
    return bytes(AwTask(h=header(kind), child_pid=child_pid))


@pytest.fixture
def decoder() -> Decoder:
    return Decoder(AwExec, AwFile, AwTask, AwFd, AwChange, AwMove, C, BOOT_TO_WALL)


def test_layout_fixed_part_ends_where_the_tail_starts():
    exec_layout = Layout(AwExec, tail="argv")
    assert exec_layout.tail_offset == AwExec.argv.offset
    assert exec_layout.struct.size == AwExec.argv.offset
    assert exec_layout.offsets["kind"] == AwHeader.kind.offset
    assert exec_layout.offsets["filename"] == AwExec.filename.offset
    file_layout = Layout(AwFile, tail="path")
    assert file_layout.struct.size == file_layout.tail_offset == AwFile.path.offset
    task_layout = Layout(AwTask)
    assert task_layout.tail_offset is None
    assert task_layout.struct.size == ct.sizeof(AwTask)
    assert task_layout.names[:3] == ("ts_ns", "cgroup_id", "agent_cgroup_id")


def test_layout_rejects_a_missing_tail():
    with pytest.raises(DecodeError, match="AwTask has no field argv"):
        Layout(AwTask, tail="argv")


def test_exec(decoder):
    raw = exec_record(argv=b"ls\0-l\0\xff\xfe\0", syscall=C["AW_SYS_EXECVEAT"], dirfd=7,
                      at_flags=0x1000, exec_path=b"/usr/bin/\xff")
    assert len(raw) < ct.sizeof(AwExec)
    assert decoder.decode(raw) == {
        "kind": "exec", **TASK, "syscall": "execveat", "filename": "/usr/bin/ls",
        "exec_path": b"/usr/bin/\xff", "argv": ["ls", "-l", b"\xff\xfe"],
        "argv_truncated": False, "dirfd": 7, "at_flags": 0x1000, "ret": 0, "error": None,
        "died_before_return": False, "filename_unreadable": False, "filename_truncated": False,
        "killed_in_kernel": False, "kernel_rule": None, "not_approved": False}


def test_decoded_records_follow_the_wire_schema(decoder):
    records = [decoder.decode(exec_record()), decoder.decode(file_record()),
               decoder.decode(file_record(kind=C["AW_KIND_CHDIR"])),
               decoder.decode(task_record(C["AW_KIND_FORK"], 5)),
               decoder.decode(task_record(C["AW_KIND_EXIT"]))]
    for record in records:
        assert wire.validate_record(record) is record


@pytest.mark.parametrize("argv,expected", [
    (b"", []),
    (b"ls\0", ["ls"]),
    (b"a\0\0b\0", ["a", "", "b"]),
    (b"sh\0-c\0echo hi\0", ["sh", "-c", "echo hi"]),
    (b"ls\0--col", ["ls", "--col"]),   # cut mid-argument: no final NUL
    ("é\0".encode(), ["é"]),
])
def test_exec_argv_splitting(decoder, argv, expected):
    assert decoder.decode(exec_record(argv=argv))["argv"] == expected


def test_exec_argv_ignores_bytes_past_argv_len(decoder):
    raw = exec_record(argv=b"ls\0", send=ct.sizeof(AwExec))  # the whole struct sent
    raw = raw[:AwExec.argv.offset + 3] + b"junk\0" + raw[AwExec.argv.offset + 8:]
    assert decoder.decode(raw)["argv"] == ["ls"]


@pytest.mark.parametrize("flag,field", [
    ("AW_EXEC_ARGV_TRUNCATED", "argv_truncated"),
    ("AW_EXEC_DIED_BEFORE_RETURN", "died_before_return"),
    ("AW_EXEC_FILENAME_UNREADABLE", "filename_unreadable"),
    ("AW_EXEC_FILENAME_TRUNCATED", "filename_truncated"),
])
def test_exec_flags(decoder, flag, field):
    fields = ("argv_truncated", "died_before_return", "filename_unreadable", "filename_truncated")
    record = decoder.decode(exec_record(flags=C[flag] | C["AW_EXEC_SEEN_BY_KERNEL"]))
    assert {f: record[f] for f in fields} == {f: f == field for f in fields}


def test_exec_full_length_filename_without_nul(decoder):
    name = b"/" + b"a" * (C["AW_MAX_PATH"] - 1)
    record = decoder.decode(exec_record(filename=name, flags=C["AW_EXEC_FILENAME_TRUNCATED"]))
    assert record["filename"] == name.decode()
    assert record["filename_truncated"] is True


@pytest.mark.parametrize("ret,error", [
    (0, None), (3, None), (-2, "ENOENT"), (-13, "EACCES"), (-1, "EPERM"), (-4000, "E4000"),
])
def test_error_names_from_negative_ret(decoder, ret, error):
    record = decoder.decode(exec_record(ret=ret))
    assert (record["ret"], record["error"]) == (ret, error)
    record = decoder.decode(file_record(ret=ret))
    assert (record["ret"], record["error"]) == (ret, error)


def test_open(decoder):
    raw = file_record(path=b"/tmp/\xff.txt\0", ret=-13, syscall=C["AW_SYS_OPENAT2"],
                      resolve=0x8, flags=C["AW_FILE_OPENAT2"], dirfd=5)
    assert len(raw) == AwFile.path.offset + 11
    assert decoder.decode(raw) == {
        "kind": "open", **TASK, "syscall": "openat2", "path": b"/tmp/\xff.txt", "dirfd": 5,
        "flags": 0o2000101, "mode": 0o644, "resolve": 0x8, "ret": -13, "error": "EACCES",
        "path_unreadable": False, "path_truncated": False,
        "killed_in_kernel": False, "kernel_rule": None}


@pytest.mark.parametrize("fields", [
    {}, {"path": b"/tmp/\xff.txt\0", "ret": -13}, {"path": b"", "flags": C["AW_FILE_PATH_UNREADABLE"]},
    {"path": b"/" + b"x" * (C["AW_MAX_PATH"] - 2) + b"\0", "flags": C["AW_FILE_PATH_TRUNCATED"]},
    {"flags": C["AW_FILE_KILLED_IN_KERNEL"], "deny_rule": 7}, {"syscall": 99},
    {"flags": C["AW_FILE_FD_UNFOLLOWED"], "ret": 3}])
def test_the_open_fast_path_decodes_as_the_general_one(decoder, fields):
    """decode() takes a one-step path for opens: the same record, keys in the same order."""
    decoder.deny_rules[7] = "files.deny /etc/shadow"
    raw = file_record(**fields)
    fast, general = decoder.decode(raw), decoder.decode_general(raw, C["AW_KIND_OPEN"])
    assert fast == general and list(fast) == list(general)
    for cut in (AwFile.path.offset - 1, len(raw) - 1):   # short of the fixed part, of the path
        with pytest.raises(DecodeError) as fast_error:
            decoder.decode(raw[:cut])
        with pytest.raises(DecodeError) as general_error:
            decoder.decode_general(raw[:cut], C["AW_KIND_OPEN"])
        assert str(fast_error.value) == str(general_error.value)


@pytest.mark.parametrize("sys,name", [("AW_SYS_OPEN", "open"), ("AW_SYS_OPENAT", "openat"),
                                      ("AW_SYS_CREAT", "creat")])
def test_open_syscall_names(decoder, sys, name):
    assert decoder.decode(file_record(syscall=C[sys]))["syscall"] == name


def test_unknown_syscall_number_is_kept_as_text(decoder):
    assert decoder.decode(file_record(syscall=99))["syscall"] == "99"


def test_open_unreadable_path(decoder):
    raw = file_record(path=b"", flags=C["AW_FILE_PATH_UNREADABLE"])
    assert len(raw) == AwFile.path.offset
    record = decoder.decode(raw)
    assert (record["path"], record["path_unreadable"], record["path_truncated"]) == ("", True, False)


def test_open_truncated_path(decoder):
    path = b"/" + b"x" * (C["AW_MAX_PATH"] - 2) + b"\0"
    raw = file_record(path=path, flags=C["AW_FILE_PATH_TRUNCATED"])
    assert len(raw) == ct.sizeof(AwFile)
    record = decoder.decode(raw)
    assert record["path"] == path[:-1].decode()
    assert (record["path_unreadable"], record["path_truncated"]) == (False, True)


def test_open_path_stops_at_path_len_and_nul(decoder):
    raw = file_record(path=b"/a\0", send=ct.sizeof(AwFile))
    raw = raw[:AwFile.path.offset + 3] + b"/ignored" + raw[AwFile.path.offset + 11:]
    assert decoder.decode(raw)["path"] == "/a"


def test_chdir_and_fchdir(decoder):
    record = decoder.decode(file_record(kind=C["AW_KIND_CHDIR"], path=b"src\0",
                                        syscall=C["AW_SYS_CHDIR"], ret=0))
    assert record == {"kind": "chdir", **TASK, "syscall": "chdir", "path": "src",
                      "dirfd": AT_FDCWD, "ret": 0, "error": None, "path_unreadable": False,
                      "path_truncated": False}
    record = decoder.decode(file_record(kind=C["AW_KIND_CHDIR"], path=b"", dirfd=5,
                                        syscall=C["AW_SYS_FCHDIR"], ret=-9))
    assert (record["syscall"], record["path"], record["dirfd"], record["error"]) == \
        ("fchdir", "", 5, "EBADF")


def test_fork_and_exit(decoder):
    assert decoder.decode(task_record(C["AW_KIND_FORK"], child_pid=4250)) == \
        {"kind": "fork", **TASK, "child_pid": 4250}
    assert decoder.decode(task_record(C["AW_KIND_EXIT"])) == {"kind": "exit", **TASK}


@pytest.mark.parametrize("sys,name,fd,arg,ret,flags", [
    ("AW_SYS_FCNTL_DUPFD_CLOEXEC", "fcntl_dupfd_cloexec", 3, 3, 4, "AW_FD_CLOEXEC"),
    ("AW_SYS_DUP2", "dup2", 5, 0, 0, None),
    ("AW_SYS_CLOSE", "close", 7, 0, 0, None),
    ("AW_SYS_CLOSE_RANGE", "close_range", 3, 0xFFFFFFFF, 0, None),
    ("AW_SYS_PIDFD_GETFD", "pidfd_getfd", 6, 9, 10, "AW_FD_CLOEXEC"),
])
def test_fd(decoder, sys, name, fd, arg, ret, flags):
    raw = bytes(AwFd(h=header(C["AW_KIND_FD"]), ret=ret, arg=arg, fd=fd, syscall=C[sys],
                     flags=C[flags] if flags else 0))
    assert decoder.decode(raw) == {
        "kind": "fd", **TASK, "syscall": name, "fd": fd, "arg": arg, "ret": ret,
        "error": None, "cloexec": flags is not None}
    wire.validate_record(decoder.decode(raw))


def change_record(syscall: str, path: bytes, path2: bytes = b"", send: int | None = None, **fields) -> bytes:
    """An aw_change as sent: path, then path2, packed (each length counts its NUL)."""
    e = AwChange(h=header(C["AW_KIND_CHANGE"]), ret=0, dirfd=AT_FDCWD, dirfd2=AT_FDCWD, new_uid=-1,
                 new_gid=-1, syscall=C[f"AW_SYS_{syscall.upper()}"], path_len=len(path), path2_len=len(path2))
    ct.memmove(ct.addressof(e) + AwChange.paths.offset, path + path2, len(path + path2))
    for name, value in fields.items():
        setattr(e, name, value)
    size = AwChange.paths.offset + len(path + path2) if send is None else send
    return bytes(e)[:size]


CHANGE = {"dirfd": AT_FDCWD, "dirfd2": AT_FDCWD, "mode": 0, "new_uid": -1, "new_gid": -1, "length": 0,
          "at_flags": 0, "ret": 0, "error": None, "path_unreadable": False, "path_truncated": False,
          "path2_unreadable": False, "path2_truncated": False, "killed_in_kernel": False, "kernel_rule": None}


def test_change_with_two_paths(decoder):
    record = decoder.decode(change_record("renameat2", b"old\0", b"/tmp/new\0", dirfd=5, at_flags=1))
    assert record == {"kind": "change", **TASK, **CHANGE, "syscall": "renameat2", "path": "old",
                      "path2": "/tmp/new", "dirfd": 5, "at_flags": 1}
    wire.validate_record(record)


def test_change_of_an_fd_and_a_failed_one(decoder):
    record = decoder.decode(change_record("fchmod", b"", dirfd=7, mode=0o755, ret=-1))
    assert record == {"kind": "change", **TASK, **CHANGE, "syscall": "fchmod", "path": "", "path2": "",
                      "dirfd": 7, "mode": 0o755, "ret": -1, "error": "EPERM"}


def test_change_path_unreadable_then_path2_and_a_kernel_kill(decoder):
    decoder.deny_rules = {77: 'files.deny "/etc/x" at p.toml:3'}
    record = decoder.decode(change_record(
        "link", b"", b"/etc/x\0", deny_rule=77,
        flags=C["AW_FILE_PATH_UNREADABLE"] | C["AW_FILE_KILLED_IN_KERNEL"]))
    assert (record["path"], record["path2"], record["path_unreadable"]) == ("", "/etc/x", True)
    assert record["killed_in_kernel"] and record["kernel_rule"] == 'files.deny "/etc/x" at p.toml:3'


def test_change_cut_inside_its_paths(decoder):
    with pytest.raises(DecodeError, match="paths"):
        decoder.decode(change_record("rename", b"/a\0", b"/b\0")[:-1])


def test_sidedoor_travels_as_a_file_record(decoder):
    raw = file_record(kind=C["AW_KIND_SIDEDOOR"], path=b"", syscall=C["AW_SYS_IO_URING_SETUP"],
                      open_flags=8, mode=C["AW_SIDEDOOR_IO_URING"], ret=5,
                      flags=C["AW_FILE_KILLED_IN_KERNEL"])
    record = decoder.decode(raw)
    assert record == {"kind": "sidedoor", **TASK, "syscall": "io_uring_setup", "door": "io_uring",
                      "fd": AT_FDCWD, "arg": 8, "path": "", "ret": 5, "error": None,
                      "path_unreadable": False, "path_truncated": False, "killed_in_kernel": True,
                      "kernel_rule": "syscalls.allow without 'io_uring'"}
    wire.validate_record(record)


def test_comm_non_utf8_and_full_length(decoder):
    raw = bytearray(task_record(C["AW_KIND_EXIT"]))
    raw[AwHeader.comm.offset:AwHeader.comm.offset + 16] = b"\xff" + b"c" * 15
    assert decoder.decode(bytes(raw))["comm"] == b"\xff" + b"c" * 15


@pytest.mark.parametrize("kind", [0, C["AW_KIND_COUNT"], 0xFFFFFFFF])
def test_unknown_kind(decoder, kind):
    raw = bytes(AwTask(h=header(kind)))
    with pytest.raises(DecodeError, match=f"unknown record kind {kind}"):
        decoder.decode(raw)


@pytest.mark.parametrize("size", [0, 1, AwHeader.kind.offset, AwHeader.kind.offset + 3])
def test_too_short_to_hold_a_kind(decoder, size):
    with pytest.raises(DecodeError, match=f"record of {size} bytes is too short"):
        decoder.decode(task_record(C["AW_KIND_FORK"])[:size])


@pytest.mark.parametrize("raw,fixed", [
    (task_record(C["AW_KIND_FORK"])[:-1], ct.sizeof(AwTask)),
    (task_record(C["AW_KIND_EXIT"])[:AwHeader.kind.offset + 4], ct.sizeof(AwTask)),
    (exec_record()[:AwExec.argv.offset - 1], AwExec.argv.offset),
    (file_record()[:AwFile.path.offset - 1], AwFile.path.offset),
    (file_record(kind=C["AW_KIND_CHDIR"])[:64], AwFile.path.offset),
])
def test_shorter_than_the_fixed_part(decoder, raw, fixed):
    with pytest.raises(DecodeError, match=f"record of {len(raw)} bytes, expected at least {fixed}"):
        decoder.decode(raw)


def test_tail_shorter_than_its_length_field(decoder):
    """A record cut inside its tail would pass a cut path off as complete."""
    with pytest.raises(DecodeError, match="path"):
        decoder.decode(file_record(path=b"/etc/passwd\0")[:-3])
    with pytest.raises(DecodeError, match="argv"):
        decoder.decode(exec_record(argv=b"rm\0-rf\0/tmp/x\0")[:-4])


def test_length_field_beyond_the_tail_is_capped_like_the_kernel_does(decoder):
    # the BPF program sends at most sizeof(path) / sizeof(argv) bytes of the tail
    path = b"/" + b"y" * (C["AW_MAX_PATH"] - 1)
    raw = file_record(path=path, path_len=C["AW_MAX_PATH"] + 100,
                      flags=C["AW_FILE_PATH_TRUNCATED"])
    assert len(raw) == ct.sizeof(AwFile)
    assert decoder.decode(raw)["path"] == path.decode()
    argv = b"a\0" * ((C["AW_ARGV_BYTES"] + C["AW_ARG_MAX"]) // 2)
    raw = exec_record(argv=argv, argv_len=len(argv) + 100, flags=C["AW_EXEC_ARGV_TRUNCATED"])
    record = decoder.decode(raw)
    assert record["argv"] == ["a"] * (len(argv) // 2)
    assert record["argv_truncated"] is True


def move_record(path: bytes = b"/escape\0", flags: int = 0, **fields) -> bytes:
    """An aw_move as sent: only path_len bytes of dst_path."""
    m = AwMove(h=header(C["AW_KIND_MOVE"]), dst_cgroup_id=777, dst_agent_cgroup_id=0,
               moved_pid=4242, flags=flags, path_len=len(path))
    ct.memmove(ct.addressof(m) + AwMove.dst_path.offset, path, len(path))
    for name, value in fields.items():
        setattr(m, name, value)
    return bytes(m)[:AwMove.dst_path.offset + len(path)]


def test_move_out_killed_in_the_kernel(decoder):
    record = decoder.decode(move_record(flags=C["AW_MOVE_LEFT"] | C["AW_MOVE_KILLED_IN_KERNEL"]))
    assert record == {**TASK, "kind": "move", "moved_pid": 4242, "dst_cgroup_id": 777,
                      "dst_agent_cgroup_id": 0, "dst_path": "/escape", "dst_path_truncated": False,
                      "left": True, "killed_in_kernel": True,
                      "kernel_rule": "on-violation kill: leaving the agent's cgroups",
                      "kill_pending": False, "born_by_clone3": False}
    wire.validate_record(record)


def test_move_within_the_agent(decoder):
    record = decoder.decode(move_record(path=b"/agents/a/sub\0", dst_agent_cgroup_id=9000))
    assert not record["left"] and record["kernel_rule"] is None
    assert record["dst_agent_cgroup_id"] == 9000 and record["dst_path"] == "/agents/a/sub"
    with pytest.raises(DecodeError, match="dst_path"):
        decoder.decode(move_record()[:-2])


def test_unfollowed_fds_are_said_so_and_only_then(decoder):
    """An open or copy whose new fd is one the resolver does not follow (its closes
    and copies skipped in the kernel) carries fd_unfollowed; others have no such key."""
    opened = decoder.decode(file_record(ret=3, flags=C["AW_FILE_FD_UNFOLLOWED"]))
    assert opened["fd_unfollowed"] is True
    assert "fd_unfollowed" not in decoder.decode(file_record(ret=3))
    copied = bytes(AwFd(h=header(C["AW_KIND_FD"]), ret=4, fd=3, syscall=C["AW_SYS_DUP"],
                        flags=C["AW_FD_UNFOLLOWED"]))
    assert decoder.decode(copied)["fd_unfollowed"] is True
    assert not decoder.decode(copied)["cloexec"]
    wire.validate_record(decoder.decode(copied))
    wire.validate_record(opened)
