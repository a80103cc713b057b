"""Which hold let an action through: the supervisor's `release` records
(a held call let through by an approval, or by a remembered one) and the
kernel's exec/open record of that call, which the daemon names the hold in
(`hold_id`, or `remembered_from`).

The order is exact. The supervisor sends a release on a UNIX seqpacket pair
(`Channel`) before the call continues, and a send returns only once the
record is in the daemon's receive queue; the kernel makes its record of the
call only after it continues (seccomp runs before the syscall tracepoints),
and the daemon drains the pair before each message it ingests. So a release
is always noted before the record it names arrives.

A record is matched by its thread, its kind and its path argument as the
task passed it (an open also by its flags), the oldest release first, so
identical calls in a row pair in order. A release whose call made no record
(it failed before the kernel recorded it, or the record was lost) waits until
its process ends (the exit record names its last thread and its leader); at
most MAX_PENDING wait in all (the oldest are dropped first, counted).
"""
from __future__ import annotations

import collections
import socket

from agentwarden import wire

MAX_PENDING = 4096


class Channel:
    """The daemon's end of the pair; the other end is the supervisor's."""

    def __init__(self):
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.ours.setblocking(False)
        self.theirs.set_inheritable(True)

    def handed_over(self) -> None:
        """The supervisor has its end: ours only reads."""
        self.theirs.close()

    def fileno(self) -> int:
        return self.ours.fileno()

    def receive(self) -> list[bytes]:
        """Every message queued now."""
        messages = []
        while True:
            try:
                raw = self.ours.recv(wire.MAX_ADMIN_REPLY_BYTES)
            except BlockingIOError:
                return messages
            if not raw:
                return messages
            messages.append(raw)

    def close(self) -> None:
        self.ours.close()


class Releases:
    def __init__(self, counters: collections.Counter):
        self.pending: dict[int, list[dict]] = {}    # tid -> releases waiting for their record
        self.count = 0
        self.counters = counters

    def note(self, release: dict) -> None:
        if release["event"] not in wire.DECIDED_KINDS or not release["paths"]:
            return   # a rename, unlink or truncate: no kernel record to name it
        if self.count >= MAX_PENDING:
            self._drop_oldest()
        self.pending.setdefault(release["tid"], []).append(release)
        self.count += 1

    def _drop_oldest(self) -> None:
        tid = min(self.pending, key=lambda t: self.pending[t][0]["time"])
        self.pending[tid].pop(0)
        if not self.pending[tid]:
            del self.pending[tid]
        self.count -= 1
        self.counters["releases_unmatched"] += 1

    def annotate(self, record: dict) -> None:
        """Name the hold in the exec/open record a pending release announced."""
        if record["kind"] == "exit":   # the process ended: its last thread and its leader
            for tid in {record["tid"], record["pid"]} & self.pending.keys():
                self.count -= len(self.pending[tid])
                self.counters["releases_unmatched"] += len(self.pending.pop(tid))
            return
        waiting = self.pending.get(record["tid"])
        if not waiting:
            return
        path = record.get("filename" if record["kind"] == "exec" else "path")
        for i, release in enumerate(waiting):
            if (release["event"] == record["kind"] and release["paths"][0] == path
                    and (record["kind"] == "exec" or record["flags"] == release["flags"])):
                record["remembered_from" if release["remembered"] else "hold_id"] = release["hold_id"]
                del waiting[i]
                if not waiting:
                    del self.pending[record["tid"]]
                self.count -= 1
                self.counters["releases_matched"] += 1
                return
