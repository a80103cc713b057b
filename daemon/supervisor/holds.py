"""Holds: notified calls that wait for admins' answers, until enough of them
approve, one denies, the deadline passes (denied), or the session ends. The
held task is told on its stderr (setting hold_messages), and a call let
through is announced to the daemon (a `release` record) before it continues."""
from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass, field

from agentwarden import policy as policy_mod
from agentwarden import seccomp_notify as sn

from . import context
from .listeners import Session
from .reader import Request
from .records import Records
from .restart import Keeper
from .tell import tell


@dataclass
class Hold:
    id: str
    session: Session
    notification: sn.Notification
    request: Request            # what it asks for, as read at its (latest) notification
    key: tuple
    action: str
    decision: str
    rule: str | None
    reason: str
    policy_hash: str
    required: int
    since: float
    since_ns: int
    deadline: float
    # uid -> the approval (uid, name, reason, time): distinct uids, as the kernel reports them
    approvals: dict[int, dict] = field(default_factory=dict)
    denial: dict | None = None                                      # who denied it, and why
    agent_says: str | None = None    # AGENTWARDEN_REASON in the held process's environment
    change_expires: float | None = None   # approve --expires: seconds the change it lets through stands


class Holds:
    def __init__(self, records: Records, proceed, keeper: Keeper, messages: bool = True):
        """proceed(session, notification, request, hold_id, remembered, hold): lets a
        call go ahead (the supervisor's); keeper: where pending holds are kept
        across a restart; messages: tell held tasks on their stderr (setting
        hold_messages)."""
        self.records = records
        self.proceed = proceed
        self.keeper = keeper
        self.messages = messages
        self.pending: dict[str, Hold] = {}
        self.numbers = itertools.count(1)

    def hold(self, s: Session, n: sn.Notification, request: Request, verdict: policy_mod.Verdict,
             agent_policy: policy_mod.AgentPolicy | None) -> None:
        # A held call the agent re-issues (signal restart) is the same hold.
        for hold in self.pending.values():
            if hold.session is s and hold.notification.pid == n.pid and hold.key == request.key:
                hold.notification, hold.request = n, request
                return
        timeout = agent_policy.hold_timeout if agent_policy else policy_mod.DEFAULT_HOLD_TIMEOUT
        hold = Hold(id=f"h{next(self.numbers)}-{uuid.uuid4().hex[:4]}", session=s,
                    notification=n, request=request, key=request.key, action=request.action,
                    decision=verdict.decision, rule=verdict.rule,
                    reason=verdict.reason, policy_hash=verdict.policy_hash,
                    required=agent_policy.hold_approvers if agent_policy else 1,
                    since=time.monotonic(), since_ns=time.time_ns(),
                    deadline=time.monotonic() + timeout, agent_says=context.agent_reason(n, request.syscall))
        self.pending[hold.id] = hold
        self.keeper.keep_hold(hold)
        self.records.counters["held"] += 1
        self.records.hold(hold, "pending", verdict.reason)
        s.note(request.action, f"held {hold.id}")
        self._tell(hold, f"{request.action}: held as {hold.id}, waiting for an admin's approval "
                         f"(denied in {timeout:g}s without one)")

    def _tell(self, hold: Hold, line: str) -> None:
        if self.messages:
            tell(hold.notification.pid, line)

    def let_through(self, s: Session, n: sn.Notification, request: Request, hold_id: str,
                    remembered: bool, hold: Hold | None = None) -> bool:
        """Continue a call a hold (or its remembered approval) allows: the
        daemon hears of it first, so the kernel's record of it names the hold
        (or the supervisor's own record, when it performs the call)."""
        s.note(request.action, f"remembered {hold_id}" if remembered else f"approved {hold_id}")
        return self.proceed(s, n, request, hold_id, remembered, hold)

    def finish(self, hold: Hold, allow: bool, state: str, reason: str | None) -> None:
        del self.pending[hold.id]
        # Forgotten before it is answered: a restart in between finds the call
        # received and unanswered, and fails it (closed), never lets it through.
        self.keeper.forget_hold(hold.id)
        fd, n = hold.session.fd, hold.notification
        if not sn.still_valid(fd, n.id):
            self.records.hold(hold, "abandoned", "the waiting process is gone")
            return
        if allow:
            delivered = self.let_through(hold.session, n, hold.request, hold.id, False, hold)
        else:
            hold.session.note(hold.action, f"{state} {hold.id}")
            if state == "denied":
                self._tell(hold, f"{hold.id} denied by {hold.denial['name']}: "
                                 f"{hold.denial['reason'] or 'no reason given'}; {hold.action} fails (EPERM)")
            else:
                self._tell(hold, f"{hold.id} timed out after {time.monotonic() - hold.since:.0f}s without "
                                 f"an admin's answer; {hold.action} fails (EPERM)")
            delivered = sn.respond(fd, n.id, allow=False)
        self.records.hold(hold, state if delivered else "abandoned", reason)

    def expire(self) -> None:
        now = time.monotonic()
        for hold in [h for h in self.pending.values() if h.deadline <= now]:
            self.finish(hold, False, "timed-out", "no decision before the hold timeout: denied")

    def abandon(self, session: Session) -> None:
        """The session ended: its holds have no one left to answer."""
        for hold in [h for h in self.pending.values() if h.session is session]:
            del self.pending[hold.id]
            self.keeper.forget_hold(hold.id)
            self.records.hold(hold, "abandoned", "the session ended")

    def restore(self, s: Session, kept: dict, request: Request | None) -> Hold | None:
        """A hold kept by the process before this one, still pending: the same
        id, approvals and deadline; its call read again (request, None when it
        cannot be: then it fails with EPERM, recorded as abandoned)."""
        raw = kept["notification"]
        n = sn.Notification(raw["id"], raw["pid"], raw["nr"], tuple(raw["args"]))
        now_ns, now = time.time_ns(), time.monotonic()
        hold = Hold(id=kept["id"], session=s, notification=n, request=request,
                    key=request.key if request else (), action=kept["action"], decision=kept["decision"],
                    rule=kept["rule"], reason=kept["reason"], policy_hash=kept["policy_hash"],
                    required=kept["required"], since=now - (now_ns - kept["since_ns"]) / 1e9,
                    since_ns=kept["since_ns"], deadline=now + (kept["deadline_ns"] - now_ns) / 1e9,
                    approvals={a["uid"]: a for a in kept["approvals"]}, denial=kept["denial"],
                    agent_says=kept["agent_says"])
        number = hold.id[1:].split("-", 1)[0]
        if number.isdigit():   # new holds are numbered after the kept ones
            self.numbers = itertools.count(max(int(number) + 1, next(self.numbers)))
        if request is None:
            self.keeper.forget_hold(hold.id)
            sn.respond(s.fd, n.id, allow=False)
            self.records.hold(hold, "abandoned", "its call could not be read again after a restart: "
                                                 "refused (EPERM)")
            return None
        self.pending[hold.id] = hold
        self.records.hold(hold, "pending", "still pending after a restart of the daemon")
        return hold

    def next_deadline(self) -> float | None:
        return min((h.deadline for h in self.pending.values()), default=None)
