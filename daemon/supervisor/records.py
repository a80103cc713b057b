"""The supervisor's records, to the daemon's ingest socket as source
"supervisor": sessions started and ended, holds, refusals and its health, with
the counters that health reports."""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import zmq

from agentwarden import wire

if TYPE_CHECKING:
    from agentwarden.policy import Verdict

    from .holds import Hold
    from .listeners import Session

log = logging.getLogger("agentwarden.daemon")


def session_fields(s: Session) -> dict:
    """What every record of a session names it by."""
    return {"session": s.id, "agent": s.agent, "on_behalf_of": s.on_behalf_of, "task": s.task}


def summarise(times_ns) -> dict:
    """Handling times (notification readable to answered): median and p99."""
    recent = sorted(times_ns)
    if not recent:
        return {}
    return {"n": len(recent), "median_us": recent[len(recent) // 2] / 1000,
            "p99_us": recent[min(len(recent) - 1, int(len(recent) * 0.99))] / 1000}


class Records:
    def __init__(self, endpoint: str):
        self.out = zmq.Context.instance().socket(zmq.PUSH)
        self.out.setsockopt(zmq.LINGER, 2000)
        self.out.setsockopt(zmq.SNDTIMEO, 1000)
        self.out.connect(endpoint)
        self.seq = 0
        self.counters: dict[str, int] = {"notifications": 0, "continued": 0, "refused": 0,
                                         "held": 0, "unreadable": 0, "policy_announcements_malformed": 0}

    def emit(self, record: dict) -> None:
        try:
            self.out.send(wire.encode_batch("supervisor", self.seq, [record]))
        except zmq.Again:  # the daemon is not reading: counted; the seq gap shows in the archive
            self.counters["records_dropped"] = self.counters.get("records_dropped", 0) + 1
            log.error("supervisor: daemon not reading; dropped a %s record", record["kind"])
        self.seq += 1

    def supervision(self, s: Session, state: str, time_ns: int) -> None:
        """A session started or ended."""
        self.emit({"kind": "supervision", "time": time_ns, "state": state, **session_fields(s),
                   "user": s.user, "host": s.host, "cgroup": str(s.cgroup), "pid": s.pid})

    def hold(self, hold: Hold, state: str, reason: str | None = None) -> None:
        self.emit({"kind": "hold", "time": time.time_ns(), "hold_id": hold.id, "state": state,
                   **session_fields(hold.session), "pid": hold.notification.pid,
                   "action": hold.action, "rule": hold.rule, "policy_hash": hold.policy_hash,
                   "required": hold.required,
                   "approvers": sorted(a["name"] for a in hold.approvals.values()),
                   "approvals": sorted(hold.approvals.values(), key=lambda a: a["time"]),
                   "denial": hold.denial,
                   "reason": reason, "waited": round(time.monotonic() - hold.since, 3)})

    def refusal(self, s: Session, pid: int, action: str, verdict: Verdict, taken: str) -> None:
        self.emit({"kind": "violation", "time": time.time_ns(), "agent": s.agent, "pid": pid,
                   "comm": "", "event": "seccomp", "event_seq": None, "attempted": action,
                   "decision": verdict.decision, "rule": verdict.rule, "reason": verdict.reason,
                   "policy_hash": verdict.policy_hash, "mode": verdict.mode,
                   "action": verdict.action or "refuse", "action_taken": taken,
                   "session": s.id})

    def close(self) -> None:
        self.out.close()
