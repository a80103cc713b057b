"""Repeated opens, folded in the kernel (bpf/agentwarden.bpf.c, "repeated
opens"): the probe's side. A thread swaps the map the program counts into
(`folded` points at folded_a or folded_b) and turns each key of the old map
that counted repeats into one open record with `count` (the opens it stands
for), `time` and `last_time` (the first and last of them).

The swap is an update of a map of maps: the kernel returns from it only after
every program that could still hold the old map has finished, so the old map
is read whole, with nothing counting into it any more, then emptied. Swaps
come every `fold_interval` while opens flow, and sooner once repeats stop
(QUIET): counts reach the daemon within the interval, and at once after a
burst. At the end (`last`) the probe swaps once more and sends what was left.
"""
from __future__ import annotations

import ctypes as ct
import logging
import threading
import time

log = logging.getLogger("agentwarden.probe")

# How often the thread looks at the kernel's counters, and how long repeats
# must have stopped for their counts to go out before the interval ends.
LOOK = 0.05   # seconds
QUIET = 0.15  # seconds
# Where the record (struct aw_file, ts_ns 0) starts in struct aw_fold_key: after sb, ino, generation, reserved.
RECORD_OFFSET = 24


class Folder:
    """Swaps the fold maps and makes the records of their counts."""

    def __init__(self, bpf, decoder, constants: dict[str, int], interval: float, counter_sum):
        self.decoder = decoder
        self.interval = interval
        self._counter_sum = counter_sum   # slot -> the kernel's per-CPU counter summed
        self._folded_slot = constants["AW_COUNTER_FOLDED"]
        self._open_slot = constants["AW_KIND_OPEN"]
        self._outer = bpf[b"folded"]
        self._maps = (bpf[b"folded_a"], bpf[b"folded_b"])
        self._current = 0
        self._lock = threading.Lock()   # one swap at a time (the thread's, or last())
        self._ready: list[dict] = []    # records made, not yet taken by the loop
        self._ready_lock = threading.Lock()
        self._stop = threading.Event()
        # records and opens sent, swaps, and failures of the thread (logged; it lives on)
        self.counters = {"fold_records": 0, "folded_opens": 0, "fold_swaps": 0, "fold_errors": 0}
        self._point(0)
        self._thread = threading.Thread(target=self._run, name="fold", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _point(self, index: int) -> None:
        # The kernel waits here for the programs still using the old map (synchronize_rcu).
        self._outer[ct.c_int(0)] = ct.c_int(self._maps[index].get_fd())
        self._current = index

    def take(self) -> list[dict]:
        """The records made since the last take (the loop's, each turn)."""
        with self._ready_lock:
            records, self._ready = self._ready, []
        # Counted as taken: a health record made after this take follows them.
        self.counters["fold_records"] += len(records)
        self.counters["folded_opens"] += sum(r["count"] for r in records)
        return records

    def last(self) -> list[dict]:
        """Stops the thread, swaps once more, and returns every record left."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._swap()
        return self.take()

    def _run(self) -> None:
        folded_seen = opens_seen = self._counts()
        last_swap = last_change = time.monotonic()
        pending = False
        while not self._stop.wait(LOOK):
            now = time.monotonic()
            try:
                counts = self._counts()
            except Exception:   # the thread lives on: the counts wait in the kernel
                self.counters["fold_errors"] += 1
                log.exception("folding repeated opens: reading the kernel's counters failed")
                continue
            if counts[0] != folded_seen[0]:
                pending, last_change = True, now
            folded_seen = counts
            moved = counts != opens_seen   # keys added (opens that went out) or repeats counted
            due = now - last_swap >= self.interval
            if (pending and (due or now - last_change >= QUIET)) or (moved and due):
                try:
                    self._swap()
                except Exception:   # never take the probe down: counts wait for the next swap
                    self.counters["fold_errors"] += 1
                    log.exception("folding repeated opens: the swap failed")
                    continue
                last_swap, pending, opens_seen = now, False, counts

    def _counts(self) -> tuple[int, int]:
        return self._counter_sum(self._folded_slot), self._counter_sum(self._open_slot)

    def _swap(self) -> None:
        with self._lock:
            old = self._maps[self._current]
            self._point(1 - self._current)
            records = []
            for key, value in old.items_lookup_and_delete_batch():
                if value.count:
                    records.append(self._record(key, value))
            self.counters["fold_swaps"] += 1
        if records:
            records.sort(key=lambda r: r["time"])
            with self._ready_lock:
                self._ready.extend(records)

    def _record(self, key, value) -> dict:
        """The open the key's record says, standing for value.count more of it."""
        # The key's zeros end the path; its path_len says where.
        record = self.decoder.decode(bytes(key)[RECORD_OFFSET:])
        boot_to_wall = self.decoder.boot_to_wall_ns
        record["time"] = value.first_ns + boot_to_wall
        record["last_time"] = value.last_ns + boot_to_wall
        record["count"] = value.count
        return record
