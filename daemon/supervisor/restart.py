"""What outlives the supervisor process, so that a daemon restart is a pause
for sessions, not their end:

- each session's seccomp listener, in the service manager's fd store
  (systemd's, or `agentwarden up`'s), named by the session id: while no
  process of ours holds it, the store does, and notified calls wait;
- its description (`<id>.json`) and its pending holds (`hold-<id>.json`) in
  `state_dir/sessions`, written as they change;
- its receipt (`<id>.receipt`): the last notification received on it, which
  the fast path's thread (or this process) writes into a shared file mapping
  at once, so that a kill at any moment leaves it behind.

A restarted supervisor gets the listeners back (LISTEN_FDS, through the
daemon) and resumes each session: its pending holds stay pending (same id,
approvals, deadline), and the notifications the dead process had received
and not answered -- the kernel delivers a notification once -- are answered:
the receipt's is decided again from scratch, any other still waiting is
failed with EPERM. Their ids are found with NOTIF_ID_VALID around the
receipt's (ids count up per listener; one not yet answered is at most a
session's backlog behind the last one received). A session whose listener
did not come back (a real stop of the service) is recorded as ended."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

from agentwarden import sdnotify
from agentwarden import seccomp_notify as sn

from .listeners import Session

log = logging.getLogger("agentwarden.daemon")

RECEIPT_SIZE = 4096        # one page: the fast path maps it whole
RECEIPT_SCAN = 1024        # ids looked at on each side of the receipt's
MAX_ID = (1 << 64) - 1
SESSION_FIELDS = ("id", "agent", "user", "task", "on_behalf_of", "host", "pid", "started")
HOLD_FIELDS = ("id", "session", "notification", "action", "decision", "rule", "reason", "policy_hash",
               "required", "since_ns", "deadline_ns", "approvals", "denial", "agent_says")


def _write(path: Path, data: dict) -> None:
    """Atomically: a reader (the next process) sees the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


class Keeper:
    def __init__(self, state_dir: Path, notifier):
        """notifier: an sdnotify.Notifier, whose fd store keeps the listeners."""
        self.dir = state_dir / "sessions"
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.notifier = notifier

    # -- sessions ---------------------------------------------------------------------

    def keep(self, s: Session) -> bool:
        """A new session: described on disk, its receipt made, its listener
        stored. False when there is no store (not under systemd or `up`):
        then it ends with this process."""
        _write(self.dir / f"{s.id}.json", {**{k: getattr(s, k) for k in SESSION_FIELDS},
                                           "cgroup": str(s.cgroup)})
        s.receipt_fd = self._open_receipt(s.id, create=True)
        if not sdnotify.valid_fd_name(s.id):   # `run` makes s-HEX ids; a hand-made one may not do
            log.error("supervisor: session id %r cannot name a stored fd", s.id)
            return False
        return self.notifier.store_fd(s.fd, s.id)

    def _open_receipt(self, session_id: str, create: bool) -> int:
        path = self.dir / f"{session_id}.receipt"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_TRUNC if create else 0), 0o600)
            os.ftruncate(fd, RECEIPT_SIZE)
            return fd
        except OSError as exc:
            log.error("supervisor: no receipt for session %s (%s): a restart fails its received "
                      "calls instead of deciding them again", session_id, exc)
            return -1

    def note(self, s: Session, n: sn.Notification) -> None:
        """A notification this process received itself (the fast path notes its own)."""
        if s.receipt_fd >= 0:
            os.pwrite(s.receipt_fd, sn.pack(n), 0)

    def forget(self, s: Session) -> None:
        """The session ended: nothing of it is kept."""
        self.notifier.remove_fd(s.id)
        self._remove(s.id)
        if s.receipt_fd >= 0:
            os.close(s.receipt_fd)
            s.receipt_fd = -1

    def _remove(self, session_id: str) -> None:
        for path in (self.dir / f"{session_id}.json", self.dir / f"{session_id}.receipt"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # -- holds ------------------------------------------------------------------------

    def keep_hold(self, hold) -> None:
        n = hold.notification
        now_ns, now = time.time_ns(), time.monotonic()
        _write(self.dir / f"hold-{hold.id}.json", {
            "id": hold.id, "session": hold.session.id,
            "notification": {"id": n.id, "pid": n.pid, "nr": n.nr, "args": list(n.args)},
            "action": hold.action, "decision": hold.decision, "rule": hold.rule,
            "reason": hold.reason, "policy_hash": hold.policy_hash, "required": hold.required,
            "since_ns": hold.since_ns, "deadline_ns": now_ns + int((hold.deadline - now) * 1e9),
            "approvals": list(hold.approvals.values()), "denial": hold.denial,
            "agent_says": hold.agent_says})

    def forget_hold(self, hold_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.dir / f"hold-{hold_id}.json").unlink()

    # -- after a restart --------------------------------------------------------------

    def load(self) -> tuple[dict[str, dict], dict[str, list[dict]]]:
        """The sessions kept by id, and their holds by session id."""
        sessions: dict[str, dict] = {}
        holds: dict[str, list[dict]] = {}
        for path in sorted(self.dir.glob("*.json")):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                log.error("supervisor: ignoring %s: %s", path, exc)
                continue
            wanted = HOLD_FIELDS if path.name.startswith("hold-") else (*SESSION_FIELDS, "cgroup")
            if not isinstance(data, dict) or not all(k in data for k in wanted):
                log.error("supervisor: ignoring %s: not what this version keeps", path)
                continue
            if path.name.startswith("hold-"):
                holds.setdefault(data["session"], []).append(data)
            else:
                sessions[data["id"]] = data
        return sessions, holds

    def session(self, data: dict, fd: int) -> Session:
        s = Session(**{k: data[k] for k in SESSION_FIELDS}, cgroup=Path(data["cgroup"]), fd=fd)
        s.receipt_fd = self._open_receipt(s.id, create=False)
        return s

    def receipt(self, s: Session) -> sn.Notification | None:
        """The last notification the dead process received on s, if any."""
        if s.receipt_fd < 0:
            return None
        raw = os.pread(s.receipt_fd, sn.NOTIF_SIZE, 0)
        n = sn.parse(raw) if len(raw) == sn.NOTIF_SIZE else None
        return n if n and n.id else None

    def drop(self, session_id: str, hold_ids: list[str]) -> None:
        """A kept session whose listener did not come back."""
        self._remove(session_id)
        for hold_id in hold_ids:
            self.forget_hold(hold_id)


def received_unanswered(fd: int, receipt: sn.Notification, known: set[int]) -> list[int]:
    """Ids of notifications received on fd and not answered (NOTIF_ID_VALID:
    only a received one is valid), near the receipt's; known ones left out."""
    low, high = max(0, receipt.id - RECEIPT_SCAN), min(MAX_ID, receipt.id + RECEIPT_SCAN)
    return [i for i in range(low, high + 1) if i not in known and sn.still_valid(fd, i)]
