"""The listener registry: the sessions by their seccomp listener fd, and the
epoll set of every fd the supervisor waits on (listeners it receives on
itself, the admin socket and its clients, the fast path's forwarding socket).
"""
from __future__ import annotations

import collections
import errno
import logging
import select
import time
from dataclasses import dataclass, field
from pathlib import Path

from agentwarden import cgroups

from .. import fastpath

log = logging.getLogger("agentwarden.daemon")

RECENT_ACTIONS = 20   # per session, for `holds show`


@dataclass
class Session:
    id: str
    agent: str
    user: str
    task: str
    on_behalf_of: str
    host: str
    cgroup: Path
    fd: int
    pid: int
    started: int
    receipt_fd: int = -1   # the last notification received, kept across a restart (restart.py)
    # the last calls this process decided (the fast path's allows are not seen
    # here): {time, action, verdict}
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=RECENT_ACTIONS))

    def note(self, action: str, verdict: str) -> None:
        self.recent.append({"time": time.time_ns(), "action": action, "verdict": verdict})

    def remove_cgroup(self) -> bool:
        """An empty session leaves nothing behind; one still populated by
        processes that left the filter's reach keeps its cgroup. False when
        it is still busy: the listener hangs up as the last task leaves the
        filter, which can be before that task has left the cgroup (about one
        `run -- /bin/true` in five here), so the caller tries again."""
        try:
            self.cgroup.rmdir()
        except FileNotFoundError:
            return True
        except OSError as exc:
            return exc.errno != errno.EBUSY
        return True


class Listeners:
    def __init__(self):
        self.sessions: dict[int, Session] = {}          # listener fd -> session
        # epoll itself, not selectors: a listener's event mask tells a pending
        # notification (EPOLLIN) from a session whose processes are all gone
        # (EPOLLHUP alone) without another syscall.
        self.poller = select.epoll()
        self.watched: dict[int, tuple[str, object]] = {}   # fd -> (kind, socket or fd)
        self._cgroup_root: Path | None = None   # read once: mountinfo costs a session start ~0.3 ms

    def watch(self, fd: int, kind: str, target) -> None:
        self.poller.register(fd, select.EPOLLIN)
        self.watched[fd] = (kind, target)

    def unwatch(self, fd: int) -> None:
        self.poller.unregister(fd)
        del self.watched[fd]

    def add(self, session: Session, fast: fastpath.FastPath | None) -> None:
        """A new session: its notifications go to a fast-path thread, or,
        when there is none, to this process's loop."""
        self.sessions[session.fd] = session
        if not (fast and self._fast_watch(session, fast)):
            self.watch(session.fd, "listener", session.fd)  # this process receives its notifications

    def _fast_watch(self, session: Session, fast: fastpath.FastPath) -> bool:
        """Hand the session's listener to a fast-path thread; False if none starts."""
        try:
            try:
                ino = session.cgroup.stat().st_ino
                if self._cgroup_root is None:
                    self._cgroup_root = cgroups.cgroup2_root()
                below = session.cgroup.relative_to(self._cgroup_root).as_posix()
                relative = "/" if below == "." else "/" + below   # as /proc/PID/cgroup says it
            except (OSError, ValueError):
                ino, relative = 0, ""   # matches no task: its write-opens go to Python
            fast.watch(session.fd, session.agent, relative, ino, session.receipt_fd)
            return True
        except OSError as exc:
            log.error("supervisor: no fast-path thread for session %s: %s", session.id, exc)
            return False

    def remove(self, fd: int, fast: fastpath.FastPath | None) -> Session:
        """The session of a listener whose processes are all gone; the fd
        stays open, the caller's to close."""
        session = self.sessions.pop(fd)
        if fd in self.watched:
            self.unwatch(fd)
        else:
            fast.release(fd)  # its thread forwarded the hang-up and ended
        return session

    def close(self) -> None:
        self.poller.close()
