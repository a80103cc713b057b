"""Client side of the daemon's sockets: the control socket (REQ/REP, msgpack)
and the event feed (SUB)."""
from __future__ import annotations

import errno
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Iterator

from . import wire
from .errors import EXIT_UNREACHABLE, AgentwardenError, NoPermission
from .settings import Settings

FEED_CHECK_INTERVAL = 1.0   # seconds between looks at whether the feed's daemon is still there


class DaemonUnavailable(AgentwardenError):
    exit_code = EXIT_UNREACHABLE


def _not_open(settings: Settings, path: str) -> NoPermission:
    return NoPermission(f"{path} is not open to you: run this as root (sudo) or as a member of "
                        f"the admin group ({settings.admin_group or 'none: root only'})")


def _socket_path(endpoint: str) -> str:
    return endpoint[len("ipc://"):]


def check_reachable(settings: Settings, endpoint: str) -> None:
    """One clear error when a socket in the run dir cannot be used."""
    path = _socket_path(endpoint)
    if not os.access(settings.run_dir, os.X_OK) and os.path.isdir(settings.run_dir):
        raise _not_open(settings, str(settings.run_dir))
    if not os.path.exists(path):
        raise DaemonUnavailable(
            f"the daemon is not running (no socket at {path}); start it with `agentwarden up`")
    probe_listener(settings, path)


def probe_listener(settings: Settings, path: str, kind: int = socket.SOCK_STREAM) -> None:
    """Whether anything listens on a socket file: a daemon stopped with Ctrl-C
    (or killed) leaves its files behind, and ZeroMQ would wait on them silently."""
    sock = socket.socket(socket.AF_UNIX, kind)
    try:
        sock.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        raise DaemonUnavailable(
            f"the daemon is not running (nothing listens on {path}, a socket left by a stopped "
            "daemon); start it with `agentwarden up`") from None
    except PermissionError:
        raise _not_open(settings, path) from None
    except OSError as exc:
        if exc.errno != errno.EPROTOTYPE:   # another socket type: let the real client say
            raise DaemonUnavailable(f"cannot reach {path}: {exc.strerror}") from None
    finally:
        sock.close()


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
    """Raises DaemonUnavailable when the daemon closes the feed (it stopped):
    ZeroMQ would otherwise wait for it to come back, silently."""
    import zmq
    from zmq.utils.monitor import recv_monitor_message
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, wire.TOPIC_EVENTS)
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    sock.connect(endpoint)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(monitor, zmq.POLLIN)
    last_seq = None
    try:
        while True:
            ready = dict(poller.poll(int(FEED_CHECK_INTERVAL * 1000)))
            if monitor in ready and recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED:
                raise DaemonUnavailable(f"the daemon went away (it closed {_socket_path(endpoint)}); "
                                        "start it again with `agentwarden up`, then tail again")
            if sock not in ready:
                continue
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
        sock.disable_monitor()
        monitor.close()
        sock.close()
