"""The priority lane, daemon side: exec records decided and acted on as soon
as the probe drains them, ahead of the in-order stream.

The probe sends a copy of each exec record of an acting agent on a socket of
its own (probe/priority.py) the moment it drains the kernel's `vital` ring.
The daemon looks at that socket first, and between in-order records (every
CHECK_EVERY), so a flood queued ahead of the exec in order does not delay it.
For each copy it makes the decision the in-order path would make and, for a
violation, takes the action at once (Governor.judge on the copy: the same
code). It remembers (pid, tid, time, ...) -> the verdict, what judge added to
the record and the violation record with its action taken. When the same
record arrives in order, it is archived in its place with that decision:
judge is not called again (no second kill, no second violation record); the
violation record is archived right after it, as always, saying what the early
action did (enforce.kill_process: "killed process N" only if our kill ended it)
and `ahead_of_order: true`. The archive's order and hash chain are unchanged.

The decision must not depend on state built from earlier records that the copy
may overtake, so the lane acts only where it does not:
- the agent: the cgroup must be one the daemon already knows (tags records),
  of an agent that acts (enforce, on-violation not alert), and no `run`
  session's (those are the supervisor's);
- the path judged: the process model (cwd, fds) resolves relative paths, so
  the lane acts only when that path is absolute (the kernel's exec_path, or
  with none the filename); a relative one is left to the in-order path;
- the symlink look (where the path leads) is made now, for this record alone,
  not from the in-order batch's looks, which predate it;
- the policy is the one in force when the copy arrives (closer to the exec's
  time than the in-order path would be).
Anything else is left to the in-order path, which decides it as before
(counted by reason).

Never twice: the lane acts only on a record newer than every exec record
already handled in order (a copy that arrives late is counted and left); a
copy whose key it already holds is a duplicate. The memo is bounded
(MEMO_SIZE, the oldest evicted first, counted): an evicted decision is decided
again in order, whose kill then finds the process gone and says so.

What the lane accepts is only what the in-order stream carries: batches from
the probe's socket (0600, root's alone) of records that pass the wire schema,
exec records only; the decision is judge's on the record's own fields, so it
can act on nothing the in-order path would not.
"""
from __future__ import annotations

import collections
import logging
import os
from dataclasses import dataclass
from typing import Callable

import zmq

from agentwarden import wire
from agentwarden.paths import AT_FDCWD

from .governor import Governor
from .resolver import ProcessState, Resolver, _as_wire

log = logging.getLogger("agentwarden.daemon")

MEMO_SIZE = 4096      # decisions taken ahead, waiting for their record in order
CHECK_EVERY = 32      # in-order records between looks at the lane
LANE_HWM = 64         # lane messages queued towards the daemon

# A process model that knows nothing: Resolver.resolve with it gives a path
# only when the path alone says where it is (absolute), as the model would.
_NOTHING_KNOWN = ProcessState(cwd=None, ppid=0)
_RESOLVER = Resolver(max_processes=0)


def key_of(record: dict) -> tuple:
    """One exec record, the same for its copy and for it in order (an
    interpreter's record shares its exec's pid, tid and time)."""
    return (record["pid"], record["tid"], record["time"], record["syscall"], record["exec_path"],
            record["filename"])


def exec_paths_alone(record: dict) -> dict | None:
    """resolved_filename and resolved_exec_path as the resolver would set them,
    when the one the decision reads does not depend on the process model (the
    kernel's exec_path, or with none the filename, is absolute); else None."""
    def alone(path, unusable: bool):
        resolved = _RESOLVER.resolve(record["pid"], _NOTHING_KNOWN, AT_FDCWD, path, unusable)
        return _as_wire(resolved) if resolved else None

    filename = alone(record["filename"], record["filename_unreadable"] or record["filename_truncated"])
    if record["exec_path"]:
        exec_path = alone(record["exec_path"], False)
        if exec_path is None:
            return None
    elif filename is None:
        return None
    else:
        exec_path = None
    return {"resolved_filename": filename, "resolved_exec_path": exec_path}


def judged_path(record: dict):
    """The resolved path the decision reads (see exec_paths_alone)."""
    return record.get("resolved_exec_path") if record["exec_path"] else record.get("resolved_filename")


@dataclass
class Decided:
    agent: str
    path: str | bytes       # the resolved path it was decided on
    fields: dict            # what judge added to the record: verdict, real_path
    violation: dict         # the violation record, its action taken


