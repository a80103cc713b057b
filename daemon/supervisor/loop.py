"""The supervisor's loop: one epoll wait over every fd it watches, a
notification from receipt (here or forwarded by the fast path) to its answer,
sessions started, resumed after a restart and ended, policy reloads the daemon
announces, health."""
from __future__ import annotations

import collections
import errno
import logging
import os
import select
import time

import zmq

from agentwarden import policy as policy_mod
from agentwarden import sdnotify
from agentwarden import seccomp_notify as sn
from agentwarden import wire
from agentwarden.settings import Settings

from .. import fastpath
from ..metrics import HANDLING_BUCKETS, Buckets
from ..drift import SessionCapture
from ..drift import written_paths as drift_paths
from ..governor import Governor
from . import interpreters, reader
from .admin import Admin
from .approvals import ExecApprovals
from .decisions import Decisions
from .holds import Holds
from .listeners import Listeners, Session
from . import perform as perform_mod
from .perform import Performer
from .records import Records, session_fields, summarise
from .restart import Keeper, received_unanswered

log = logging.getLogger("agentwarden.daemon")

HEALTH_INTERVAL = 1.0
CGROUP_REMOVAL_GRACE = 10.0   # s: a busy ended session's cgroup is tried again this long


class Supervisor:
    def __init__(self, settings: Settings, release_fd: int | None = None,
                 inherited: list[tuple[str, int]] = ()):
        """release_fd: the daemon's end of the pair for `release` records;
        inherited: (session id, listener fd) the service manager kept while
        the daemon restarted."""
        self.settings = settings
        self.governor = Governor([settings.policy_dir], lambda cgroup_id: None)
        self.governor.load()
        self.records = Records(settings.ingest_endpoint, release_fd)
        self.policy_feed = zmq.Context.instance().socket(zmq.SUB)
        self.policy_feed.setsockopt(zmq.LINGER, 0)
        self.policy_feed.setsockopt(zmq.SUBSCRIBE, wire.TOPIC_KERNEL_RULES)
        self.policy_feed.connect(settings.events_endpoint)
        self.names = sn.syscall_names()
        self.handling_ns: collections.deque[int] = collections.deque(maxlen=1000)
        self.handling_histogram = Buckets(HANDLING_BUCKETS)   # since start, for metrics
        self.stopping = False
        self.listeners = Listeners()
        self.busy_cgroups: list[tuple[float, Session]] = []   # (give-up time, ended session)
        self.decisions = Decisions()
        # None: file changes continue after the check (setting perform_file_changes)
        self.performer = Performer(self.records) if settings.perform_file_changes else None
        # binfmt_misc's entries, read again each health interval: an entry
        # registered since gets its files' execs killed in the kernel meanwhile
        # (their interpreters were not approved), not refused.
        self.binfmt = interpreters.binfmt_formats()
        self.fast, self.fast_unavailable = self._start_fast_path()
        self.approvals = ExecApprovals(settings.bpf_pin_dir, self.fast, self.listeners.sessions,
                                       self.records.counters)
        self.drift = SessionCapture(settings, self.records.emit)
        # Listeners to the service manager's fd store (NotifyAccess=all under
        # systemd; `up` serves the daemon's NOTIFY_SOCKET itself).
        self.keeper = Keeper(settings.state_dir, sdnotify.Notifier())
        self.holds = Holds(self.records, self.proceed, self.keeper, settings.hold_messages)
        self.admin = Admin(settings, self.listeners, self.holds, self.decisions, self.records,
                           self._current_policy, self._start_session, self.drift)
        self._resume(list(inherited))

    def _start_fast_path(self) -> tuple[fastpath.FastPath | None, str | None]:
        if not self.settings.exec_fast_path:
            return None, "turned off (exec_fast_path = false)"
        lib, why = fastpath.load()
        if lib is None:
            log.warning("supervisor: no compiled fast path, every exec is decided in Python: %s", why)
            return None, why
        # Write-opens the fast path allows it performs too (fastpath.c), its records on the
        # release pair; without one, it leaves them to Python (perform.py).
        perform_fast = self.performer is not None and self.records.releases is not None
        fast = fastpath.FastPath(lib, {name: nr for nr, name in self.names.items()
                                       if perform_fast or not (self.performer and name in perform_mod.OPENS)})
        if perform_fast:
            fast.perform(self.records.releases.fileno())
        self.listeners.watch(fast.forwarded.fileno(), "fastpath", fast)
        self.fast = fast
        self._fast_policy()
        fast.set_binfmt(self.binfmt)
        return fast, None

    def _follow_binfmt(self) -> None:
        formats = interpreters.binfmt_formats()
        if formats != self.binfmt:
            self.binfmt = formats
            if self.fast:
                self.fast.set_binfmt(formats)

    def _fast_policy(self) -> None:
        """The current policy's rules to the fast path; what it learned is void."""
        for why in self.fast.set_policy(self.governor.policy):
            log.warning("supervisor: the fast path leaves calls to Python for agent %s", why)

    # -- policy and health ----------------------------------------------------------------

    def _health(self) -> None:
        current = self.governor.policy
        self.records.emit({"kind": "health", "time": time.time_ns(), "stage": "supervisor", "counters": {
            **self.records.counters, "sessions": len(self.listeners.sessions),
            "holds": len(self.holds.pending), "handling": summarise(self.handling_ns),
            "handling_histogram": self.handling_histogram.export(), **self._fast_health(),
            "policy_hash": current.hash if current else None, **self.drift.counters}})

    def _fast_health(self) -> dict:
        if self.fast is None:
            return {"fast_path": self.fast_unavailable}
        counters, recent = self.fast.stats()
        return {"fast_path": "running", "fast": counters, "fast_handling": summarise(recent)}

    def _follow_policy(self) -> None:
        """Reload when the daemon announces another policy hash."""
        while True:
            try:
                _topic, raw = self.policy_feed.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                announced = wire.decode_kernel_rules(raw)["policy_hash"]
            except wire.WireError:
                # The daemon's own socket: a bug if ever.
                self.records.counters["policy_announcements_malformed"] += 1
                log.error("supervisor: dropped a malformed policy announcement")
                continue
            current = self.governor.policy.hash if self.governor.policy else None
            if announced != current:
                try:
                    self.governor.load()
                except policy_mod.PolicyError as exc:
                    log.error("supervisor: policy %s announced but the files do not load: %s",
                              announced, exc)
                    continue
                loaded = self.governor.policy.hash if self.governor.policy else None
                if self.fast and loaded != current:
                    self._fast_policy()
                if loaded != announced:
                    log.warning("supervisor: loaded policy %s, the daemon announced %s "
                                "(files changed in between?)", loaded, announced)

    def _current_policy(self) -> policy_mod.PolicySet | None:
        self._follow_policy()  # a reload the daemon just announced
        return self.governor.policy

    # -- sessions -------------------------------------------------------------------------

    def _start_session(self, session: Session) -> None:
        # A probe restarted a moment ago pins new approval maps; an agent@ unit
        # restarted with it registers at once: its first exec's approval must
        # land in the maps the new program reads, not wait for the next check.
        self.approvals.follow()
        if not self.keeper.keep(session):
            log.warning("supervisor: no fd store (NOTIFY_SOCKET): session %s ends if the daemon "
                        "restarts", session.id)
        self.listeners.add(session, self.fast)
        self.records.supervision(session, "started", session.started)

    def _end_session(self, fd: int) -> None:
        session = self.listeners.remove(fd, self.fast)
        self.holds.abandon(session)
        self.keeper.forget(session)
        os.close(fd)
        self.drift.session_ended(session)
        self.records.supervision(session, "ended", time.time_ns())
        if not session.remove_cgroup():
            self.busy_cgroups.append((time.monotonic() + CGROUP_REMOVAL_GRACE, session))

    def _remove_busy_cgroups(self) -> None:
        """Ended sessions' cgroups that were still busy: again, until the grace ends
        (then kept, as one populated by processes that left the filter)."""
        now = time.monotonic()
        self.busy_cgroups = [(until, s) for until, s in self.busy_cgroups
                             if not s.remove_cgroup() and now < until]

    def _resume(self, inherited: list[tuple[str, int]]) -> None:
        """Sessions whose listeners the service manager kept while the daemon
        restarted (restart.py); kept sessions whose listener did not come back
        are recorded as ended."""
        kept, kept_holds = self.keeper.load()
        for name, fd in inherited:
            data = kept.pop(name, None)
            if data is None or not sn.is_listener(fd):
                log.error("supervisor: the fd store handed back %s, not a session this host kept; "
                          "closing it", name)
                os.close(fd)
                self.keeper.notifier.remove_fd(name)
                continue
            self._resume_session(self.keeper.session(data, fd), kept_holds.pop(name, []))
        for session_id, data in kept.items():
            ended = [h["id"] for h in kept_holds.get(session_id, [])]
            self.keeper.drop(session_id, ended)
            self.records.emit({"kind": "supervision", "time": time.time_ns(), "state": "ended",
                               **{k: str(data[k]) for k in ("agent", "on_behalf_of", "task", "user",
                                                            "host", "cgroup")},
                               "session": session_id, "pid": data["pid"],
                               "detail": "its listener did not survive (the service was stopped, or "
                                         "there was no fd store): its calls failed closed",
                               "holds_ended": ended})

    def _resume_session(self, s: Session, kept_holds: list[dict]) -> None:
        """One session back: its holds stay pending, what the dead process
        received and did not answer is answered now, and only then are its
        notifications received again."""
        started = time.monotonic()
        fd = s.fd
        sn.set_sync_wakeup(fd)
        self.listeners.sessions[fd] = s   # the answers below need it; watched once they are given
        restored = []
        for hold_data in kept_holds:
            raw = hold_data["notification"]
            n = sn.Notification(raw["id"], raw["pid"], raw["nr"], tuple(raw["args"]))
            if not sn.still_valid(fd, n.id):
                self.keeper.forget_hold(hold_data["id"])   # answered, or its task is gone
                continue
            request = self._read(s, n, self.names.get(n.nr, str(n.nr)))
            if self.holds.restore(s, hold_data, request):
                restored.append(hold_data["id"])
        receipt = self.keeper.receipt(s)
        redecided, failed = [], []
        if receipt is not None:
            known = {h.notification.id for h in self.holds.pending.values() if h.session is s}
            for nid in received_unanswered(fd, receipt, known):
                if nid == receipt.id:
                    self._on_notification(fd, receipt)   # decided again, as if just received
                    redecided.append(nid)
                elif sn.respond(fd, nid, allow=False):
                    failed.append(nid)
        self.listeners.add(s, self.fast)
        self.records.counters["resumed"] = self.records.counters.get("resumed", 0) + 1
        self.records.emit({"kind": "supervision", "time": time.time_ns(), "state": "resumed",
                           **session_fields(s), "user": s.user, "host": s.host, "cgroup": str(s.cgroup),
                           "pid": s.pid, "holds_resumed": restored, "redecided": redecided,
                           "failed": failed, "resume_ms": round((time.monotonic() - started) * 1000, 3)})
        log.info("supervisor: resumed session %s (%d holds pending, %d received calls decided again, "
                 "%d failed with EPERM)", s.id, len(restored), len(redecided), len(failed))

    # -- notifications --------------------------------------------------------------------

    def _capture(self, s: Session, request: reader.Request, hold=None, remembered_from: str | None = None) -> None:
        """The one place a call is seen just before it is let through: drift
        keeps the content before of the tracked files it changes."""
        policy = self.governor.policy
        agent_policy = policy.agents.get(s.agent) if policy else None
        try:
            self.drift.before(s, agent_policy, request, hold, remembered_from, policy.hash if policy else None)
        except Exception:   # a bug here must not leave the task waiting forever: counted, logged
            self.drift.counters["drift_errors"] += 1
            log.exception("supervisor: drift could not keep the content before of %s", request.action)
        if hold is None and agent_policy is not None and any(
                agent_policy.tracks(path) for path in drift_paths(request.events)):
            request.fast_key = None   # each change of a tracked file is seen here, never repeated in C

    def proceed(self, s: Session, n: sn.Notification, request: reader.Request, hold_id: str | None = None,
                remembered: bool = False, hold=None, captured: bool = False) -> bool:
        """The one way a checked call goes ahead (allowed, monitor mode, or let
        through by hold_id): a file change is performed for the task on the
        path that was checked; anything else continues (an exec once approved
        for the BPF program), after the daemon has the hold's release. Drift
        keeps the content before of tracked files first."""
        if not captured:
            self._capture(s, request, hold, hold_id if remembered else None)
        if self.performer and perform_mod.takes(request):
            performed = self.performer.perform(s, n, request, hold_id, remembered)
            if performed is not None:
                return performed
        if hold_id:
            self.records.release(hold_id, remembered, s, n.pid, request.syscall, request.raw_paths,
                                 request.flags)
        return self.approvals.let_through(s.fd, n, request.exec_form, request.interpreters)

    def _read(self, s: Session, n: sn.Notification, name: str) -> reader.Request | None:
        """What n asks for; an exec with the interpreters the kernel will run
        for it (#!, binfmt_misc), each judged as an exec of its own."""
        request = reader.read(s.agent, n, name)
        if request is not None and request.exec_form is not None:
            interpreters.add_to(n, request, self.binfmt)
        return request

    @staticmethod
    def _refused(verdict: policy_mod.Verdict, agent_policy) -> bool:
        """Whether the call is refused as it stands (neither allowed, held nor in monitor mode)."""
        return verdict.decision != "allow" and verdict.mode != "monitor" and not (
            verdict.decision == "hold" or (verdict.decision == "violation" and agent_policy
                                           and agent_policy.on_violation == "hold"))

    def on_notification(self, fd: int, n: sn.Notification | None = None) -> None:
        """A notification on fd: received here, or n as the fast path forwarded it."""
        started = time.perf_counter_ns()
        try:
            self._on_notification(fd, n)
        finally:
            took = time.perf_counter_ns() - started
            self.handling_ns.append(took)
            self.handling_histogram.observe(took / 1e9)

    def on_forwarded(self) -> None:
        for kind, fd, n in self.fast.events():
            if fd not in self.listeners.sessions:
                continue  # cannot happen: fds close only after their hang-up, in order
            if kind == fastpath.FORWARD_NOTIFICATION:
                self.on_notification(fd, n)
            elif kind == fastpath.FORWARD_HANGUP:
                self._end_session(fd)

    def _on_notification(self, fd: int, n: sn.Notification | None) -> None:
        s = self.listeners.sessions[fd]
        if n is None:
            n = sn.receive(fd)
            if n is None:
                return
            self.keeper.note(s, n)
        counters = self.records.counters
        counters["notifications"] += 1
        name = self.names.get(n.nr, str(n.nr))
        request = reader.read(s.agent, n, name)
        if not sn.still_valid(fd, n.id):
            return  # the task died or was interrupted: nothing to answer
        if request is None:
            counters["unreadable"] += 1
            sn.respond(fd, n.id, allow=False)
            verdict = policy_mod.Verdict("deny", None, None, "the arguments could not be read", "", "enforce")
            self.records.refusal(s, n.pid, f"{name} (unreadable arguments)", verdict, "refused: EPERM")
            s.note(f"{name} (unreadable arguments)", "refused")
            return
        verdict = self.decisions.decide(self.governor.policy, request)
        agent_policy = self.governor.policy.agents.get(s.agent) if self.governor.policy else None
        if request.exec_form is not None and not self._refused(verdict, agent_policy):
            # What would go ahead or wait is decided with its interpreters (an
            # exec refused by its path alone is refused without reading them).
            if interpreters.add_to(n, request, self.binfmt).added:
                verdict = self.decisions.decide(self.governor.policy, request)
        if verdict.decision != "allow" and request.exec_form is not None:
            # No program there to run: the kernel's own answer, not a refusal (see exec_cannot_run).
            failure = reader.exec_cannot_run(n, request) or request.exec_error
            if failure is not None and sn.still_valid(fd, n.id):
                counters["exec_cannot_run"] += 1
                sn.respond(fd, n.id, allow=False, error=failure)
                s.note(request.action, f"not run: {errno.errorcode[failure]}, as the kernel answers")
                return
        if verdict.decision == "allow":
            self._capture(s, request)
            if self.fast and request.fast_key:
                # Learnt before the task goes on, so its next identical call finds
                # it; decide() is pure: same line, same verdict.
                self.fast.learn(request.fast_key)
            s.note(request.action, "allowed")
            self.proceed(s, n, request, captured=True)
            return
        if verdict.mode == "monitor":
            s.note(request.action, f"{verdict.decision} (monitor mode: allowed)")
            self.proceed(s, n, request)
            self.records.refusal(s, n.pid, request.action, verdict, "none (monitor mode)")
            return
        wants_hold = verdict.decision == "hold" or (
            verdict.decision == "violation" and agent_policy and agent_policy.on_violation == "hold")
        if not wants_hold:
            counters["refused"] += 1
            sn.respond(fd, n.id, allow=False)
            self.records.refusal(s, n.pid, request.action, verdict, "refused: EPERM")
            s.note(request.action, f"{verdict.decision}: refused")
            return
        remembered = self.decisions.remembered_from(s.agent, request.key)
        if remembered:
            self.holds.let_through(s, n, request, remembered, True)
            return
        self.holds.hold(s, n, request, verdict, agent_policy)

    # -- loop -----------------------------------------------------------------------------

    def stop(self) -> None:
        self.stopping = True

    def run(self) -> None:
        next_health = 0.0
        while not self.stopping:
            if time.monotonic() >= next_health:
                next_health = time.monotonic() + HEALTH_INTERVAL
                self._follow_policy()
                self.approvals.follow()
                self._follow_binfmt()
                # once a second: expiry to the second, contents after of closed files
                self.drift.tick({h.session.id for h in self.holds.pending.values()})
                self._remove_busy_cgroups()
                self._health()
            timeout = 0.2
            deadline = self.holds.next_deadline()
            if deadline is not None:
                timeout = max(0.0, min(timeout, deadline - time.monotonic()))
            for fd, mask in self.listeners.poller.poll(timeout):
                kind, target = self.listeners.watched.get(fd, (None, None))
                try:
                    if kind == "listener":
                        if mask & select.EPOLLIN:
                            self.on_notification(fd)
                        elif mask & select.EPOLLHUP:
                            self._end_session(fd)
                    elif kind == "server":
                        self.admin.accept()
                    elif kind == "client":
                        self.admin.on_client(target)
                    elif kind == "fastpath":
                        self.on_forwarded()
                except Exception:  # one bad peer must not stop supervision of the others
                    log.exception("supervisor: error handling %s", kind)
            self.holds.expire()
        if self.fast:
            self.fast.stop()
        for fd, session in list(self.listeners.sessions.items()):
            # The fd store keeps the listener (a restart resumes the session);
            # without one, held and later notified calls now fail with ENOSYS.
            os.close(fd)
            session.remove_cgroup()
        self.admin.close()
        self.listeners.close()
        self._health()
        self.records.close()
        self.policy_feed.close()
