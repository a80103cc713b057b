"""Kernel records -> wire records.

The record layouts are not retyped here: they come from the ctypes classes BCC
builds from agentwarden.h (the scratch maps' leaf types), turned once into
``struct.Struct`` formats for fast unpacking. Constants come from the header.
"""
from __future__ import annotations

import ctypes as ct
import errno
import operator
import struct
from typing import Any, Iterator

from agentwarden import wire
from agentwarden.wire import from_c


class DecodeError(ValueError):
    pass


# What kills in the kernel a process that leaves its agent's cgroups (AW_POLICY_KILL_ON_LEAVE).
LEAVE_RULE = "on-violation kill: leaving the agent's cgroups"


def _flatten(cls, base: int = 0) -> Iterator[tuple[str, int, Any]]:
    """(name, offset, ctype) of every leaf field; nested structs are inlined."""
    for name, ftype, *_ in cls._fields_:
        offset = base + getattr(cls, name).offset
        if issubclass(ftype, ct.Structure):
            yield from _flatten(ftype, offset)
        else:
            yield name, offset, ftype


def _struct_code(ftype) -> str:
    if issubclass(ftype, ct.Array):
        if ftype._type_ is not ct.c_char:
            raise DecodeError(f"unsupported array field type {ftype}")
        return f"{ftype._length_}s"
    code = {1: "b", 2: "h", 4: "i", 8: "q"}[ct.sizeof(ftype)]
    signed = ftype._type_.islower() and ftype._type_ != "c"
    return code if signed else code.upper()


class Layout:
    """The fixed part of one record type as a struct.Struct, plus where its
    variable-length tail (a char array sent only as far as it is used) starts."""

    def __init__(self, cls, tail: str | None = None):
        fmt, pos, names = "<", 0, []
        self.tail_offset = None
        self.tail_size = 0
        self.offsets = {}
        for name, offset, ftype in sorted(_flatten(cls), key=lambda f: f[1]):
            self.offsets[name] = offset
            if name == tail:
                self.tail_offset = offset
                self.tail_size = ct.sizeof(ftype)
                break
            if offset > pos:
                fmt += f"{offset - pos}x"
            fmt += _struct_code(ftype)
            names.append(name)
            pos = offset + ct.sizeof(ftype)
        if tail is not None and self.tail_offset is None:
            raise DecodeError(f"{cls.__name__} has no field {tail}")
        self.struct = struct.Struct(fmt)
        self.names = tuple(names)

    def unpack(self, raw: bytes) -> dict[str, Any]:
        if len(raw) < self.struct.size:
            raise DecodeError(f"record of {len(raw)} bytes, expected at least {self.struct.size}")
        return dict(zip(self.names, self.struct.unpack_from(raw)))

    def tail(self, raw: bytes, name: str, length: int) -> bytes:
        """The first `length` bytes of the tail (the kernel sends at most its size);
        a record cut short of them is an error, not a shorter path or argv."""
        end = self.tail_offset + min(length, self.tail_size)
        if len(raw) < end:
            raise DecodeError(f"record of {len(raw)} bytes, but its {name} needs {end}")
        return raw[self.tail_offset:end]


