"""The daemon's live feed: records republished for `tail` and `holds --watch`
on an XPUB socket, packed only while someone subscribes to them.

An XPUB socket hears of each topic's first subscriber and of its last one
leaving (a subscriber that disconnects unsubscribes). The feed keeps the set of
prefixes subscribed now; a batch is packed and sent only when one of them
matches the events topic, and counted as skipped otherwise. The set is read
from the socket just before each decision, so it is the socket's own view at
that moment: a subscriber is promised what a PUB socket promised it — every
batch published after its subscription reached the daemon (subscriptions join
asynchronously: `tail` waits for its first record), the batch seq showing what
it missed by reading too slowly.

The same socket carries the kernel rules to the probe and the supervisor
(their own topic, sent each tick whoever listens).
"""
from __future__ import annotations

import zmq

from agentwarden import wire

SUBSCRIBE = 1   # first byte of a subscription message on an XPUB socket (0: unsubscribe)


class Feed:
    def __init__(self, sock: zmq.Socket):
        self.sock = sock
        self.prefixes: set[bytes] = set()   # topic prefixes subscribed to now

    def _read_subscriptions(self) -> None:
        while True:
            try:
                message = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if message:
                (self.prefixes.add if message[0] == SUBSCRIBE else self.prefixes.discard)(message[1:])

    def listened(self) -> bool:
        """Whether anyone subscribes to the events now."""
        self._read_subscriptions()
        return any(wire.TOPIC_EVENTS.startswith(prefix) for prefix in self.prefixes)
