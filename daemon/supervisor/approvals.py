"""Exec approvals: what a session thread may execute, written for the BPF
program before its exec continues (it kills anything else at
sched_process_exec), and the probe's pinned maps this takes: approved_exec,
and approval_slots and exec_stash, which the fast path maps."""
from __future__ import annotations

import ctypes
import logging
import os
import struct
from pathlib import Path

from agentwarden import bpfsys
from agentwarden import seccomp_notify as sn
from agentwarden.headers import header_constants, header_struct

from .. import fastpath
from .listeners import Session

log = logging.getLogger("agentwarden.daemon")

APPROVED = header_struct("aw_approved")   # approved_exec's value (bpf/fastpath.h)
APPROVED_PATH_MAX = APPROVED.path.size
INTERPRETERS = header_struct("aw_approved_interpreters")   # approved_interpreters' value
INTERPRETER_PATH = header_constants("fastpath.h")["AW_INTERPRETER_PATH"]


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


class ExecApprovals:
    def __init__(self, pin_dir: Path, fast: fastpath.FastPath | None, sessions: dict[int, Session],
                 counters: dict[str, int]):
        """pin_dir: where the probe pins its maps; sessions: the listener
        registry's (a missing map is an error only while there are any);
        counters: the supervisor's, for `continued`."""
        self.pin_dir = pin_dir
        self.fast = fast
        self.sessions = sessions
        self.counters = counters
        self._approved_fd: int | None = None
        self._pinned_inodes: tuple | None = None
        self._interpreters_fd: int | None = None   # None: a probe without interpreter checks

    def follow(self) -> None:
        """Keep the fd of the probe's pinned approved_exec map, and the fast
        path's mappings of its approval_slots and exec_stash; a restarted probe
        pins new ones. Checked every health interval, not per exec: until then
        approvals land in the old maps, and the new program kills those execs
        (fail closed)."""
        approved_path, *mapped = (self.pin_dir / name for name in bpfsys.SUPERVISOR_MAPS)
        try:
            inodes = (os.stat(approved_path).st_ino, *(_inode(path) for path in mapped))
            if self._approved_fd is None or inodes != self._pinned_inodes:
                fd = bpfsys.open_pinned(approved_path)
                if self.fast:
                    self._map_shared(fd, mapped)
                if self._approved_fd is not None:
                    os.close(self._approved_fd)
                self._approved_fd, self._pinned_inodes = fd, inodes
                self._follow_interpreters()
        except OSError as exc:
            if self.fast:
                self.fast.set_maps(None, None, None)
            if self._approved_fd is not None:
                os.close(self._approved_fd)
            self._approved_fd = self._pinned_inodes = None
            if self.sessions:
                log.error("cannot open the probe's approved-exec map %s: %s", approved_path, exc)

    def _follow_interpreters(self) -> None:
        if self._interpreters_fd is not None:
            os.close(self._interpreters_fd)
            self._interpreters_fd = None
        try:
            self._interpreters_fd = bpfsys.open_pinned(self.pin_dir / bpfsys.INTERPRETER_MAP)
        except OSError:
            pass   # an older probe, whose program does not check interpreters

    def approve_interpreters(self, tid: int, added: tuple[bytes, ...]) -> bool:
        """Tell the BPF program what the interpreters of thread tid's exec put
        in front of argv; False when that cannot be told (refuse the exec)."""
        if not added:
            return True
        if self._interpreters_fd is None:
            return self._approved_fd is not None   # an older program: nothing to tell it
        value = INTERPRETERS(count=len(added))
        for i, argument in enumerate(added[:len(value.len)]):
            data = argument + b"\0"
            if len(data) > INTERPRETER_PATH:
                return False
            value.len[i] = len(data)
            ctypes.memmove(ctypes.addressof(value) + INTERPRETERS.path.offset + i * INTERPRETER_PATH,
                           data, len(data))
        try:
            bpfsys.update(self._interpreters_fd, struct.pack("=I", tid), bytes(value))
            return True
        except OSError as exc:
            log.error("cannot write approved interpreters for %d: %s", tid, exc)
            return False

    def _map_shared(self, approved_fd: int, paths: list[Path]) -> None:
        """Hand the fast path approved_exec and the maps it maps (approval_slots,
        exec_stash); approved_exec alone, and the tasks' memory read, if they
        are not there (an older probe) or cannot be mapped."""
        fds = []
        try:
            for path in paths:
                fds.append(bpfsys.open_pinned(path))
            self.fast.set_maps(approved_fd, *fds)
        except OSError as exc:
            log.warning("approving execs by bpf() and reading their filenames from the tasks: %s", exc)
            self.fast.set_maps(approved_fd, None, None)
        finally:
            for fd in fds:
                os.close(fd)

    def approve(self, tid: int, form: bytes) -> bool:
        """Tell the BPF program what this thread may execute; False when the
        map cannot be written (then the exec must be refused)."""
        if self._approved_fd is None:
            self.follow()
            if self._approved_fd is None:
                return False
        data = form + b"\0"
        if len(data) > APPROVED_PATH_MAX or tid == 0:   # 0: not in our pid namespace
            return False
        try:
            # approved_exec, whose updates are atomic; approval_slots are the
            # fast path threads' alone (see fastpath.c).
            bpfsys.update(self._approved_fd, struct.pack("=I", tid), bytes(APPROVED(len=len(data), path=data)))
            return True
        except OSError as exc:
            log.error("cannot write approved exec for %d: %s", tid, exc)
            self.follow()
            return False

    def withdraw(self, tid: int) -> None:
        """Take back an approval whose call could not be continued (its task
        died meanwhile, perhaps before its exit removed it)."""
        for fd in (self._approved_fd, self._interpreters_fd):
            if fd is not None:
                try:
                    bpfsys.delete(fd, struct.pack("=I", tid))
                except OSError:
                    pass

    def let_through(self, fd: int, n: sn.Notification, exec_form: bytes | None,
                    interpreters: tuple[bytes, ...] = ()) -> bool:
        """Continue a notified call, an exec once approved (with the arguments
        its interpreters add); False when it was refused (no approval) or its
        task is gone."""
        if exec_form is not None and not (self.approve_interpreters(n.pid, interpreters)
                                          and self.approve(n.pid, exec_form)):
            self.withdraw(n.pid)
            sn.respond(fd, n.id, allow=False)
            return False
        self.counters["continued"] += 1
        if sn.respond(fd, n.id, allow=True):
            return True
        if exec_form is not None:
            self.withdraw(n.pid)
        return False