def _cstr(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


def _error(ret: int) -> str | None:
    return errno.errorcode.get(-ret, f"E{-ret}") if ret < 0 else None


class Decoder:
    def __init__(self, exec_cls, file_cls, task_cls, fd_cls, change_cls, move_cls, constants: dict[str, int],
                 boot_to_wall_ns: int):
        c = constants
        self.c = c
        self.boot_to_wall_ns = boot_to_wall_ns
        exec_layout = Layout(exec_cls, tail="argv")
        file_layout = Layout(file_cls, tail="path")
        task_layout = Layout(task_cls)
        self.kind_offset = task_layout.offsets["kind"]
        self.layouts = {
            c["AW_KIND_EXEC"]: (exec_layout, self._exec),
            c["AW_KIND_OPEN"]: (file_layout, self._open),
            c["AW_KIND_CHDIR"]: (file_layout, self._chdir),
            c["AW_KIND_FORK"]: (task_layout, self._fork),
            c["AW_KIND_EXIT"]: (task_layout, self._exit),
            c["AW_KIND_FD"]: (Layout(fd_cls), self._fd),
            c["AW_KIND_CHANGE"]: (Layout(change_cls, tail="paths"), self._change),
            c["AW_KIND_SIDEDOOR"]: (file_layout, self._sidedoor),
            c["AW_KIND_MOVE"]: (Layout(move_cls, tail="dst_path"), self._move),
        }
        self.kind_names = {c[f"AW_KIND_{n.upper()}"]: n for n in wire.EVENT_KINDS}
        self.open_kind = c["AW_KIND_OPEN"]
        self._open_fields = file_layout.struct, operator.itemgetter(*(file_layout.names.index(name) for name in (
            "ts_ns", "tgid", "pid", "ppid", "uid", "gid", "comm", "cgroup_id", "agent_cgroup_id", "syscall",
            "path_len", "dirfd", "ret", "flags", "open_flags", "mode", "resolve", "deny_rule"))), file_layout
        # In-kernel deny rule number -> its text; the probe keeps it current.
        self.deny_rules: dict[int, str] = {}
        self.syscalls = {v: k[len("AW_SYS_"):].lower() for k, v in c.items() if k.startswith("AW_SYS_")}
        self.doors = {v: k[len("AW_SIDEDOOR_"):].lower() for k, v in c.items() if k.startswith("AW_SIDEDOOR_")}

    def decode(self, raw: bytes) -> dict[str, Any]:
        if len(raw) < self.kind_offset + 4:
            raise DecodeError(f"record of {len(raw)} bytes is too short")
        kind = struct.unpack_from("<I", raw, self.kind_offset)[0]
        if kind == self.open_kind:
            return self._decode_open(raw)
        return self.decode_general(raw, kind)

    def decode_general(self, raw: bytes, kind: int) -> dict[str, Any]:
        """decode() through a record type's layout and builder (every kind; an
        open takes _decode_open, which must give the same)."""
        entry = self.layouts.get(kind)
        if entry is None:
            raise DecodeError(f"unknown record kind {kind}")
        layout, build = entry
        f = layout.unpack(raw)
        record = {
            "kind": self.kind_names[kind],
            "time": f["ts_ns"] + self.boot_to_wall_ns,
            "pid": f["tgid"], "tid": f["pid"], "ppid": f["ppid"],
            "uid": f["uid"], "gid": f["gid"], "comm": from_c(_cstr(f["comm"])),
            "cgroup_id": f["cgroup_id"], "agent_cgroup_id": f["agent_cgroup_id"],
        }
        build(record, f, raw, layout)
        return record

    def _decode_open(self, raw: bytes) -> dict[str, Any]:
        """decode() of an open, the most frequent record, in one step: the
        same record as the general path (same keys, same order), without its
        intermediate field map."""
        file_struct, fields, layout = self._open_fields
        if len(raw) < file_struct.size:
            raise DecodeError(f"record of {len(raw)} bytes, expected at least {file_struct.size}")
        (ts_ns, tgid, pid, ppid, uid, gid, comm, cgroup_id, agent_cgroup_id, syscall, path_len, dirfd, ret,
         flags, open_flags, mode, resolve, rule) = fields(file_struct.unpack_from(raw))
        path_end = layout.tail_offset + min(path_len, layout.tail_size)
        if len(raw) < path_end:
            raise DecodeError(f"record of {len(raw)} bytes, but its path needs {path_end}")
        c = self.c
        killed = bool(flags & c["AW_FILE_KILLED_IN_KERNEL"])
        record = {
            "kind": "open", "time": ts_ns + self.boot_to_wall_ns,
            "pid": tgid, "tid": pid, "ppid": ppid, "uid": uid, "gid": gid, "comm": from_c(_cstr(comm)),
            "cgroup_id": cgroup_id, "agent_cgroup_id": agent_cgroup_id,
            "syscall": self.syscalls.get(syscall, str(syscall)),
            "path": from_c(_cstr(raw[layout.tail_offset:path_end])),
            "dirfd": dirfd, "ret": ret, "error": _error(ret),
            "path_unreadable": bool(flags & c["AW_FILE_PATH_UNREADABLE"]),
            "path_truncated": bool(flags & c["AW_FILE_PATH_TRUNCATED"]),
            "flags": open_flags, "mode": mode, "resolve": resolve,
            "killed_in_kernel": killed,
            "kernel_rule": self.deny_rules.get(rule, f"kernel rule {rule}") if killed else None,
        }
        if flags & c["AW_FILE_FD_UNFOLLOWED"]:
            record["fd_unfollowed"] = True
        return record

    def _exec(self, record, f, raw, layout):
        c, flags = self.c, f["flags"]
        argv = layout.tail(raw, "argv", f["argv_len"]).split(b"\0")
        if argv and argv[-1] == b"":
            argv.pop()
        record.update({
            "syscall": self.syscalls.get(f["syscall"], str(f["syscall"])),
            "filename": from_c(_cstr(f["filename"])),
            "exec_path": from_c(_cstr(f["exec_path"])),
            "argv": [from_c(a) for a in argv],
            "argv_truncated": bool(flags & c["AW_EXEC_ARGV_TRUNCATED"]),
            "dirfd": f["dirfd"], "at_flags": f["at_flags"],
            "ret": f["ret"], "error": _error(f["ret"]),
            "died_before_return": bool(flags & c["AW_EXEC_DIED_BEFORE_RETURN"]),
            "filename_unreadable": bool(flags & c["AW_EXEC_FILENAME_UNREADABLE"]),
            "filename_truncated": bool(flags & c["AW_EXEC_FILENAME_TRUNCATED"]),
            **self._kernel_kill(f, c["AW_EXEC_KILLED_IN_KERNEL"]),
            "not_approved": bool(flags & c["AW_EXEC_NOT_APPROVED"]),
        })

    def _kernel_kill(self, f, killed_flag: int) -> dict[str, Any]:
        killed = bool(f["flags"] & killed_flag)
        rule = self.deny_rules.get(f["deny_rule"], f"kernel rule {f['deny_rule']}") if killed else None
        return {"killed_in_kernel": killed, "kernel_rule": rule}

    def _file_common(self, record, f, raw, layout):
        c, flags = self.c, f["flags"]
        path = layout.tail(raw, "path", f["path_len"])
        record.update({
            "syscall": self.syscalls.get(f["syscall"], str(f["syscall"])),
            "path": from_c(_cstr(path)),
            "dirfd": f["dirfd"], "ret": f["ret"], "error": _error(f["ret"]),
            "path_unreadable": bool(flags & c["AW_FILE_PATH_UNREADABLE"]),
            "path_truncated": bool(flags & c["AW_FILE_PATH_TRUNCATED"]),
        })

    def _open(self, record, f, raw, layout):
        self._file_common(record, f, raw, layout)
        record.update({"flags": f["open_flags"], "mode": f["mode"], "resolve": f["resolve"],
                       **self._kernel_kill(f, self.c["AW_FILE_KILLED_IN_KERNEL"])})
        if f["flags"] & self.c["AW_FILE_FD_UNFOLLOWED"]:
            record["fd_unfollowed"] = True

    def _chdir(self, record, f, raw, layout):
        self._file_common(record, f, raw, layout)

    def _fork(self, record, f, raw, layout):
        record["child_pid"] = f["child_pid"]

    def _exit(self, record, f, raw, layout):
        pass

    def _fd(self, record, f, raw, layout):
        record.update({
            "syscall": self.syscalls.get(f["syscall"], str(f["syscall"])),
            "fd": f["fd"], "arg": f["arg"], "ret": f["ret"], "error": _error(f["ret"]),
            "cloexec": bool(f["flags"] & self.c["AW_FD_CLOEXEC"]),
        })
        if f["flags"] & self.c["AW_FD_UNFOLLOWED"]:
            record["fd_unfollowed"] = True

    def _change(self, record, f, raw, layout):
        c, flags = self.c, f["flags"]
        paths = layout.tail(raw, "paths", f["path_len"] + f["path2_len"])
        record.update({
            "syscall": self.syscalls.get(f["syscall"], str(f["syscall"])),
            "path": from_c(_cstr(paths[:f["path_len"]])), "dirfd": f["dirfd"],
            "path2": from_c(_cstr(paths[f["path_len"]:])), "dirfd2": f["dirfd2"],
            "mode": f["mode"], "new_uid": f["new_uid"], "new_gid": f["new_gid"], "length": f["length"],
            "at_flags": f["at_flags"], "ret": f["ret"], "error": _error(f["ret"]),
            "path_unreadable": bool(flags & c["AW_FILE_PATH_UNREADABLE"]),
            "path_truncated": bool(flags & c["AW_FILE_PATH_TRUNCATED"]),
            "path2_unreadable": bool(flags & c["AW_CHANGE_PATH2_UNREADABLE"]),
            "path2_truncated": bool(flags & c["AW_CHANGE_PATH2_TRUNCATED"]),
            **self._kernel_kill(f, c["AW_FILE_KILLED_IN_KERNEL"]),
        })

    def _sidedoor(self, record, f, raw, layout):
        """A side door travels in an aw_file: mode holds its AW_SIDEDOOR_* bit,
        open_flags its flags argument (see agentwarden.h)."""
        self._file_common(record, f, raw, layout)
        door = self.doors.get(f["mode"], str(f["mode"]))
        killed = bool(f["flags"] & self.c["AW_FILE_KILLED_IN_KERNEL"])
        record.update({"door": door, "fd": record.pop("dirfd"), "arg": f["open_flags"],
                       "killed_in_kernel": killed,
                       "kernel_rule": f"syscalls.allow without {door!r}" if killed else None})

    def _move(self, record, f, raw, layout):
        c, flags = self.c, f["flags"]
        killed = bool(flags & c["AW_MOVE_KILLED_IN_KERNEL"])
        record.update({
            "moved_pid": f["moved_pid"], "dst_cgroup_id": f["dst_cgroup_id"],
            "dst_agent_cgroup_id": f["dst_agent_cgroup_id"],
            "dst_path": from_c(_cstr(layout.tail(raw, "dst_path", f["path_len"]))),
            "dst_path_truncated": bool(flags & c["AW_MOVE_PATH_TRUNCATED"]),
            "left": bool(flags & c["AW_MOVE_LEFT"]),
            "killed_in_kernel": killed,
            "kernel_rule": LEAVE_RULE if killed else None,
            "kill_pending": bool(flags & c["AW_MOVE_KILL_PENDING"]),
            "born_by_clone3": bool(flags & c["AW_MOVE_AT_CLONE"]),
        })
