"""The notification reader: what a notified syscall asks for, read from the
task's memory (/proc/PID/mem) and resolved against its cwd or directory fds,
as the events `policy.decide` understands."""
from __future__ import annotations

import ctypes
import errno
import os
import re
import stat
from dataclasses import dataclass

from agentwarden import seccomp_notify as sn
from agentwarden.paths import (AT_EMPTY_PATH, AT_FDCWD, RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS, normalise,
                               open_how, openat2)

from .. import fastpath
from ..resolver import proc_link

MAX_ARGS = 4096
AT_SYMLINK_NOFOLLOW = 0x100
# Lookup failures that are the kernel's answer to the exec whoever asks (root
# included): the supervisor seeing one means the task's exec would fail so too.
NOT_THERE = (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG)


@dataclass
class Request:
    """What a notified syscall asks for, as events `decide` understands."""
    action: str                 # one line for people
    key: tuple                  # the same action by the same agent: remember / retry
    events: list[dict]
    exec_form: bytes | None     # exec: the filename in the kernel's own form
    fast_key: bytes | None = None   # what the fast path can repeat once allowed
    syscall: str = ""
    raw_paths: tuple[bytes, ...] = ()   # the path arguments as the task passed them
    flags: int = 0                      # an open's flags
    dirfds: tuple[int, ...] = ()        # each path's directory fd (AT_FDCWD: the cwd)
    bases: tuple[str | None, ...] = ()  # what each relative path was joined to when checked
    how: tuple[int, int, int] | None = None   # openat2: flags, mode, resolve as read
    interpreters: tuple[bytes, ...] = ()      # exec: what its interpreters put in front of argv
    exec_error: int | None = None             # exec: the kernel will fail it so (interpreters.py)


def read(agent: str, n: sn.Notification, name: str) -> Request | None:
    """The request of notification n (syscall name) by a task of agent; None
    when its arguments cannot be read."""
    try:
        with sn.TaskMemory(n.pid) as mem:
            return _read_request(agent, n, name, mem)
    except OSError:
        return None


def start_link(pid: int, dirfd: int) -> str:
    """The /proc link of the directory a relative path of pid's starts from:
    its cwd, or its directory fd."""
    return f"/proc/{pid}/" + ("cwd" if dirfd == AT_FDCWD else f"fd/{dirfd}")


def _base(pid: int, dirfd: int) -> str | None:
    return proc_link(pid, "cwd" if dirfd == AT_FDCWD else f"fd/{dirfd}")


def _resolve(pid: int, dirfd: int, raw: bytes) -> str | None:
    return _join(raw, None if raw.startswith(b"/") else _base(pid, dirfd), pid)


def _join(raw: bytes, base: str | None, pid: int) -> str | None:
    """raw as checked: absolute, or joined to base (None: unknown); pid's own
    /proc/self/fd/N is the file that fd names."""
    path = os.fsdecode(raw)
    own_fd = re.fullmatch(r"/proc/(?:self|thread-self)/fd/(\d+)", path)
    if own_fd:   # glibc changes files through O_PATH fds this way: the file the fd names
        return proc_link(pid, f"fd/{own_fd[1]}")
    if path.startswith("/"):
        return normalise(path)
    if base is None:
        return None
    return normalise(base + "/" + path) if path else normalise(base)


