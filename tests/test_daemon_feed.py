"""The daemon's live feed (daemon/feed.py) on a real daemon fed by a fake
probe: no packing while nobody subscribes, and a subscriber that joins gets
every batch from its first one on, in order, also after another leaves."""
from __future__ import annotations

import contextlib

import pytest
import zmq

from agentwarden import wire
from conftest import wait_for
from fakeprobe import Daemon, FakeProbe, open_record, tags_record

pytestmark = pytest.mark.kernel

CGROUP = 4343
PID = 5151


class Subscriber:
    """A SUB socket on the daemon's feed, as `tail` makes it."""

    def __init__(self, settings):
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, wire.TOPIC_EVENTS)
        self.sock.connect(settings.events_endpoint)
        self.batches: list[wire.Batch] = []

    def read(self, timeout_ms: int = 100) -> list[wire.Batch]:
        while self.sock.poll(timeout_ms):
            self.batches.append(wire.decode_batch(self.sock.recv_multipart()[-1]))
            timeout_ms = 0
        return self.batches

    def numbers(self) -> list[int]:
        return [r["n"] for b in self.read() for r in b.records if r["kind"] == "open" and "n" in r]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def daemon(kernel, tmp_path):
    d = Daemon(tmp_path).start()
    probe = FakeProbe(d.settings)
    probe.send([tags_record({CGROUP: {"agent": "feed", "path": "/sys/fs/cgroup/feed"}})])
    try:
        yield d, probe
    finally:
        probe.close()
        d.stop()


def counters(d: Daemon) -> dict:
    return d.status()["daemon"]["counters"]


def archived_n(d: Daemon, n: int) -> bool:
    return counters(d).get("records_open", 0) >= n


def test_nothing_is_packed_while_nobody_subscribes(daemon):
    d, probe = daemon
    before = counters(d)
    for n in range(20):
        probe.send([open_record(PID, CGROUP, f"/work/f{n}", n=n)])
    wait_for(lambda: archived_n(d, 20), what="20 opens archived")
    after = counters(d)
    assert after.get("published", 0) == before.get("published", 0)
    assert after["publish_skipped"] - before.get("publish_skipped", 0) >= 20


def test_a_subscriber_gets_every_batch_from_its_first_on(daemon):
    d, probe = daemon
    sent = 0

    def send(count: int) -> None:
        nonlocal sent
        for _ in range(count):
            probe.send([open_record(PID, CGROUP, f"/work/f{sent}", n=sent)])
            sent += 1

    first = Subscriber(d.settings)
    second = Subscriber(d.settings)
    try:
        # Subscriptions join asynchronously: send until each has seen a record.
        wait_for(lambda: (send(1), first.numbers() and second.numbers())[1], timeout=20,
                 what="both subscribers to receive")
        skipped = counters(d).get("publish_skipped", 0)
        send(200)
        wait_for(lambda: len(first.numbers()) and first.numbers()[-1] == sent - 1, what="the first's last record")
        wait_for(lambda: second.numbers()[-1] == sent - 1, what="the second's last record")
        for sub in (first, second):
            numbers = sub.numbers()
            assert numbers == list(range(numbers[0], sent)), "a subscriber missed records"
            seqs = [b.seq for b in sub.batches]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "the feed's seq has a gap"
        assert counters(d).get("publish_skipped", 0) == skipped   # nothing skipped while listened

        # One leaves: the other still gets every batch (its subscription stands).
        first.close()
        mark = sent
        send(100)
        wait_for(lambda: second.numbers()[-1] == sent - 1, what="the second's records after the first left")
        numbers = second.numbers()
        assert numbers[numbers.index(mark):] == list(range(mark, sent))
    finally:
        first.close()
        second.close()

    # The last one gone (its disconnect unsubscribes): packing stops again.
    def skipping() -> bool:
        before = counters(d).get("publish_skipped", 0)
        send(1)
        return wait_for(lambda: archived_n(d, sent), what="the open archived") and \
            counters(d).get("publish_skipped", 0) > before
    wait_for(skipping, what="the daemon to skip packing after the last subscriber left")


def test_a_subscriber_to_every_topic_counts(daemon):
    """An empty prefix subscribes to every topic, the events included."""
    d, probe = daemon
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(d.settings.events_endpoint)
    n = 0
    with contextlib.closing(sock):
        def events_arrive() -> bool:
            nonlocal n
            probe.send([open_record(PID, CGROUP, f"/work/g{n}", n=n)])
            n += 1
            while sock.poll(100):
                topic, *_ = sock.recv_multipart()
                if topic == wire.TOPIC_EVENTS:
                    return True
            return False
        wait_for(events_arrive, timeout=20, what="events on an every-topic subscription")
