"""Paths as the kernel's syscalls take them, and their lexical normal form.

Policy rules, the daemon's process model and the session supervisor all
compare normalised absolute paths; this is the one definition of that form.
"""
from __future__ import annotations

import ctypes
import struct

AT_FDCWD = -100          # dirfd meaning "relative to the working directory"
AT_EMPTY_PATH = 0x1000   # *at() flag: act on dirfd itself when the path is ""

SYS_OPENAT2 = 437             # the same number on every architecture (Linux 5.6)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_IN_ROOT = 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def open_how(flags: int, mode: int = 0, resolve: int = 0) -> bytes:
    """openat2's struct open_how."""
    return struct.pack("=QQQ", flags, mode, resolve)


def openat2(dirfd: int, path: bytes, how: bytes) -> int:
    """openat2(2), which the os module lacks: the new fd, or -1 with the
    error in ctypes.get_errno() (callers tell ENOSYS -- a seccomp filter
    barring it -- ELOOP and the rest apart)."""
    return _libc.syscall(SYS_OPENAT2, dirfd, path, how, len(how))


def normalise(path: str) -> str:
    """Lexical normalisation of an absolute path; keeps no '//' prefix."""
    if path[:1] == "/" and "//" not in path and "/." not in path and (path == "/" or path[-1] != "/"):
        return path   # already normal (most are): no empty, '.' or '..' component
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
        else:
            parts.append(part)
    return "/" + "/".join(parts)
