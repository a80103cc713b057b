"""Turns the paths agents pass to syscalls into absolute, normalised paths.

The kernel records carry paths as given. A relative path is resolved against
the process's working directory, or the directory behind its dirfd. Both are
tracked from the event stream itself, because a short-lived process is usually
gone before its /proc entry could be read: fork copies them, chdir/fchdir and
successful opens update them, ``fd`` records follow every other way a
descriptor is made, copied or dropped (dup, dup2, dup3, fcntl F_DUPFD and
F_DUPFD_CLOEXEC, F_SETFD, close, close_range, pidfd_open, pidfd_getfd), and
exec drops close-on-exec fds. /proc is the fallback for processes that were
running before they were seen, and for descriptors made by calls the kernel
program does not follow (sockets, pipes, received fds, ...).

Nor are fds that can be no dirfd and are no written file: regular files
opened read-only, devices, FIFOs, sockets (anything but a directory, an O_PATH
fd, a regular file opened for writing or an anon inode). The kernel program
skips (and counts) their closes and copies, and marks the open or copy that
made one ``fd_unfollowed``; the model drops that number from what it follows, as
after a close: with its close unseen, a later socket, pipe or memfd at that
number must not be taken for the file. The model needs such an fd only for
an f*(), AT_EMPTY_PATH or /proc/self/fd/N call on it
(fchmod, fchown, fexecve). For those it keeps what the open named as a claim
(``ProcessState.claims``) that /proc must confirm: a process gone, or the
number now naming something else (closed and taken again meanwhile, the
swap an agent would try), leaves the path unresolved.

Descriptor tables are kept per process (records carry the tgid), which is
exact for threads: they share one table (CLONE_FILES) and, through CLONE_FS,
the working directory. A process cloned with CLONE_FILES but without
CLONE_THREAD also shares its parent's table; the model copies it at fork
instead, so a descriptor one of the two makes later is unknown to the other
(a relative path through it is unresolved, never wrongly resolved: the fd
number was free in the copy, or its close was seen).

Normalisation is lexical (``..``, ``.``, repeated slashes); symlinks are not
followed. A path that cannot be resolved gets ``None``: it must never match an
allow rule.
"""
from __future__ import annotations

import collections
import os
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from agentwarden.paths import AT_FDCWD, normalise
from agentwarden.policy.decide import FD_CHANGES, LINK_CONTENT, TWO_PATHS, is_write

O_CLOEXEC = 0o2000000
MAX_PROCESSES = 65536
MAX_FDS_PER_PROCESS = 4096


