"""The priority lane, probe side: a copy of each exec record, sent to the
daemon as soon as it is drained from the kernel's `vital` ring, on a socket of
its own, ahead of the in-order stream (which carries the record as always).

Under a flood the in-order stream is seconds behind (the kernel's `events`
ring backs up, the records are merged by time, the daemon works through them
in order): an exec no allow rule matches, which the daemon kills in user
space, would run that long. With the copy the daemon decides and acts at once
(daemon/priority.py), and archives the record in its place, with the decision
already taken.

Only exec records of agents whose exec violations the daemon acts on (the
kernel-rules message's `exec_prompt`; every agent's until it is heard, and an
agent cgroup this probe does not know yet). A copy that does not fit (the
daemon is not connected, or not reading the lane) is dropped and counted: the
in-order stream still carries the record, only the early action is lost.
"""
from __future__ import annotations

import collections

import zmq

from agentwarden import wire

# Messages queued towards the daemon; past it copies are dropped (counted).
LANE_HWM = 64


class PriorityLane:
    def __init__(self, ctx: zmq.Context, endpoint: str, tags, counters: collections.Counter):
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, LANE_HWM)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)   # nothing queued for a daemon not connected
        self.sock.connect(endpoint)
        self.tags = tags   # the probe's TagMirror: agent cgroup id -> its agent
        self.counters = counters
        # The agents whose exec violations the daemon acts on; None: not heard yet (all).
        self.acting: frozenset[str] | None = None
        self.seq = 0

    def set_acting(self, agents: list[str] | None) -> None:
        self.acting = None if agents is None else frozenset(agents)

    def _wanted(self, record: dict) -> bool:
        if record["kind"] != "exec":
            return False
        if self.acting is None:
            return True
        tagged = self.tags.current.get(record["agent_cgroup_id"])
        return tagged is None or tagged.agent in self.acting

    def send(self, records: list[dict]) -> None:
        """Copies of the exec records among records (decoded from `vital`), at once."""
        copies = [r for r in records if self._wanted(r)]
        if not copies:
            return
        try:
            self.sock.send(wire.encode_batch(wire.PRIORITY_SOURCE, self.seq, copies), zmq.NOBLOCK)
        except zmq.Again:
            self.counters["priority_dropped"] += len(copies)
            return
        self.seq += 1
        self.counters["priority_sent"] += len(copies)

    def close(self) -> None:
        self.sock.close()
