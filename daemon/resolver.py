"""Turns the paths agents pass to syscalls into absolute, normalised paths.

The kernel records carry paths as given. A relative path is resolved against
the process's working directory, or the directory behind its dirfd. Both are
tracked from the event stream itself (fork copies them, chdir/fchdir and
successful opens update them, exec drops close-on-exec fds), because a
short-lived process is usually gone before its /proc entry could be read.
/proc is the fallback for processes that were running before they were seen.

Normalisation is lexical (``..``, ``.``, repeated slashes); symlinks are not
followed. A path that cannot be resolved gets ``None``: it must never match an
allow rule.
"""
from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from typing import Any

from agentwarden.paths import AT_FDCWD, normalise

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


@dataclass
class ProcessState:
    cwd: str | None
    ppid: int
    fds: dict[int, tuple[str, bool]] = field(default_factory=dict)  # fd -> (path, cloexec)


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
            return known[0]
        return proc_link(pid, f"fd/{dirfd}")

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
            child = ProcessState(cwd=parent.cwd, ppid=pid, fds=dict(parent.fds))
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
            ret = record["ret"]
            if ret >= 0 and resolved and len(state.fds) < MAX_FDS_PER_PROCESS:
                state.fds[ret] = (resolved, bool(record["flags"] & O_CLOEXEC))
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
                state.fds = {fd: v for fd, v in state.fds.items() if not v[1]}
