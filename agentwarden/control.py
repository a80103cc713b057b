"""Client side of the daemon's control socket (REQ/REP, msgpack)."""
from __future__ import annotations

import os
from typing import Any

import zmq

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
