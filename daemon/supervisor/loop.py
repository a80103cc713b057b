"""The supervisor's loop: one epoll wait over every fd it watches, a
notification from receipt (here or forwarded by the fast path) to its answer,
sessions started and ended, policy reloads the daemon announces, health."""
from __future__ import annotations

import collections
import errno
import logging
import os
import select
import time

import zmq

from agentwarden import policy as policy_mod
from agentwarden import seccomp_notify as sn
from agentwarden import wire
from agentwarden.settings import Settings

from .. import fastpath
from ..governor import Governor
from . import reader
from .admin import Admin
from .approvals import ExecApprovals
from .decisions import Decisions
from .holds import Holds
from .listeners import Listeners, Session
from .records import Records, summarise

log = logging.getLogger("agentwarden.daemon")

HEALTH_INTERVAL = 1.0
CGROUP_REMOVAL_GRACE = 10.0   # s: a busy ended session's cgroup is tried again this long


class Supervisor:
    def __init__(self, settings: Settings, release_fd: int | None = None):
        """release_fd: the daemon's end of the pair for `release` records."""
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
        self.stopping = False
        self.listeners = Listeners()
        self.busy_cgroups: list[tuple[float, Session]] = []   # (give-up time, ended session)
        self.decisions = Decisions()
        self.fast, self.fast_unavailable = self._start_fast_path()
        self.approvals = ExecApprovals(settings.bpf_pin_dir, self.fast, self.listeners.sessions,
                                       self.records.counters)
        self.holds = Holds(self.records, self.approvals, settings.hold_messages)
        self.admin = Admin(settings, self.listeners, self.holds, self.decisions, self.records,
                           self._current_policy, self._start_session)

    def _start_fast_path(self) -> tuple[fastpath.FastPath | None, str | None]:
        if not self.settings.exec_fast_path:
            return None, "turned off (exec_fast_path = false)"
        lib, why = fastpath.load()
        if lib is None:
            log.warning("supervisor: no compiled fast path, every exec is decided in Python: %s", why)
            return None, why
        fast = fastpath.FastPath(lib, {name: nr for nr, name in self.names.items()})
        self.listeners.watch(fast.forwarded.fileno(), "fastpath", fast)
        self.fast = fast
        self._fast_policy()
        return fast, None

    def _fast_policy(self) -> None:
        """The current policy's rules to the fast path; what it learned is void."""
        for why in self.fast.set_policy(self.governor.policy):
            log.warning("supervisor: the fast path leaves calls to Python for agent %s", why)

    # -- policy and health ----------------------------------------------------------------

    def _health(self) -> None:
        current = self.governor.policy
        self.records.emit({"kind": "health", "time": time.time_ns(), "stage": "supervisor", "counters": {
            **self.records.counters, "sessions": len(self.listeners.sessions),
            "holds": len(self.holds.pending), "handling": summarise(self.handling_ns), **self._fast_health(),
            "policy_hash": current.hash if current else None}})

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
        self.listeners.add(session, self.fast)
        self.records.supervision(session, "started", session.started)

    def _end_session(self, fd: int) -> None:
        session = self.listeners.remove(fd, self.fast)
        self.holds.abandon(session)
        os.close(fd)
        self.records.supervision(session, "ended", time.time_ns())
        if not session.remove_cgroup():
            self.busy_cgroups.append((time.monotonic() + CGROUP_REMOVAL_GRACE, session))

    def _remove_busy_cgroups(self) -> None:
        """Ended sessions' cgroups that were still busy: again, until the grace ends
        (then kept, as one populated by processes that left the filter)."""
        now = time.monotonic()
        self.busy_cgroups = [(until, s) for until, s in self.busy_cgroups
                             if not s.remove_cgroup() and now < until]

    # -- notifications --------------------------------------------------------------------

    def on_notification(self, fd: int, n: sn.Notification | None = None) -> None:
        """A notification on fd: received here, or n as the fast path forwarded it."""
        started = time.perf_counter_ns()
        try:
            self._on_notification(fd, n)
        finally:
            self.handling_ns.append(time.perf_counter_ns() - started)

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
        if verdict.decision != "allow" and request.exec_form is not None:
            # No program there to run: the kernel's own answer, not a refusal (see exec_cannot_run).
            failure = reader.exec_cannot_run(n, request)
            if failure is not None and sn.still_valid(fd, n.id):
                counters["exec_cannot_run"] += 1
                sn.respond(fd, n.id, allow=False, error=failure)
                s.note(request.action, f"not run: {errno.errorcode[failure]}, as the kernel answers")
                return
        agent_policy = self.governor.policy.agents.get(s.agent) if self.governor.policy else None
        if verdict.decision == "allow":
            if self.fast and request.fast_key:
                # Learnt before the task goes on, so its next identical call finds
                # it; decide() is pure: same line, same verdict.
                self.fast.learn(request.fast_key)
            s.note(request.action, "allowed")
            self.approvals.let_through(fd, n, request.exec_form)
            return
        if verdict.mode == "monitor":
            s.note(request.action, f"{verdict.decision} (monitor mode: allowed)")
            self.approvals.let_through(fd, n, request.exec_form)
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
            os.close(fd)  # held and future notified calls now fail with ENOSYS
            session.remove_cgroup()
        self.admin.close()
        self.listeners.close()
        self._health()
        self.records.close()
        self.policy_feed.close()
