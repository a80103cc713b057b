"""Client side of the daemon's sockets: the control socket (REQ/REP, msgpack)
and the event feed (SUB)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

from . import wire
from .errors import AgentwardenError
from .settings import Settings


class DaemonUnavailable(AgentwardenError):
    pass


def _socket_path(endpoint: str) -> str:
    return endpoint[len("ipc://"):]


def check_reachable(settings: Settings, endpoint: str) -> None:
    """One clear error when a socket in the run dir cannot be used."""
    path = _socket_path(endpoint)
    if not os.access(settings.run_dir, os.X_OK) and os.path.isdir(settings.run_dir):
        raise AgentwardenError(f"{settings.run_dir} is not open to you: run this as root (sudo) "
                               "or as a member of the admin group")
    if not os.path.exists(path):
        raise DaemonUnavailable(
            f"the daemon is not running (no socket at {path}); start it with `agentwarden up`")


def request(settings: Settings, cmd: str, timeout: float = 3.0, check: bool = True,
            **args: Any) -> dict[str, Any]:
    import zmq   # here: `agentwarden run` imports this module and should start fast
    endpoint = settings.control_endpoint
    check_reachable(settings, endpoint)
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(wire.encode_control(cmd, **args))
        if not sock.poll(int(timeout * 1000)):
            raise DaemonUnavailable(
                f"the daemon did not answer on {endpoint} within {timeout:g}s; is it running?")
        try:
            reply = wire.decode_reply(sock.recv())
        except wire.WireError as exc:
            raise AgentwardenError(f"the daemon sent a malformed answer on {endpoint}: {exc}") from None
    finally:
        sock.close()
    if check and not reply.get("ok"):
        raise AgentwardenError(f"daemon refused {cmd!r}: {reply.get('error')}")
    return reply


def wait_for_tag(settings: Settings, cgroup_id: int, present: bool, timeout: float = 5.0) -> bool | None:
    """Whether the probe reported a cgroup's tag as `present` (or gone) within
    `timeout` seconds; None when no daemon runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            tags = request(settings, "status", timeout=1)["status"]["probe"]["tags"]
        except DaemonUnavailable:
            return None
        if (str(cgroup_id) in tags) == present:
            return True
        time.sleep(0.05)
    return False


@dataclass(frozen=True)
class Received:
    """One message of the daemon's event feed."""
    batch: wire.Batch | None         # None when the message was malformed
    missed: int = 0                  # batches published before it that this subscriber never got
    malformed: str | None = None     # why the message could not be decoded


def subscribe(settings: Settings) -> Iterator[Received]:
    """The daemon's event feed, message by message, until the iterator is
    closed (which closes its socket). Raises at once when the feed's socket
    cannot be used."""
    check_reachable(settings, settings.events_endpoint)
    return _feed(settings.events_endpoint)


def _feed(endpoint: str) -> Iterator[Received]:
    import zmq
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, wire.TOPIC_EVENTS)
    sock.connect(endpoint)
    last_seq = None
    try:
        while True:
            frames = sock.recv_multipart()
            try:
                batch = wire.decode_batch(frames[-1])
            except wire.WireError as exc:
                yield Received(None, malformed=str(exc))
                continue
            # A PUB socket drops what a slow subscriber cannot take; the seq shows the gap.
            missed = batch.seq - last_seq - 1 if last_seq is not None and batch.seq > last_seq + 1 else 0
            last_seq = batch.seq
            yield Received(batch, missed)
    finally:
        sock.close()
