"""`agentwarden run`: start a command as an agent session whose execs and file
changes wait for the daemon's decision (seccomp user notification), and the
requests on the supervisor's and the probe's sockets.

The session itself is started by the compiled launcher (launcher/agentwarden.c,
built as `_launcher` next to this package): agent harnesses start one per tool
call, and Python's own start-up would cost more than the session. It is also
the installed `agentwarden` command, which hands every other line to the
Python CLI; given a `run` line, the Python CLI resolves the settings and execs
it (`launch`). Its steps, in order: make and tag the session cgroup, have the
probe watch it, join it, install the filter (the supervisor's, `launch` on the
sessions socket), hand the listener to the daemon, drop to the user, exec.
From the filter on, every exec -- the command itself included -- is decided by
the daemon; if the daemon is gone, notified calls fail instead of proceeding.
"""
from __future__ import annotations

import os
# socket.py's C core: socket.py itself (enum classes, selectors) costs every
# `run` start a few ms, for nothing run uses.
import _socket
import struct
from pathlib import Path
from typing import NoReturn

from . import control, wire
from .errors import AgentwardenError, NeedsRoot, NoPermission
from .settings import Settings

# The compiled launcher (scripts/build-launcher.sh: make setup, the .deb).
LAUNCHER = Path(__file__).with_name("_launcher")
# The session id, in the command's environment (the kernel's word is the cgroup xattr).
SESSION_ENV = "AGENTWARDEN_SESSION"
# The run dir the Python CLI resolved, for the launcher alone (it unsets it).
LAUNCHER_RUN_DIR_ENV = "AGENTWARDEN_LAUNCHER_RUN_DIR"


class ProbeUnavailable(AgentwardenError):
    pass


def _connect(settings: Settings, path: Path, timeout: float) -> _socket.socket:
    """A seqpacket socket connected to the daemon's sessions socket (SO_PEERCRED
    tells it who asks), or one clear error."""
    control.check_reachable(settings, f"ipc://{path}")
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except PermissionError:
        sock.close()
        raise NoPermission(f"cannot reach {path}: run this as root or as a member of the "
                               "admin group") from None
    except ConnectionRefusedError:
        sock.close()
        raise control.DaemonUnavailable(
            f"the daemon is not running (nothing listens on {path}, a socket left by a stopped "
            "daemon); start it with `agentwarden up`") from None
    return sock


def _exchange(sock: _socket.socket, path: Path, message: dict, fd: int | None = None,
              who: str = "the daemon", unavailable=control.DaemonUnavailable) -> dict:
    """Send one request (with fd as SCM_RIGHTS), return the answer; closes sock."""
    try:
        data = wire.pack(message)
        if fd is None:
            sock.send(data)
        else:
            sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack("i", fd))])
        try:
            reply = sock.recv(wire.MAX_ADMIN_REPLY_BYTES)
        except TimeoutError:
            raise unavailable(f"{who} did not answer on {path} within {sock.gettimeout():g}s") from None
    finally:
        sock.close()
    if not reply:
        raise unavailable(f"{who} closed {path} without an answer")
    try:
        return wire.decode_reply(reply)
    except wire.WireError as exc:
        raise AgentwardenError(f"{who} sent a malformed answer on {path}: {exc}") from None


def request(settings: Settings, message: dict, fd: int | None = None, timeout: float = 10.0) -> dict:
    """One request on the daemon's sessions socket (SO_PEERCRED tells it who asks)."""
    path = settings.sessions_socket
    return _exchange(_connect(settings, path, timeout), path, message, fd)


def probe_request(settings: Settings, message: dict, timeout: float = 5.0) -> dict:
    """One request on the probe's watch socket (root only; wire.PROBE_COMMANDS).
    ProbeUnavailable when no probe listens there."""
    path = settings.probe_socket
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise ProbeUnavailable(f"the probe is not running (nothing listens on {path}); start it "
                               "with `agentwarden up`") from None
    except PermissionError:
        sock.close()
        raise NeedsRoot("asking the probe") from None
    return _exchange(sock, path, message, who="the probe", unavailable=ProbeUnavailable)


def admin_request(settings: Settings, message: dict) -> dict:
    reply = request(settings, message)   # who asks, the supervisor learns from the kernel
    if not reply.get("ok"):
        raise AgentwardenError(reply.get("error", "refused"))
    return reply


def launch(settings: Settings, agent: str, command: list[str], user: str | None, task: str,
           on_behalf_of: str, group: str | None = None) -> NoReturn:
    """Start the session: exec the launcher with these settings' run dir (it
    reads no other). Not told on whose behalf, it names the invoking login
    user (identity.invoking_user, from the kernel)."""
    if os.geteuid() != 0:
        raise NeedsRoot("agentwarden run")
    if not command:
        raise AgentwardenError("no command given: agentwarden run --agent NAME -- COMMAND [ARG...]")
    argv = [str(LAUNCHER), "run", f"--agent={agent}"]
    for option, value in (("--user", user), ("--group", group), ("--task", task or None),
                          ("--on-behalf-of", on_behalf_of or None)):
        if value is not None:
            argv.append(f"{option}={value}")
    env = dict(os.environ)
    env[LAUNCHER_RUN_DIR_ENV] = str(settings.run_dir)
    try:
        os.execve(LAUNCHER, [*argv, "--", *command], env)
    except OSError as exc:
        raise AgentwardenError(f"cannot start the session launcher {LAUNCHER}: {exc.strerror} (build it "
                               "with `make setup`, or reinstall the package)") from None
