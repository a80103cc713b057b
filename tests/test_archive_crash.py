"""kill -9 the daemon at random moments while events stream into it, many
times over; afterwards the archive verifies and every record acknowledged as
durable is there, unchanged.

"Acknowledged as durable" means: reported by the daemon's status as
``archive_state.durable_seq`` together with ``durable_chain``, the chain hash of
that record. The daemon reports a seq there only after fsync returned for the
segment holding it. Because each record's chain hash covers every record before
it, finding that same hash at that seq afterwards proves every record up to it
survived exactly.

The iteration count comes from AGENTWARDEN_CRASH_ITERATIONS (default 50);
`make archive-soak` runs 500.
"""
from __future__ import annotations

import os
import random
import threading
import time

import pytest

from agentwarden.archive.segments import read_items
from agentwarden.errors import AgentwardenError

from fakeprobe import Daemon, FakeProbe, exec_record, open_record, tags_record

pytestmark = pytest.mark.kernel

ITERATIONS = int(os.environ.get("AGENTWARDEN_CRASH_ITERATIONS", "50"))
CGROUP = 4242


class Streamer(threading.Thread):
    """Pushes batches as fast as the daemon takes them; each record carries a
    number ``n`` that only ever grows."""

    def __init__(self, daemon: Daemon):
        super().__init__(daemon=True)
        self.settings = daemon.settings
        self.stopping = threading.Event()
        self.n = 0

    def run(self) -> None:
        probe = FakeProbe(self.settings)
        rng = random.Random(1)
        try:
            while not self.stopping.is_set():
                batch = []
                for _ in range(rng.randint(1, 200)):
                    pid = 10000 + self.n % 5000
                    if self.n % 3:
                        batch.append(open_record(pid, CGROUP, f"/work/src/file{self.n}.py", n=self.n))
                    else:
                        batch.append(exec_record(pid, CGROUP, ["/usr/bin/python3", "-c", f"step {self.n}"],
                                                 n=self.n))
                    self.n += 1
                if self.n < 2000 or rng.random() < 0.01:
                    batch.append(tags_record({CGROUP: {"agent": "crash", "path": "/sys/fs/cgroup/crash"}}))
                if not probe.send(batch, block=False):
                    pass  # the daemon is down or busy: these records are simply not sent
                time.sleep(0.01)  # about 10,000 records/s
        finally:
            probe.close()


def test_kill_9_at_random_moments_loses_nothing_acknowledged(kernel, tmp_path):
    rng = random.Random(int(os.environ.get("AGENTWARDEN_CRASH_SEED", "0")) or None)
    daemon = Daemon(tmp_path, env={"AGENTWARDEN_ARCHIVE_SEGMENT_BYTES": "2M"})
    streamer = Streamer(daemon)
    acknowledged: dict[int, str] = {}
    started = time.monotonic()
    daemon.start()
    streamer.start()
    try:
        for _ in range(ITERATIONS):
            deadline = time.monotonic() + rng.uniform(0.0, 0.8)
            while time.monotonic() < deadline:
                try:
                    state = daemon.archive_state()
                except AgentwardenError:
                    continue
                if state["durable_seq"] >= 0:
                    acknowledged[state["durable_seq"]] = state["durable_chain"]
                time.sleep(rng.uniform(0, 0.05))
            daemon.kill9()
            daemon.start()
        state = daemon.archive_state()
        acknowledged[state["durable_seq"]] = state["durable_chain"]
    finally:
        streamer.stopping.set()
        streamer.join()
        daemon.stop()
    elapsed = time.monotonic() - started

    result = daemon.cli("log", "verify")
    assert result.returncode == 0, result.stdout + result.stderr

    chains, numbers, cuts = {}, [], 0
    for item in read_items(daemon.settings.archive_dir):
        chains[item.seq] = item.chain.hex()
        if "n" in item.record:
            numbers.append(item.record["n"])
        if item.record["kind"] == "archive" and item.record["event"] == "torn-tail-cut":
            cuts += 1
    missing = {seq for seq in acknowledged if chains.get(seq) != acknowledged[seq]}
    assert not missing, f"acknowledged records lost or changed: {sorted(missing)[:10]}"
    assert numbers == sorted(set(numbers)), "records duplicated or reordered"
    assert len(acknowledged) >= ITERATIONS // 2  # the daemon did acknowledge along the way
    print(f"{ITERATIONS} kills in {elapsed:.0f}s; {len(chains)} records archived, "
          f"{len(acknowledged)} durable acknowledgements checked, {cuts} torn tails cut, "
          f"{streamer.n} records offered")