def _int(value: int) -> int:
    """A syscall's int argument from its 64-bit register."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _read_request(agent: str, n: sn.Notification, name: str, mem: sn.TaskMemory) -> Request | None:
    a = n.args
    if name in ("execve", "execveat"):
        dirfd, fn_ptr, argv_ptr, flags = ((AT_FDCWD, a[0], a[1], 0) if name == "execve"
                                          else (_int(a[0]), a[1], a[2], a[4]))
        raw = mem.string(fn_ptr)
        # One more than is read: a longer argv is judged as cut short (see policy.py).
        pointers = mem.pointers(argv_ptr, MAX_ARGS + 1) if argv_ptr else []
        if raw is None or pointers is None:
            return None
        truncated = len(pointers) > MAX_ARGS
        argv = [mem.string(p) for p in pointers[:MAX_ARGS]]
        if any(arg is None for arg in argv):
            return None
        if raw.startswith(b"/") or dirfd == AT_FDCWD:
            form = raw
        elif raw == b"" and flags & AT_EMPTY_PATH:
            form = f"/dev/fd/{dirfd}".encode()
        else:
            form = f"/dev/fd/{dirfd}/".encode() + raw
        resolved = _resolve(n.pid, dirfd, raw)
        argv_text = [os.fsdecode(x) for x in argv]
        event = {"kind": "exec", "agent": agent, "resolved_filename": resolved,
                 "exec_path": "", "argv": argv_text, "argv_truncated": truncated, "ret": 0}
        shown = " ".join(argv_text) + (" ..." if truncated else "") + f" ({resolved or os.fsdecode(raw)})"
        repeatable = name == "execve" and raw.startswith(b"/") and argv_ptr and not truncated
        return Request(f"exec {shown}", ("exec", resolved, tuple(argv_text), truncated), [event], form,
                       fastpath.exec_key(agent, raw, argv) if repeatable else None, name, (raw,))
    paths: list[tuple[int, int, int]] = []   # (dirfd, pointer, open flags)
    write = os.O_WRONLY
    if name == "open":
        paths = [(AT_FDCWD, a[0], _int(a[1]))]
    elif name == "openat":
        paths = [(_int(a[0]), a[1], _int(a[2]))]
    elif name == "openat2":
        how = mem.u64s(a[2], 3) if a[3] >= 24 else mem.u64s(a[2], 1)
        if how is None:
            return None
        paths = [(_int(a[0]), a[1], how[0])]
    elif name == "creat":
        paths = [(AT_FDCWD, a[0], os.O_CREAT | os.O_WRONLY | os.O_TRUNC)]
    elif name == "rename":
        paths = [(AT_FDCWD, a[0], write), (AT_FDCWD, a[1], write)]
    elif name in ("renameat", "renameat2"):
        paths = [(_int(a[0]), a[1], write), (_int(a[2]), a[3], write)]
    elif name == "unlink" or name == "truncate":
        paths = [(AT_FDCWD, a[0], write)]
    elif name == "unlinkat":
        paths = [(_int(a[0]), a[1], write)]
    elif name in ("chmod", "chown", "lchown"):
        paths = [(AT_FDCWD, a[0], write)]
    elif name in ("fchmodat", "fchmodat2", "fchownat"):
        paths = [(_int(a[0]), a[1], write)]
    events, shown, raws, bases = [], [], [], []
    for dirfd, pointer, flags in paths:
        raw = mem.string(pointer)
        if raw is None:
            return None
        raws.append(raw)
        bases.append(None if raw.startswith(b"/") else _base(n.pid, dirfd))
        resolved = _join(raw, bases[-1], n.pid)
        events.append({"kind": "open", "agent": agent, "resolved_path": resolved,
                       "path": os.fsdecode(raw), "flags": flags, "ret": 0})
        shown.append(resolved or os.fsdecode(raw))
    action = f"{name} {' -> '.join(shown)}"
    repeatable = name in ("open", "openat", "creat") and raw.startswith(b"/")
    return Request(action, ("file", name, tuple(shown)), events, None,
                   fastpath.open_key(agent, flags, raw) if repeatable else None, name, tuple(raws), flags,
                   tuple(dirfd for dirfd, _, _ in paths), tuple(bases),
                   how if name == "openat2" and len(how) == 3 else None)


def lookup_start(pid: int, dirfd: int, raw: bytes) -> tuple[str, int]:
    """Where the kernel starts the task's lookup of raw, as a path the
    supervisor can open, and the openat2 resolve flag that keeps it there: the
    task's root for an absolute path, else its cwd or its directory fd."""
    if raw.startswith(b"/"):
        return f"/proc/{pid}/root", RESOLVE_IN_ROOT
    return start_link(pid, dirfd), 0


def exec_cannot_run(n: sn.Notification, request: Request) -> int | None:
    """The errno the kernel itself fails a refused exec with when there is no
    program to run -- ENOENT or ENOTDIR (missing), EACCES (not a regular file,
    no execute bit for anyone, a noexec mount) -- or None when there is one,
    whose refusal is then a real one (EPERM and a violation).

    Why: EPERM ends execvp's PATH search (and a shell's), so a refused path
    that does not even exist (gcc trying `as` in ~/.cargo/bin first) would
    break the command and raise a false alarm; ENOENT/EACCES let it go on.
    The supervisor answers the error itself rather than letting the call
    continue for the kernel to fail: an answered error cannot be raced into
    running anything (a program put at that path after this look is never
    executed by this call), where a continued call would exec whatever is
    there by then and lean on the in-BPF check alone. Looked up as root in
    the task's root and cwd: a directory the task may not search gives
    ENOENT here where the kernel says EACCES, both of which go on searching.
    A path through /proc or /dev/fd, or through any magic link (ELOOP
    here), would name the supervisor's own files: such an exec is judged as
    always, so no attempt at a program that is there escapes its record."""
    if request.syscall not in ("execve", "execveat") or not request.raw_paths:
        return None
    raw = request.raw_paths[0]
    resolved = request.events[0].get("resolved_filename") or ""
    if not raw or resolved.startswith(("/proc/", "/dev/fd/", "/dev/std")) or resolved in ("/proc", "/dev/fd"):
        return None
    dirfd, flags = (AT_FDCWD, 0) if request.syscall == "execve" else (_int(n.args[0]), _int(n.args[4]))
    base, resolve = lookup_start(n.pid, dirfd, raw)
    try:
        start = os.open(base, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        how = open_how(os.O_PATH | os.O_CLOEXEC | (os.O_NOFOLLOW if flags & AT_SYMLINK_NOFOLLOW else 0), 0,
                       resolve | RESOLVE_NO_MAGICLINKS)
        fd = openat2(start, raw, how)
        if fd < 0:
            code = ctypes.get_errno()
            return code if code in NOT_THERE else None
        try:
            st, fs = os.fstat(fd), os.fstatvfs(fd)
        finally:
            os.close(fd)
    except OSError:
        return None
    finally:
        os.close(start)
    if stat.S_ISLNK(st.st_mode):
        return None   # execveat AT_SYMLINK_NOFOLLOW of a link: ELOOP, judged as always
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111 or fs.f_flag & os.ST_NOEXEC:
        return errno.EACCES
    return None
