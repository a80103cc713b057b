"""Holds: notified calls that wait for admins' answers, until enough of them
approve, one denies, the deadline passes (denied), or the session ends."""
from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass, field

from agentwarden import policy as policy_mod
from agentwarden import seccomp_notify as sn

from .approvals import ExecApprovals
from .listeners import Session
from .reader import Request
from .records import Records


@dataclass
class Hold:
    id: str
    session: Session
    notification: sn.Notification
    key: tuple
    action: str
    exec_form: bytes | None
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


class Holds:
    def __init__(self, records: Records, approvals: ExecApprovals):
        self.records = records
        self.approvals = approvals
        self.pending: dict[str, Hold] = {}
        self.numbers = itertools.count(1)

    def hold(self, s: Session, n: sn.Notification, request: Request, verdict: policy_mod.Verdict,
             agent_policy: policy_mod.AgentPolicy | None) -> None:
        # A held call the agent re-issues (signal restart) is the same hold.
        for hold in self.pending.values():
            if hold.session is s and hold.notification.pid == n.pid and hold.key == request.key:
                hold.notification = n
                return
        timeout = agent_policy.hold_timeout if agent_policy else policy_mod.DEFAULT_HOLD_TIMEOUT
        hold = Hold(id=f"h{next(self.numbers)}-{uuid.uuid4().hex[:4]}", session=s,
                    notification=n, key=request.key, action=request.action,
                    exec_form=request.exec_form, decision=verdict.decision, rule=verdict.rule,
                    reason=verdict.reason, policy_hash=verdict.policy_hash,
                    required=agent_policy.hold_approvers if agent_policy else 1,
                    since=time.monotonic(), since_ns=time.time_ns(),
                    deadline=time.monotonic() + timeout)
        self.pending[hold.id] = hold
        self.records.counters["held"] += 1
        self.records.hold(hold, "pending", verdict.reason)

    def finish(self, hold: Hold, allow: bool, state: str, reason: str | None) -> None:
        del self.pending[hold.id]
        fd, n = hold.session.fd, hold.notification
        if not sn.still_valid(fd, n.id):
            self.records.hold(hold, "abandoned", "the waiting process is gone")
            return
        if allow:
            delivered = self.approvals.let_through(fd, n, hold.exec_form)
        else:
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
            self.records.hold(hold, "abandoned", "the session ended")

    def next_deadline(self) -> float | None:
        return min((h.deadline for h in self.pending.values()), default=None)