def _as_str(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", "surrogateescape")


def _as_wire(value: str) -> str | bytes:
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape")


FD_CLOEXEC = 1
_OWN_FD_LINK = re.compile(r"/proc/([^/]+)/fd/(\d+)\Z")


class Descriptor(NamedTuple):
    path: str | None      # what it names, resolved; None for a pidfd
    cloexec: bool
    pid: int = 0          # a pidfd's process (pidfd_open), for pidfd_getfd
    write: bool = False   # opened for writing (policy.is_write): its open was judged as a write


@dataclass
class ProcessState:
    cwd: str | None
    ppid: int
    fds: dict[int, Descriptor] = field(default_factory=dict)
    # fd -> what the last unfollowed open or copy at that number named: a
    # claim only (its close is never seen), used once /proc confirms it.
    claims: dict[int, str] = field(default_factory=dict)


def proc_link(pid: int, what: str) -> str | None:
    """An absolute /proc/PID/<what> link target (cwd, exe, fd/N), or None."""
    try:
        target = os.readlink(f"/proc/{pid}/{what}")
    except OSError:
        return None
    return target if target.startswith("/") else None


def proc_ppid(pid: int) -> int:
    """The parent pid from /proc/PID/stat; 0 when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


class Resolver:
    def __init__(self, max_processes: int = MAX_PROCESSES):
        self.processes: collections.OrderedDict[int, ProcessState] = collections.OrderedDict()
        self.max_processes = max_processes
        self.proc_fallbacks = 0

    def _state(self, pid: int, create: bool = True) -> ProcessState | None:
        state = self.processes.get(pid)
        if state is not None:
            self.processes.move_to_end(pid)
            return state
        if not create:
            return None
        # Not seen forking: it ran before it was watched. Ask /proc (racy).
        self.proc_fallbacks += 1
        state = ProcessState(cwd=proc_link(pid, "cwd"), ppid=proc_ppid(pid))
        self._put(pid, state)
        return state

    def _put(self, pid: int, state: ProcessState) -> None:
        self.processes[pid] = state
        self.processes.move_to_end(pid)
        while len(self.processes) > self.max_processes:
            self.processes.popitem(last=False)

    def _base(self, pid: int, state: ProcessState, dirfd: int) -> str | None:
        if dirfd == AT_FDCWD:
            return state.cwd
        known = state.fds.get(dirfd)
        if known:
            return known.path
        now = proc_link(pid, f"fd/{dirfd}")
        claimed = state.claims.get(dirfd)
        if claimed is not None and now != claimed:
            # The fd an unfollowed open made may have been closed unseen and
            # its number taken since (or the process is gone): unresolved.
            return None
        return now

    def resolve(self, pid: int, state: ProcessState, dirfd: int, path: str | bytes,
                unusable: bool) -> str | None:
        if unusable:
            return None
        text = _as_str(path)
        if text.startswith("/"):
            return normalise(text)
        if text == "" :
            # AT_EMPTY_PATH style: the fd itself
            base = self._base(pid, state, dirfd) if dirfd != AT_FDCWD else None
            return normalise(base) if base else None
        base = self._base(pid, state, dirfd)
        if base is None:
            return None
        return normalise(base + "/" + text)

    def annotate(self, record: dict[str, Any]) -> None:
        """Add resolved paths and the parent pid; update the process model."""
        kind = record["kind"]
        pid = record["pid"]
        if kind == "fork":
            parent = self._state(pid)
            if not record["ppid"]:
                record["ppid"] = parent.ppid
            child = ProcessState(cwd=parent.cwd, ppid=pid, fds=dict(parent.fds), claims=dict(parent.claims))
            self._put(record["child_pid"], child)
            return
        if kind == "exit":
            self.processes.pop(pid, None)
            return
        state = self._state(pid)
        if not record["ppid"]:
            record["ppid"] = state.ppid
        if kind == "open":
            resolved = self.resolve(pid, state, record["dirfd"], record["path"],
                                    record["path_unreadable"] or record["path_truncated"])
            record["resolved_path"] = _as_wire(resolved) if resolved else None
            if record["ret"] >= 0:
                cloexec = bool(record["flags"] & O_CLOEXEC)
                if record.get("fd_unfollowed"):
                    self._made(state, record["ret"], None, claim=resolved)
                else:
                    self._made(state, record["ret"], Descriptor(resolved, cloexec, write=is_write(record["flags"]))
                               if resolved else None)
        elif kind == "chdir":
            if record["syscall"] == "fchdir":
                target = self._base(pid, state, record["dirfd"])
            else:
                target = self.resolve(pid, state, AT_FDCWD, record["path"],
                                      record["path_unreadable"] or record["path_truncated"])
            record["resolved_path"] = _as_wire(target) if target else None
            if record["ret"] == 0:
                state.cwd = target  # None when unknown: later relative paths stay unresolved
        elif kind == "exec":
            resolved = self.resolve(pid, state, record["dirfd"], record["filename"],
                                    record["filename_unreadable"] or record["filename_truncated"])
            record["resolved_filename"] = _as_wire(resolved) if resolved else None
            exec_path = record["exec_path"]
            record["resolved_exec_path"] = (
                _as_wire(r) if exec_path and (r := self.resolve(pid, state, AT_FDCWD, exec_path, False))
                else None)
            if record["ret"] == 0:
                state.fds = {fd: v for fd, v in state.fds.items() if not v.cloexec}
        elif kind == "fd":
            self._descriptor(pid, state, record)
        elif kind == "change":
            self._change(pid, state, record)
        elif kind == "sidedoor":
            path = record["path"]
            resolved = self.resolve(pid, state, record["fd"], path,
                                    record["path_unreadable"] or record["path_truncated"]) if path else None
            record["resolved_path"] = _as_wire(resolved) if resolved else None

    def _change(self, pid: int, state: ProcessState, record: dict[str, Any]) -> None:
        """A change's paths: ``resolved_path`` for path relative to dirfd (the
        fd's own path for ftruncate, fchmod and fchown, whose path is empty),
        ``resolved_path2`` for path2 relative to dirfd2 (None when the call has
        none). A symlink's path is its content: relative, it is resolved
        against the link's directory, where the kernel will follow it. An fd
        call gets ``fd_opened_for_writing``: whether the model saw that fd
        opened for writing (then its open was judged as a write of the path)."""
        syscall = record["syscall"]
        second = None
        if syscall in TWO_PATHS:
            second = self.resolve(pid, state, record["dirfd2"], record["path2"],
                                  record["path2_unreadable"] or record["path2_truncated"])
        if syscall in LINK_CONTENT:
            target = _as_str(record["path"])
            unusable = record["path_unreadable"] or record["path_truncated"] or not target
            if unusable or (not target.startswith("/") and second is None):
                first = None
            else:
                first = normalise(target if target.startswith("/") else os.path.dirname(second) + "/" + target)
        else:
            first = self.resolve(pid, state, record["dirfd"], record["path"],
                                 record["path_unreadable"] or record["path_truncated"])
            first = self._through_fd_link(pid, state, first)
        record["resolved_path"] = _as_wire(first) if first else None
        record["resolved_path2"] = _as_wire(second) if second else None
        if syscall in FD_CHANGES:
            known = state.fds.get(record["dirfd"])
            record["fd_opened_for_writing"] = bool(known and known.write and known.path == first)

    def _through_fd_link(self, pid: int, state: ProcessState, path: str | None) -> str | None:
        """/proc/self/fd/N (or thread-self, or the process's own pid) names the
        file behind the process's fd N: glibc's fchmodat(AT_SYMLINK_NOFOLLOW)
        without fchmodat2 changes a file that way, through an O_PATH fd. Any
        other path is returned as it is."""
        match = _OWN_FD_LINK.match(path) if path else None
        if match is None or match[1] not in ("self", "thread-self", str(pid)):
            return path
        return self._base(pid, state, int(match[2]))

    @staticmethod
    def _made(state: ProcessState, fd: int, descriptor: Descriptor | None, claim: str | None = None) -> None:
        """fd now names descriptor; None: something the model cannot name
        (claim: an unfollowed file, at that path). Its number was free, so
        whatever the model had under it is stale."""
        state.claims.pop(fd, None)
        if descriptor is None or (fd not in state.fds and len(state.fds) >= MAX_FDS_PER_PROCESS):
            state.fds.pop(fd, None)
            if claim and len(state.claims) < MAX_FDS_PER_PROCESS:
                state.claims[fd] = claim
        else:
            state.fds[fd] = descriptor

    def _descriptor(self, pid: int, state: ProcessState, record: dict[str, Any]) -> None:
        """Apply one ``fd`` record; it gets ``resolved_path``, what the new (or
        closed) descriptor names when that is a path the model knows."""
        syscall, fd, arg, ret = record["syscall"], record["fd"], record["arg"], record["ret"]
        fds = state.fds
        named = None
        if syscall == "close":
            named = fds.pop(fd, None)
            state.claims.pop(fd, None)
        elif syscall == "close_range":
            for n in [n for n in fds if fd <= n <= arg]:
                if record["cloexec"]:
                    fds[n] = fds[n]._replace(cloexec=True)
                else:
                    del fds[n]
            if not record["cloexec"]:
                for n in [n for n in state.claims if fd <= n <= arg]:
                    del state.claims[n]
        elif ret < 0:
            pass
        elif syscall == "fcntl_setfd":
            named = fds.get(fd)
            if named:
                fds[fd] = named._replace(cloexec=bool(arg & FD_CLOEXEC))
        elif syscall == "pidfd_open":
            self._made(state, ret, Descriptor(None, True, pid=arg))
        elif syscall == "dup2" and fd == ret:
            named = fds.get(fd)   # dup2 of an fd onto itself changes nothing
        else:
            if syscall == "pidfd_getfd":
                pidfd = fds.get(fd)
                source = self._descriptor_of(pidfd.pid, arg) if pidfd and pidfd.pid else None
            else:  # dup, dup2, dup3, fcntl_dupfd, fcntl_dupfd_cloexec
                source = self._descriptor_of(pid, fd)
            named = source._replace(cloexec=record["cloexec"]) if source else None
            if record.get("fd_unfollowed"):
                claimed = state.claims.get(fd) if syscall != "pidfd_getfd" else None
                self._made(state, ret, None, claim=claimed or (named.path if named else None))
            else:
                self._made(state, ret, named)
        path = named.path if named else None
        record["resolved_path"] = _as_wire(path) if path else None

    def _descriptor_of(self, pid: int, fd: int) -> Descriptor | None:
        """What fd of process pid names: from the model, else /proc (racy)."""
        state = self.processes.get(pid)
        known = state.fds.get(fd) if state else None
        if known:
            return known
        path = proc_link(pid, f"fd/{fd}")
        return Descriptor(path, False) if path else None
