"""The supervisor's records of calls it performed for a session's task
(supervisor/perform.py: a write-open, rename, unlink or truncate done on the
task's behalf), put in their place among the task's own records.

They come on the release pair, at once; the kernel's records the task made
before the call wait in the ring buffer (up to wakeup_interval) and in the
probe's batches, so they would arrive later. The process model needs the
task's order -- an exec before the call drops descriptors, and the fd an open
returned is named by the task's later *at and f* calls -- so each performed
record waits here until a record of its process that is later than it
arrives (it goes first), or until a probe health record 1 s later than it
says the kernel's records up to it are in, or the daemon stops. Times are
the wall clock on both sides (the probe's: boot time plus the offset it took
at its start), so a step of the clock since then can misorder records within
the step.
"""
from __future__ import annotations

from agentwarden import wire

LATE_NS = 1_000_000_000   # a probe health record this much later: its records are all in


class Performed:
    def __init__(self):
        self.waiting: dict[int, list[dict]] = {}   # pid -> its performed records, oldest first

    @staticmethod
    def wanted(record: dict, source: str) -> bool:
        """A performed call's record, which waits for its place."""
        return source.startswith("supervisor") and bool(record.get("performed"))

    def hold(self, record: dict) -> None:
        self.waiting.setdefault(record["pid"], []).append(record)

    def before(self, record: dict) -> list[dict]:
        """The performed records that go before this record of the probe's."""
        if record["kind"] in wire.EVENT_KINDS:
            return self._due(record["pid"], record["time"])
        if record["kind"] == "health" and record.get("stage") == "probe":
            return [r for pid in list(self.waiting) for r in self._due(pid, record["time"] - LATE_NS)]
        return []

    def _due(self, pid: int, time_ns: int) -> list[dict]:
        waiting = self.waiting.get(pid)
        if not waiting:
            return []
        due = [r for r in waiting if r["time"] <= time_ns]
        if due:
            rest = [r for r in waiting if r["time"] > time_ns]
            if rest:
                self.waiting[pid] = rest
            else:
                del self.waiting[pid]
        return due

    def remaining(self) -> list[dict]:
        out = sorted((r for records in self.waiting.values() for r in records), key=lambda r: r["time"])
        self.waiting.clear()
        return out
