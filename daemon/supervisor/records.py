"""The supervisor's records, to the daemon's ingest socket as source
"supervisor": sessions started and ended, holds, refusals and its health, with
the counters that health reports."""
from __future__ import annotations

import logging
import socket
import time
from typing import TYPE_CHECKING

import zmq

from agentwarden import wire

if TYPE_CHECKING:
    from agentwarden.policy import Verdict

    from .holds import Hold
    from .listeners import Session

log = logging.getLogger("agentwarden.daemon")

RELEASE_SEND_TIMEOUT = 2.0   # s: a daemon that reads nothing for this long gets the record late


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
    def __init__(self, endpoint: str, release_fd: int | None = None):
        """release_fd: the daemon's end of a UNIX seqpacket pair for `release`
        records (see release()); None sends them with the others."""
        self.out = zmq.Context.instance().socket(zmq.PUSH)
        self.out.setsockopt(zmq.LINGER, 2000)
        self.out.setsockopt(zmq.SNDTIMEO, 1000)
        self.out.connect(endpoint)
        self.seq = 0
        self.releases = None
        self.release_seq = 0
        if release_fd is not None:
            self.releases = socket.socket(fileno=release_fd)
            self.releases.settimeout(RELEASE_SEND_TIMEOUT)
        self.counters: dict[str, int] = {"notifications": 0, "continued": 0, "refused": 0,
                                         "held": 0, "unreadable": 0, "policy_announcements_malformed": 0,
                                         "exec_cannot_run": 0}

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
                   "denial": hold.denial, "agent_says": hold.agent_says,
                   "reason": reason, "waited": round(time.monotonic() - hold.since, 3)})

    def release(self, hold_id: str, remembered: bool, s: Session, tid: int, syscall: str,
                raw_paths: tuple[bytes, ...], flags: int) -> None:
        """A call let through by hold_id (or by its remembered approval), sent
        BEFORE the call continues. On the UNIX pair a send returns only once
        the record sits in the daemon's receive queue, and the kernel's record
        of the call can only be made after it continues: the daemon, which
        drains the pair before each message it ingests, always has the
        release before that record and names the hold in it."""
        event = "exec" if syscall in ("execve", "execveat") else (
            "open" if syscall in ("open", "openat", "openat2", "creat") else None)
        record = {"kind": "release", "time": time.time_ns(), "hold_id": hold_id, "remembered": remembered,
                  **session_fields(s), "tid": tid, "syscall": syscall, "event": event,
                  "paths": [wire.from_c(p) for p in raw_paths], "flags": flags if event == "open" else 0}
        if self.releases is not None:
            try:
                self.releases.send(wire.encode_batch("supervisor-releases", self.release_seq, [record]))
                self.release_seq += 1
                return
            except OSError as exc:   # the daemon is stuck or gone: late is better than never
                self.counters["releases_late"] = self.counters.get("releases_late", 0) + 1
                log.error("supervisor: release of %s not delivered in order: %s", hold_id, exc)
        self.emit(record)

    def performed(self, record: dict) -> None:
        """The record of a call the supervisor made for a task (perform.py),
        sent before the task runs on, in order with the releases (see
        release()): the task's next records, which may name its new fd,
        reach the daemon after it."""
        if self.releases is not None:
            try:
                self.releases.send(wire.encode_batch("supervisor-releases", self.release_seq, [record]))
                self.release_seq += 1
                return
            except OSError as exc:
                self.counters["releases_late"] = self.counters.get("releases_late", 0) + 1
                log.error("supervisor: record of a performed %s not delivered in order: %s",
                          record["syscall"], exc)
        self.emit(record)

    def refusal(self, s: Session, pid: int, action: str, verdict: Verdict, taken: str) -> None:
        self.emit({"kind": "violation", "time": time.time_ns(), "agent": s.agent, "pid": pid,
                   "comm": "", "event": "seccomp", "event_seq": None, "attempted": action,
                   "decision": verdict.decision, "rule": verdict.rule, "reason": verdict.reason,
                   "policy_hash": verdict.policy_hash, "mode": verdict.mode,
                   "action": verdict.action or "refuse", "action_taken": taken,
                   "session": s.id})

    def close(self) -> None:
        self.out.close()
        if self.releases is not None:
            self.releases.close()
