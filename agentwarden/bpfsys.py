"""The few bpf(2) calls the daemon needs on a map the probe pinned: open it by
path and look up, update or delete one element. Plain syscalls, so the daemon does not
load BCC."""
from __future__ import annotations

import ctypes
import os
import platform
import subprocess
from pathlib import Path

from .errors import AgentwardenError

SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_ANY = 0
BPFFS = Path("/sys/fs/bpf")
# The probe pins these under bpf_pin_dir for the supervisor, which writes
# approved session execs into the first two (approved_exec by bpf(),
# approval_slots through the fast path's shared mapping) and reads waiting
# execs' filenames from the third (the fast path's mapping too).
SUPERVISOR_MAPS = ("approved_exec", "approval_slots", "exec_stash")
# ... and this one: the interpreters of an approved session exec (a script),
# written by bpf() before the exec continues.
INTERPRETER_MAP = "approved_interpreters"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MapElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("key", ctypes.c_uint64), ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32),
                ("file_flags", ctypes.c_uint32)]


def _bpf(cmd: int, attr) -> int:
    ret = _libc.syscall(SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def ensure_bpffs() -> None:
    if os.path.ismount(BPFFS):
        return
    BPFFS.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS)], capture_output=True, text=True)
    if result.returncode != 0:
        raise AgentwardenError(f"cannot mount bpffs at {BPFFS} ({result.stderr.strip()}); "
                               f"fix: mount -t bpf bpf {BPFFS}")


def pin(fd: int, path: Path) -> None:
    ensure_bpffs()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists():
        path.unlink()  # a previous probe's map
    name = ctypes.create_string_buffer(os.fsencode(path))
    _bpf(BPF_OBJ_PIN, _ObjAttr(ctypes.addressof(name), fd, 0))


def open_pinned(path: Path) -> int:
    name = ctypes.create_string_buffer(os.fsencode(path))
    return _bpf(BPF_OBJ_GET, _ObjAttr(ctypes.addressof(name), 0, 0))


def lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value_size)
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, _MapElemAttr(fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0))
    except FileNotFoundError:
        return None
    return v.raw


def update(fd: int, key: bytes, value: bytes) -> None:
    k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value, len(value))
    _bpf(BPF_MAP_UPDATE_ELEM, _MapElemAttr(fd, 0, ctypes.addressof(k), ctypes.addressof(v), BPF_ANY))


def delete(fd: int, key: bytes) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    try:
        _bpf(BPF_MAP_DELETE_ELEM, _MapElemAttr(fd, 0, ctypes.addressof(k), 0, 0))
    except FileNotFoundError:
        pass
