"""Drift in the daemon's processes: changes agents make to tracked files
(agentwarden.drift has the store, the index and reverting).

- `SessionCapture`, in the supervisor: the content before a session's change
  of a tracked file, taken before the call is continued (its one call site:
  Supervisor._capture); the content after once its writer closed the file
  (no process of the session holds it open for writing) or the session ends; expiry
  reported; admins' accept and baseline, done here, and revert, checked and
  archived here but written by the admin's own process (its mount namespace:
  the packaged unit's is read-only), so that who did it is the kernel's word
  (SO_PEERCRED on the supervisor's socket).
- `OutsideCapture`, in the daemon: changes agents make outside `run`
  sessions, after the fact from the kernel's records (write-opens, change
  calls); the content before is the file's baseline (`drift baseline`), the
  content after is taken when the writer closes its fd or exits.
- `ExpiredChanges`, in the daemon: the changes past their expiry that no admin
  answered yet, from the archived `drift` records (status, status line).

Every change becomes a `drift` record (agentwarden/wire.py) and an index entry.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Callable

from agentwarden import drift
from agentwarden import policy as policy_mod
from agentwarden.settings import Settings

log = logging.getLogger("agentwarden.daemon")

# How long an admin's process has, after the supervisor checked a revert, to
# write it and say so (`agentwarden drift revert` takes milliseconds).
REVERT_GRANT_SECONDS = 30.0
# A session's change is finished (its content after taken) once no process of
# the session has held the file open for writing, and no call of the session
# changed it, for this long.
WRITER_QUIET_SECONDS = 1.0

# A change's facts as the `drift` record carries them.
RECORD_KEYS = ("path", "agent", "session", "person", "task", "syscalls", "hold_id", "approvers", "reason",
               "policy_hash", "source", "before", "after", "expires", "admin")


def record_of(change: dict, state: str, now_ns: int | None = None) -> dict:
    return {"kind": "drift", "time": now_ns or time.time_ns(), "change_id": change["id"], "state": state,
            **{k: change.get(k) for k in RECORD_KEYS}, "syscalls": list(change.get("syscalls", ())),
            "approvers": list(change.get("approvers") or ())}


def written_paths(events: list[dict]) -> list[str]:
    """The paths a session call (as reader.Request.events) would change."""
    return [e["resolved_path"] for e in events
            if e.get("kind") == "open" and e.get("resolved_path") and policy_mod.is_write(e.get("flags", 0))]


class Captures:
    """What both captures share: the store, the index, where records go."""

    def __init__(self, settings: Settings, emit: Callable[[dict], None]):
        self.store = drift.Store(settings.drift_dir, settings.drift_store_max)
        self.index = drift.Index(settings.drift_dir)
        self.emit = emit
        self.counters = {"drift_changes": 0, "drift_transient": 0, "drift_errors": 0}

    def _observe(self, path: str) -> dict:
        try:
            return drift.observe(path, self.store)
        except OSError as exc:   # the store's disk: the change still goes through, recorded as such
            self.counters["drift_errors"] += 1
            log.error("drift: cannot keep the content of %s: %s", path, exc)
            return {**drift.observe(path), "stored": False}

    def _save(self, change: dict) -> None:
        try:
            self.index.save(change)
        except OSError as exc:
            self.counters["drift_errors"] += 1
            log.error("drift: cannot write the index entry of %s: %s", change["id"], exc)

    def finish(self, change: dict) -> None:
        """The change's content after; recorded, unless nothing came of it (a
        temporary file created and renamed away, a write that changed nothing)."""
        change["after"] = self._observe(change["path"])
        before, after = change["before"], change["after"]
        if (before["kind"] == "absent" and after["kind"] == "absent") or drift.same(before, after):
            self.counters["drift_transient"] += 1
            self.index.drop(change["id"])
            self.transient(change["id"])
            return
        self.counters["drift_changes"] += 1
        self._save(change)
        self.emit(record_of(change, "changed"))

    def transient(self, change_id: str) -> None:
        """A change that came to nothing was dropped."""


class SessionCapture(Captures):
    def __init__(self, settings: Settings, emit: Callable[[dict], None]):
        super().__init__(settings, emit)
        self.open: dict[str, dict[str, dict]] = {}   # session id -> path -> change not yet finished
        self.counters["drift_expired"] = 0
        self.expiring: dict[str, int] = {}           # change id -> expiry (ns), not yet reported
        self.grants: dict[str, dict] = {}            # token -> a revert an admin's process may do now
        self.sessions: dict[str, object] = {}         # session id -> its Session, while changes are open
        self.busy: dict[tuple[str, str], float] = {}  # (session id, path) -> last seen written (monotonic)
        for change in self.index.changes():
            if change.get("expires") and not change.get("admin") and not change.get("expired_reported"):
                self.expiring[change["id"]] = change["expires"]
            if change.get("after") is None and change.get("source") == "session":
                # its session ended with an earlier supervisor: finished now
                self.finish(change)

    def before(self, session, agent_policy: policy_mod.AgentPolicy | None, request, hold=None,
               remembered_from: str | None = None, policy_hash: str | None = None) -> None:
        """Called before a session's call is continued: the content before of
        each tracked file it changes. hold: the hold that let it through."""
        if agent_policy is None:
            return
        paths = [p for p in written_paths(request.events) if agent_policy.tracks(p)]
        if not paths:
            return
        pending = self.open.setdefault(session.id, {})
        self.sessions[session.id] = session
        now = time.time_ns()
        for path in paths:
            change = pending.get(path)
            self.busy[(session.id, path)] = time.monotonic()
            if change is not None:   # its first content before stands; this call adds to it
                if request.syscall not in change["syscalls"]:
                    change["syscalls"].append(request.syscall)
                if hold and not change["approvers"]:   # the first approval that let part of it through
                    change.update(self._approval(hold, None, agent_policy, now, policy_hash))
                    self._save(change)
                    if change["expires"]:
                        self.expiring[change["id"]] = change["expires"]
                continue
            change = {"id": drift.new_id(), "time": now, "path": path, "agent": session.agent,
                      "session": session.id, "person": session.on_behalf_of or session.user,
                      "user": session.user, "task": session.task, "syscalls": [request.syscall],
                      **self._approval(hold, remembered_from, agent_policy, now, policy_hash),
                      "source": "session", "before": self._observe(path), "after": None, "admin": None}
            pending[path] = change
            self._save(change)
            if change["expires"]:
                self.expiring[change["id"]] = change["expires"]

    def transient(self, change_id: str) -> None:
        self.expiring.pop(change_id, None)   # never reported expired: there is nothing to review

    @staticmethod
    def _approval(hold, remembered_from: str | None, agent_policy: policy_mod.AgentPolicy, now: int,
                  policy_hash: str | None) -> dict:
        """Who let a change through and until when: the hold's approvers and
        reasons (or the remembered approval's hold), its --expires, else the
        agent's change-ttl."""
        expires_in = getattr(hold, "change_expires", None) or agent_policy.change_ttl
        return {"hold_id": hold.id if hold else remembered_from, "remembered": bool(remembered_from),
                "approvers": sorted(a["name"] for a in hold.approvals.values()) if hold else [],
                "reason": "; ".join(a["reason"] or "no reason given" for a in hold.approvals.values())
                if hold else None,
                "policy_hash": getattr(hold, "policy_hash", None) or policy_hash,
                "expires": now + int(expires_in * 1e9) if expires_in else None}

    def session_ended(self, session) -> None:
        self.sessions.pop(session.id, None)
        for path, change in self.open.pop(session.id, {}).items():
            self.busy.pop((session.id, path), None)
            self.finish(change)

    def settle(self, waiting: set[str] = frozenset()) -> None:
        """Takes the content after of each change of a running session whose
        writer is done: no process of the session holds the file open for
        writing, no call touched it for WRITER_QUIET_SECONDS (a call let
        through a moment ago may not have happened yet; sed closes its
        temporary file and renames it over the file at once), and no call of
        the session waits for an admin (sed's rename of its temporary file
        may be held). Called once a second: a change's content after is known
        a second or two after its writer closed the file, not only when the
        session ends."""
        now = time.monotonic()
        for session_id, pending in list(self.open.items()):
            if session_id in waiting:
                for path in pending:
                    self.busy[(session_id, path)] = now   # quiet only from the admin's answer
                continue
            session = self.sessions.get(session_id)
            for path, change in list(pending.items()):
                key = (session_id, path)
                if now - self.busy.get(key, 0.0) < WRITER_QUIET_SECONDS:
                    continue
                if session is not None and _held_for_writing(session.cgroup, path):
                    self.busy[key] = now   # quiet only from when it was closed
                    continue
                del pending[path]
                self.busy.pop(key, None)
                self.finish(change)

    def tick(self, waiting: set[str] = frozenset()) -> None:
        """Once a second, in the supervisor's loop; waiting: the sessions with a
        call held for an admin."""
        self.settle(waiting)
        self.expire()

    def expire(self, now_ns: int | None = None) -> None:
        """Reports (once, a `drift` record) each change whose approval ran out."""
        now_ns = now_ns or time.time_ns()
        self._expire_grants()
        for change_id, expires in list(self.expiring.items()):
            if expires > now_ns:
                continue
            change = self._live(change_id)
            if change is not None and change.get("after") is None:
                continue   # still being written: reported once finished (sed's temporary file may come to nothing)
            del self.expiring[change_id]
            if change is None or change.get("admin"):
                continue   # dropped (nothing came of it), or answered
            change["expired_reported"] = now_ns
            self._save(change)
            self.counters["drift_expired"] += 1
            self.emit(record_of(change, "expired", now_ns))

    def _live(self, change_id: str) -> dict | None:
        """The change as this process holds it (its session still runs), else as the index has it."""
        for pending in self.open.values():
            for change in pending.values():
                if change["id"] == change_id:
                    return change
        try:
            return self.index.load(change_id)
        except drift.DriftError:
            return None

    # -- admins ---------------------------------------------------------------------------

    def grant_revert(self, change_id: str, force: bool, who: dict, pid: int) -> dict:
        """An admin's process (pid, from SO_PEERCRED) may revert change_id: every
        refusal is decided here first (drift.check), nothing is written. The
        admin's process then writes -- with its own credentials, in its own
        mount namespace, where the packaged unit's ProtectSystem=strict does not
        make /etc read-only -- and reports back (`reverted`). {token, change}."""
        change = drift.find(self.index, change_id)
        if change.get("after") is None:
            raise drift.DriftError(f"{change_id} is still being written (a process of its session has the "
                                   "file open for writing); revert it once the writer closed it")
        self._not_being_reverted(change_id)
        drift.check(self.store, change, force)
        token = uuid.uuid4().hex
        self.grants[token] = {"change": change, "force": force, "who": who, "pid": pid,
                              "until": time.monotonic() + REVERT_GRANT_SECONDS,
                              "was_before": drift.same(change["before"], drift.observe(change["path"]))}
        return {"token": token, "change": change}

    def reverted(self, token: str, pid: int, uid: int, error: str | None) -> dict:
        """The admin's process reports its revert: archived once this process
        sees the file as the change's content before; error: it refused or
        failed (nothing written), nothing archived."""
        grant = self.grants.get(token) if isinstance(token, str) else None
        if grant is None or grant["pid"] != pid or grant["who"]["uid"] != uid:
            raise drift.DriftError("no revert was granted to this process under that token (a grant "
                                   f"lasts {REVERT_GRANT_SECONDS:g} s)")
        del self.grants[token]
        if error is not None:
            log.info("drift: %s did not revert %s: %s", grant["who"]["name"], grant["change"]["id"], error)
            return grant["change"]
        return self._archive_revert(grant, reported=True)

    def _archive_revert(self, grant: dict, reported: bool) -> dict:
        change, who = grant["change"], grant["who"]
        if change["source"] != "baseline":   # as it is now (its expiry may have been reported since)
            change = self._live(change["id"]) or change
        now = drift.observe(change["path"], self.store)
        if not drift.same(change["before"], now):
            raise drift.DriftError(f"{change['path']} is not as before {change['id']} after the revert (now "
                                   f"{drift.describe(now)}): not archived as reverted")
        change["admin"] = {"state": "reverted", **who, "force": grant["force"], "now": now}
        if not reported:   # the admin's process wrote, then went before it said so
            change["admin"]["unreported"] = True
        if change["source"] != "baseline":   # a baselined file put back: its baseline stands
            self._save(change)
        self.expiring.pop(change["id"], None)
        self.emit(record_of(change, "reverted"))
        return change

    def _not_being_reverted(self, change_id: str) -> None:
        for grant in self.grants.values():
            if grant["change"]["id"] == change_id:
                raise drift.DriftError(f"{change_id} is being reverted by {grant['who']['name']} "
                                       f"(pid {grant['pid']}); try again in {REVERT_GRANT_SECONDS:g} s")

    def _expire_grants(self) -> None:
        """Grants whose process never reported: archived as reverted when the
        file is now as before (and was not when granted), else forgotten."""
        now = time.monotonic()
        for token, grant in list(self.grants.items()):
            if grant["until"] > now:
                continue
            del self.grants[token]
            if not grant["was_before"]:
                try:
                    self._archive_revert(grant, reported=False)
                except drift.DriftError:
                    log.info("drift: the revert of %s granted to %s was not done", grant["change"]["id"],
                             grant["who"]["name"])

    def accept(self, change_id: str, who: dict) -> dict:
        change = drift.find(self.index, change_id)
        if change["source"] == "baseline":   # the file as it is now becomes its baseline
            self.baseline([change["path"]], who)
            return {**change, "admin": {"state": "accepted", **who}}
        if change.get("admin"):
            raise drift.DriftError(f"{change_id} was already {change['admin']['state']} by "
                                   f"{change['admin']['name']}")
        self._not_being_reverted(change_id)
        change["admin"] = {"state": "accepted", **who}
        self._save(change)
        self.expiring.pop(change_id, None)
        self.emit(record_of(change, "accepted"))
        return change

    def baseline(self, paths: list[str], who: dict) -> list[dict]:
        """Records each file as it is now, for changes made outside sessions."""
        done = []
        for path in paths:
            if not isinstance(path, str) or not path.startswith("/"):
                raise drift.DriftError(f"{path!r}: give absolute paths")
        for path in paths:
            facts = self._observe(os.path.normpath(path))
            if facts["kind"] not in ("file", "absent"):
                raise drift.DriftError(f"{path} is a {facts['kind']}: a baseline is of files")
            entry = {"id": drift.new_id(), "time": time.time_ns(), "path": os.path.normpath(path),
                     "before": facts, "admin": {"state": "baseline", **who}}
            self.index.save_baseline(entry)
            self.emit({**record_of({**entry, "source": "baseline", "syscalls": []}, "baseline"),
                       "before": facts, "after": None})
            done.append(entry)
        return done


def _held_for_writing(cgroup, path: str) -> bool:
    """Whether a process of the cgroup (or a cgroup below it) has what path
    names now open for writing (/proc/PID/fd and fdinfo; a process that exits
    meanwhile holds nothing)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False   # gone: nothing writes to it through its name any more
    target = (st.st_dev, st.st_ino)
    try:
        procs = [p for f in cgroup.rglob("cgroup.procs") for p in f.read_text().split()]
    except OSError:
        return False   # the cgroup is gone: its processes too
    for pid in procs:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                fst = os.stat(f"/proc/{pid}/fd/{fd}")
                if (fst.st_dev, fst.st_ino) != target:
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                    flags = next(int(line.split()[1], 8) for line in info if line.startswith("flags:"))
            except (OSError, StopIteration, ValueError):
                continue
            if flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
                return True
    return False


class OutsideCapture(Captures):
    """Changes agents make outside `run` sessions, from the kernel's records."""

    def __init__(self, settings: Settings, emit: Callable[[dict], None]):
        super().__init__(settings, emit)
        self.writing: dict[tuple[int, int], dict] = {}   # (pid, fd) -> change whose writer has it open

    def _new(self, record: dict, path: str, syscall: str, policy_hash: str | None) -> dict:
        baseline = self.index.baseline(path)
        return {"id": drift.new_id(), "time": record["time"], "path": path, "agent": record.get("agent"),
                "session": record.get("session"), "person": None, "user": None, "task": None,
                "syscalls": [syscall], "hold_id": None, "approvers": [], "reason": None,
                "policy_hash": policy_hash, "source": "outside", "expires": None,
                "before": baseline["before"] if baseline else {"kind": "unknown"},
                "baseline": baseline["id"] if baseline else None, "after": None, "admin": None}

    def wants(self, record: dict) -> bool:
        """Whether event may matter here: a write-open, a change, or the close
        or exit of a writer whose change is open."""
        kind = record["kind"]
        if kind == "open":
            return policy_mod.is_write(record.get("flags", 0))
        if kind == "change":
            return True
        return bool(self.writing) and (kind == "exit" or (kind == "fd" and record.get("syscall") in
                                                          ("close", "close_range")))

    def event(self, record: dict, agent_policy: policy_mod.AgentPolicy | None, in_session: bool,
              policy_hash: str | None) -> None:
        """One archived event of an agent; in_session: made under a `run`
        session (the supervisor captured it before it went through)."""
        kind = record["kind"]
        pid = record.get("pid")
        if kind == "exit":
            for key in [k for k in self.writing if k[0] == pid]:
                self.finish(self.writing.pop(key))
            return
        if kind == "fd" and record.get("syscall") in ("close", "close_range"):
            low = record["fd"]
            high = record["arg"] if record["syscall"] == "close_range" else low
            for key in [k for k in self.writing if k[0] == pid and low <= k[1] <= high]:
                self.finish(self.writing.pop(key))
            return
        if in_session or agent_policy is None or record.get("ret", -1) < 0:
            return
        if kind == "open" and policy_mod.is_write(record.get("flags", 0)):
            path = record.get("resolved_path")
            if isinstance(path, str) and agent_policy.tracks(path):
                change = self._new(record, path, record.get("syscall", "open"), policy_hash)
                self._save(change)
                previous = self.writing.pop((pid, record["ret"]), None)
                if previous:
                    self.finish(previous)
                self.writing[(pid, record["ret"])] = change
        elif kind == "change":
            for key, _ in policy_mod.changed_paths(record):
                path = record.get(key)
                if isinstance(path, str) and agent_policy.tracks(path):
                    self.finish(self._new(record, path, record["syscall"], policy_hash))


class ExpiredChanges:
    """The changes reported expired that no admin answered yet (from `drift`
    records; at start, from the index)."""

    def __init__(self, settings: Settings | None = None):
        self._expired: dict[str, dict] = {}
        if settings is not None:
            for change in drift.Index(settings.drift_dir).changes():
                if change.get("expired_reported") and not change.get("admin"):
                    self._expired[change["id"]] = record_of(change, "expired")

    def update(self, record: dict) -> None:
        if record["state"] == "expired":
            self._expired[record["change_id"]] = record
        elif record["state"] in ("reverted", "accepted"):
            self._expired.pop(record["change_id"], None)

    def __len__(self) -> int:
        return len(self._expired)

    def summary(self) -> str:
        if not self._expired:
            return ""
        count = len(self._expired)
        oldest = min(self._expired.values(), key=lambda r: r["expires"] or 0)
        return (f"{count} expired change{'s' if count > 1 else ''} to review (oldest {oldest['change_id']} "
                f"of {oldest['path']}: agentwarden drift --expired)")
