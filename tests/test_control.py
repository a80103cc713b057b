"""The client of the daemon's event feed (control.subscribe): decoded batches,
the batches a slow subscriber missed, malformed messages named; and a clear
error when no daemon runs."""
from __future__ import annotations

import contextlib
import threading

import pytest
import zmq

from agentwarden import control, wire
from agentwarden.settings import Settings

GAP = {"kind": "gap", "time": 1, "count": 4, "stage": "ring", "detail": None}


@pytest.fixture
def feed_publisher(tmp_path):
    """An XPUB socket where the daemon's feed would be: it sees the subscription
    arrive, so nothing is published before the subscriber is there."""
    settings = Settings(run_dir=tmp_path)
    pub = zmq.Context.instance().socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(settings.events_endpoint)
    yield settings, pub
    pub.close()


def publish_when_subscribed(pub: zmq.Socket, messages: list[bytes]) -> threading.Thread:
    def run():
        if pub.poll(10_000):
            pub.recv()  # the subscription
            for message in messages:
                pub.send_multipart([wire.TOPIC_EVENTS, message])
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_subscribe_yields_batches_counts_missed_ones_and_names_malformed_messages(feed_publisher):
    settings, pub = feed_publisher
    thread = publish_when_subscribed(pub, [wire.encode_batch("daemon", 1, [GAP]), b"garbage",
                                           wire.encode_batch("daemon", 2, [GAP, GAP]),
                                           wire.encode_batch("daemon", 6, [])])
    with contextlib.closing(control.subscribe(settings)) as feed:
        received = [next(feed) for _ in range(4)]
    thread.join()
    assert [(r.batch.seq if r.batch else None, r.missed) for r in received] == [(1, 0), (None, 0), (2, 0), (6, 3)]
    assert received[0].batch.records == [GAP] and received[0].malformed is None
    assert received[1].malformed.startswith("not msgpack")


def test_subscribe_without_a_daemon_says_so_at_once(tmp_path):
    with pytest.raises(control.DaemonUnavailable, match="the daemon is not running"):
        control.subscribe(Settings(run_dir=tmp_path))


def test_wait_for_tag_without_a_daemon_is_none(tmp_path):
    assert control.wait_for_tag(Settings(run_dir=tmp_path), 1, present=True) is None
