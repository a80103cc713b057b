"""`agentwarden run`: start a command as an agent session whose execs and file
changes wait for the daemon's decision (seccomp user notification).

Order matters: make and tag the session cgroup, have the probe watch it (at
once: it puts the cgroup in its BPF maps before it answers), join it, install
the filter, hand the listener to the daemon, close our copy, drop to the user,
exec. From the filter on, every exec -- the command itself included -- is
decided by the daemon; if the daemon is gone, notified calls fail (ENOSYS)
instead of proceeding.

Started once per tool call by agent harnesses, so it imports little (no
ZeroMQ unless it must fall back to the daemon's status) and asks the probe
instead of scanning the cgroup tree.
"""
from __future__ import annotations

import grp
import os
import pwd
# socket.py's C core: socket.py itself (enum classes, selectors) costs every
# `run` start a few ms, for nothing run uses.
import _socket
import struct
import time
from pathlib import Path


from . import cgroups, control, wire
from . import seccomp_notify as sn
from .errors import AgentwardenError, NeedsRoot, NoPermission
from .settings import Settings


class ProbeUnavailable(AgentwardenError):
    pass


def _which(name: str) -> str | None:
    """shutil.which for an executable file (shutil costs run a few ms to import)."""
    candidates = [name] if "/" in name else [os.path.join(d or ".", name) for d in os.get_exec_path()]
    for path in candidates:
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


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


def _agent_cgroup(settings: Settings, agent: str) -> Path:
    # The agent's own cgroup: the outermost one tagged with its name that is
    # not itself a session. The probe knows them (a rescan's worth of work on
    # a host with many cgroups); one tagged since its last rescan is not yet
    # among them, so the tree is scanned when it names none.
    try:
        known = probe_request(settings, {"cmd": "agent", "agent": agent}).get("cgroups")
    except ProbeUnavailable:
        known = None
    if known:
        return Path(known[0])
    root = cgroups.cgroup2_root()
    found = [t for t in cgroups.agent_cgroups(root, agent, settings.agents_slice, settings.cgroup_scope)
             if not t.session]
    if not found:
        raise AgentwardenError(f"unknown agent {agent!r}: no cgroup is tagged with it "
                               f"(tag one: agentwarden tag agents/{agent} --agent {agent} --create)")
    return found[0].path


def _session_parent(settings: Settings, agent: str) -> Path:
    """Where the session cgroup goes: below this process's own cgroup when that
    is a delegated systemd unit (agent@NAME.service, `systemd-run -p
    Delegate=yes`: nothing of ours ran in an agent's cgroup before the
    session), else below the agent's tagged cgroup."""
    own = cgroups.own_cgroup(cgroups.cgroup2_root())
    if own is not None and cgroups.is_delegated(own):
        return own
    return _agent_cgroup(settings, agent)


def _watch_now(settings: Settings, cgroup: Path, session: str) -> None:
    """The probe watches the session cgroup as this session of this instance
    when this returns: its first exec is seen by the BPF program."""
    try:
        reply = probe_request(settings, {"cmd": "watch", "cgroup": str(cgroup)})
    except ProbeUnavailable:
        # No watch socket (a probe of an older version): wait for its rescan.
        _wait_watched(settings, cgroup)
        return
    if not reply.get("ok"):
        raise AgentwardenError(f"the probe cannot watch {cgroup}: {reply.get('error')}")
    tag = reply.get("tag") or {}
    if tag.get("session") != session or tag.get("instance") != settings.instance:
        raise AgentwardenError(f"the probe does not watch {cgroup} as session {session} of this "
                               f"instance ({settings.instance}): it reports {tag}")


def _wait_watched(settings: Settings, cgroup: Path, timeout: float = 10.0) -> None:
    cgid, deadline = str(cgroups.cgroup_id(cgroup)), time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cgid in control.request(settings, "status", timeout=2)["status"]["probe"]["tags"]:
            return
        time.sleep(0.05)
    raise AgentwardenError(f"the probe did not start watching {cgroup} within {timeout:g}s")


def run(settings: Settings, agent: str, command: list[str], user: str | None, task: str,
        on_behalf_of: str, group: str | None = None) -> None:
    """Never returns: execs the command, or raises before anything ran."""
    if os.geteuid() != 0:
        raise NeedsRoot("agentwarden run")
    if not command:
        raise AgentwardenError("no command given: agentwarden run --agent NAME -- COMMAND [ARG...]")
    cgroups.validate_agent_name(agent)
    program = _which(command[0])
    if program is None:
        raise AgentwardenError(f"command not found: {command[0]}")
    program = os.path.abspath(program)
    account = None
    if user is not None:
        try:
            account = pwd.getpwnam(user)
        except KeyError:
            raise AgentwardenError(f"no such user: {user}") from None
    if group is not None and account is None:
        raise AgentwardenError("--group needs --user (the group the user runs in)")
    gid = account.pw_gid if account is not None else None
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise AgentwardenError(f"no such group: {group}") from None
    parent = _session_parent(settings, agent)
    # Connected now: the daemon's supervisor listens, or this says why before
    # anything is made. It learns who we are (SO_PEERCRED) at the registration.
    supervisor = _connect(settings, settings.sessions_socket, timeout=10.0)

    # Built before joining the agent: libseccomp writes it through a temporary
    # file, which would be the agent's write, watched but not yet supervised.
    seccomp_filter = sn.build_filter()
    session = f"s-{os.urandom(6).hex()}"
    cgroup = parent / session
    cgroup.mkdir()
    try:
        cgroups.tag(cgroup, agent)
        for name, value in ((cgroups.SESSION_XATTR, session), (cgroups.INSTANCE_XATTR, settings.instance),
                            (cgroups.ATTRIBUTION_XATTRS["task"], task),
                            (cgroups.ATTRIBUTION_XATTRS["on_behalf_of"], on_behalf_of),
                            (cgroups.ATTRIBUTION_XATTRS["user"], user or "root")):
            if value:
                os.setxattr(cgroup, name, value[:cgroups.ATTRIBUTION_MAX].encode())
        _watch_now(settings, cgroup, session)
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))
    except BaseException:
        supervisor.close()
        try:
            cgroup.rmdir()
        except FileNotFoundError:   # the agent cgroup went away meanwhile
            pass
        raise

    listener = sn.install(seccomp_filter)
    # From here on, failing means the command never runs: the filter stays.
    try:
        reply = _exchange(supervisor, settings.sessions_socket, {
            "cmd": "register", "session": session, "agent": agent,
            "user": user or pwd.getpwuid(os.getuid()).pw_name, "task": task,
            "on_behalf_of": on_behalf_of, "host": _socket.gethostname(), "cgroup": str(cgroup)},
            fd=listener)
    finally:
        os.close(listener)
    if not reply.get("ok"):
        raise AgentwardenError(f"the daemon refused the session: {reply.get('error')}")
    if account is not None:
        os.initgroups(account.pw_name, gid)
        os.setgid(gid)
        os.setuid(account.pw_uid)
        os.environ.update(HOME=account.pw_dir, USER=account.pw_name, LOGNAME=account.pw_name)
    os.environ["AGENTWARDEN_SESSION"] = session
    try:
        os.execv(program, command)
    except OSError as exc:
        raise AgentwardenError(f"cannot run {program}: {exc.strerror}") from None