class PriorityLane:
    def __init__(self, sock: zmq.Socket, governor: Governor, agents: dict[int, str],
                 in_session: Callable[[int], bool], counters: collections.Counter):
        self.sock = sock
        self.governor = governor
        self.agents = agents          # the daemon's: agent cgroup id -> agent name (tags records)
        self.in_session = in_session
        self.counters = counters
        self.memo: collections.OrderedDict[tuple, Decided] = collections.OrderedDict()
        self.in_order_until = 0       # the latest time of an exec record handled in order
        self.last_seq: int | None = None
        self._countdown = CHECK_EVERY
        self._acting_policy = None
        self._acting: frozenset[str] = frozenset()

    @staticmethod
    def restrict(endpoint: str) -> None:
        """Only root (the probe) may connect: the lane carries kernel records alone."""
        os.chmod(endpoint[len("ipc://"):], 0o600)

    # -- the lane ------------------------------------------------------------------

    def between_records(self) -> None:
        """Called after each in-order record: a look at the lane every CHECK_EVERY."""
        self._countdown -= 1
        if self._countdown > 0:
            return
        self._countdown = CHECK_EVERY
        if self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self.drain()

    def drain(self) -> None:
        while True:
            try:
                raw = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._message(raw)

    def _message(self, raw: bytes) -> None:
        try:
            batch = wire.decode_batch(raw)
            if batch.source != wire.PRIORITY_SOURCE:
                raise wire.WireError(f"source {batch.source!r} on the priority lane")
            if any(record["kind"] != "exec" for record in batch.records):
                raise wire.WireError("a record other than exec on the priority lane")
        except wire.WireError as exc:
            # Nothing is lost: the in-order stream carries every record.
            self.counters["priority_malformed"] += 1
            log.error("priority lane: malformed message dropped: %s", exc)
            return
        if self.last_seq is not None and batch.seq > self.last_seq + 1:
            self.counters["priority_missed_batches"] += batch.seq - self.last_seq - 1
        self.last_seq = batch.seq
        for record in batch.records:
            self.counters["priority_records"] += 1
            self._ahead(record)

    def _acting_agents(self) -> frozenset[str]:
        policy = self.governor.policy
        if policy is not self._acting_policy:
            self._acting_policy, self._acting = policy, frozenset(self.governor.acting_agents())
        return self._acting

    def _ahead(self, record: dict) -> None:
        """Decide one copy now and act; remember a violation for its record in order."""
        counters = self.counters
        if record["time"] <= self.in_order_until:
            counters["priority_late"] += 1   # its record may have been handled in order already
            return
        key = key_of(record)
        if key in self.memo:
            counters["priority_duplicates"] += 1
            return
        cgroup_id = record["agent_cgroup_id"]
        agent = self.agents.get(cgroup_id)
        if agent is None:
            counters["priority_left_unknown_cgroup"] += 1
            return
        if agent not in self._acting_agents():
            counters["priority_left_not_acting"] += 1
            return
        if self.in_session(cgroup_id):
            counters["priority_left_session"] += 1
            return
        paths = exec_paths_alone(record)
        if paths is None:
            counters["priority_left_relative_path"] += 1
            return
        copy = {**record, "agent": agent, **paths}
        before = set(copy)
        with self.governor.unbatched():
            violation = self.governor.judge(copy)
        if violation is None:
            counters["priority_allowed"] += 1   # decided again in order, the same way
            return
        violation["ahead_of_order"] = True
        counters["priority_acted"] += 1
        self.memo[key] = Decided(agent, judged_path(copy), {k: copy[k] for k in copy if k not in before},
                                 violation)
        if len(self.memo) > MEMO_SIZE:
            self.memo.popitem(last=False)
            counters["priority_evicted"] += 1

    # -- the in-order path -----------------------------------------------------------

    def judge_in_order(self, record: dict) -> dict | None:
        """Governor.judge for an exec record in order, or the decision the lane
        already took on its copy (then nothing is done again)."""
        if record["time"] > self.in_order_until:
            self.in_order_until = record["time"]
        decided = self.memo.pop(key_of(record), None) if self.memo else None
        if decided is None:
            return self.governor.judge(record)
        record.update(decided.fields)
        self.counters["priority_in_order"] += 1
        if record.get("agent") != decided.agent or judged_path(record) != decided.path:
            # A retag queued before it, or a resolver that no longer resolves
            # an absolute path alone: said, never acted on twice.
            self.counters["priority_disagreed"] += 1
            log.warning("priority lane: exec of pid %d decided as agent %r's of %r; in order: %r's of %r",
                        record["pid"], decided.agent, decided.path, record.get("agent"), judged_path(record))
        return decided.violation

    def state(self) -> dict:
        return {"memo": len(self.memo), "memo_size": MEMO_SIZE}

    def close(self) -> None:
        self.sock.close()
