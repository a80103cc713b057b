"""The watch guard: the daemon notices at once when the probe stops watching,
and agents do not run on unwatched meanwhile.

The probe states its pid in each health record. The daemon holds a pidfd on
it, which becomes readable the moment the probe exits, however it ends
(`kill -9` included); a probe that stops answering (stopped, hung) is noticed
after `silence_timeout`. Either way every agent cgroup is frozen at once (and
agents tagged while the watch is down as soon as they appear), and a ``watch``
record says so. When a probe reports again, what the guard froze is thawed and
the record says how long the watch was down.

What the guard froze is written to `state_file`, so a daemon restarted while
the watch is down (a crash, a watchdog restart) still thaws it.

A probe whose BPF programs stop running while it lives (detached: its
perf event fds closed) notices it by its heartbeat (probe.main.Probe.heartbeat)
and says so in a health record (`programs_stopped`): frozen the same way,
then it exits and is started again.

A stop is deliberate, and freezes nothing, only when the probe says so in its
last health record: it was signalled by the service manager, its parent
(`agentwarden up`) or the terminal. Any other sender — an agent killing
agentwarden — is named in the record and the agents are frozen.
"""
from __future__ import annotations

import json
import os
import select
import time
from pathlib import Path
from typing import Callable

from .enforce import exiting
from .freeze_guard import FreezeGuard

UNARMED, WATCHING, STOPPED, LOST = "unarmed", "watching", "stopped", "lost"


class WatchGuard:
    def __init__(self, agent_cgroups: Callable[[], dict], silence_timeout: float,
                 state_file: Path | None = None):
        """agent_cgroups: every agent cgroup now, as {str(cgroup id): {"path": ...}}."""
        self.agent_cgroups = agent_cgroups
        self.silence_timeout = silence_timeout
        self.state_file = state_file
        self.freezer = FreezeGuard("freeze")
        self.state = UNARMED
        self.probe_pid: int | None = None
        self.pidfd: int | None = None
        self.last_word = 0.0   # monotonic time of the probe's last health record
        if state_file is not None and state_file.exists():
            self._resume(state_file)

    def _resume(self, state_file: Path) -> None:
        """A previous daemon lost the watch and froze these: they thaw when a probe watches."""
        try:
            frozen = json.loads(state_file.read_text())
            self.freezer.frozen = {int(cgid): Path(path) for cgid, path in frozen.items()}
        except (OSError, ValueError, AttributeError, TypeError):
            return   # unreadable: nothing to thaw, agents stay as they are (frozen: fail closed)
        self.freezer.since = time.monotonic()
        self.freezer.handled = set(self.freezer.frozen)
        self.state = LOST

    def _save(self) -> None:
        if self.state_file is None:
            return
        if not self.freezer.frozen:
            self.state_file.unlink(missing_ok=True)
            return
        temporary = self.state_file.with_suffix(".tmp")
        temporary.write_text(json.dumps({str(k): str(p) for k, p in self.freezer.frozen.items()}))
        os.replace(temporary, self.state_file)

    def fileno(self) -> int | None:
        """Readable when the watched probe has exited."""
        return self.pidfd

    def _record(self, state: str, detail: str, **extra) -> dict:
        return {"kind": "watch", "time": time.time_ns(), "state": state, "detail": detail,
                "probe_pid": self.probe_pid, **extra}

    def _follow(self, pid: int) -> None:
        if pid == self.probe_pid and self.pidfd is not None:
            return
        self._close()
        try:
            self.pidfd = os.pidfd_open(pid)
        except OSError:
            self.pidfd = None   # gone already, or not in our pid namespace: silence still counts
        self.probe_pid = pid

    def _close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def heard(self, health: dict) -> list[dict]:
        """A probe health record arrived; returns the watch records it causes."""
        pid, stopping = health.get("pid"), health.get("stopping")
        if not isinstance(pid, int) or isinstance(pid, bool):
            return []   # not a probe that says who it is (older, or a test's fake)
        self.last_word = time.monotonic()
        if isinstance(stopping, dict):
            return self._stopping(stopping)
        self._follow(pid)
        stopped = health.get("programs_stopped")
        if stopped:
            # It lives, but its BPF programs no longer run (detached): it sees nothing.
            if self.state == LOST:
                return []
            return self._lose(f"the probe (pid {pid}) lives but its BPF programs stopped running "
                              f"({', '.join(map(str, stopped))})")
        if self.state == LOST:
            seconds, taken = self.freezer.release()
            self._save()
            self.state = WATCHING
            return [self._record("restored", f"the probe (pid {pid}) watches again after {seconds:.1f}s "
                                 f"unwatched; {taken}", seconds=round(seconds, 3), action_taken=taken)]
        if self.state != WATCHING:
            self.state = WATCHING
            return [self._record(WATCHING, f"the probe (pid {pid}) watches")]
        return []

    def _stopping(self, stopping: dict) -> list[dict]:
        sender = stopping.get("sender") or "unknown"
        if stopping.get("deliberate"):
            self.state = STOPPED
            self._close()
            return [self._record(STOPPED, f"the probe stopped, as asked by {sender}")]
        return self._lose(f"the probe was told to stop by {sender}, not by its service manager")

    def exited(self) -> bool:
        """The watched probe has exited or is exiting (its last records may
        still be queued). Dying takes a probe most of a second — detaching its
        tracepoints — before its pidfd says so; PF_EXITING says it at once."""
        if self.pidfd is None:
            return False
        return bool(select.select([self.pidfd], [], [], 0)[0]) or exiting(self.probe_pid)

    def check(self, behind: bool = False) -> list[dict]:
        """Call often: the probe's exit or silence, and agents tagged while the
        watch is down. behind: messages wait unread, so the probe is not silent."""
        if self.state == LOST:
            taken = self.freezer.apply(self.agent_cgroups())
            self._save()
            return [self._record(LOST, "an agent cgroup appeared while the probe is down",
                                 action_taken=taken)] if taken else []
        if self.state != WATCHING:
            return []
        if self.exited():
            return self._lose(f"the probe (pid {self.probe_pid}) exited without being asked to")
        silent = time.monotonic() - self.last_word
        if silent > self.silence_timeout and not behind:
            return self._lose(f"no health record from the probe (pid {self.probe_pid}) "
                              f"for {silent:.1f}s")
        return []

    def _lose(self, why: str) -> list[dict]:
        self._close()
        self.state = LOST
        taken = self.freezer.engage(self.agent_cgroups())
        self._save()
        return [self._record(LOST, f"{why}; agents frozen until it watches again", action_taken=taken)]

    def forget(self, cgroup_ids) -> None:
        """An admin or a policy decided about these: the guard never thaws them."""
        self.freezer.forget(cgroup_ids)
        self._save()

    def info(self) -> dict:
        return {"state": self.state, "probe_pid": self.probe_pid, **self.freezer.state()}
