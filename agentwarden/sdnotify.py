"""The sd_notify protocol, for Type=notify services with a watchdog.

One datagram of newline-separated KEY=VALUE assignments to the AF_UNIX socket
named by $NOTIFY_SOCKET ("@name" is in the abstract namespace). READY=1 says
start-up is complete; WATCHDOG=1 must arrive at least every $WATCHDOG_USEC
microseconds (when $WATCHDOG_PID is set, only that process is watched);
STATUS= is the one-line text `systemctl status` shows; STOPPING=1 says
shutdown began. Without $NOTIFY_SOCKET (not under systemd) every call does
nothing. A send that fails is logged once and otherwise ignored: monitoring
must not stop because systemd is busy.

The file-descriptor store: FDSTORE=1 with FDNAME=NAME and the fd as
SCM_RIGHTS asks the service manager to keep the fd for the service across its
restarts; FDSTOREREMOVE=1 with FDNAME=NAME closes it there. On the next start
the manager hands every stored fd back from fd 3 on, with LISTEN_PID (the new
process), LISTEN_FDS (how many) and LISTEN_FDNAMES (their names, joined by
':'); `listen_fds()` takes them. `FdStore` is the manager's side, for
`agentwarden up`, which plays systemd's part for the daemon it runs.
"""
from __future__ import annotations

import array
import contextlib
import fcntl
import logging
import os
import socket
import struct
import time

log = logging.getLogger("agentwarden.sdnotify")


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None):
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address if address.startswith(("/", "\0")) else None
        # Seconds between pings: a quarter of the timeout, so one slow loop turn
        # does not trip it.
        self.ping_every: float | None = None
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.ping_every = int(usec) / 4e6
        self._last_ping = 0.0
        self._last_status = None
        self._warned = False
        self._sock = None
        if self.address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str) -> bool:
        """notify(READY="1", STATUS="...") -> one datagram; False when not sent."""
        if not self._sock:
            return False
        message = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            self._sock.sendto(message, self.address)
        except OSError as exc:
            if not self._warned:
                log.warning("cannot notify systemd at %s: %s", self.address.lstrip("\0"),
                            exc.strerror)
                self._warned = True
            return False
        return True

    def store_fd(self, fd: int, name: str) -> bool:
        """Keep fd in the service manager's fd store as NAME (kept across
        restarts of the service, closed by a stop); False when not sent."""
        return self._send_fds(f"FDSTORE=1\nFDNAME={name}", [fd])

    def remove_fd(self, name: str) -> bool:
        """Close the stored fds named NAME."""
        return self._send_fds(f"FDSTOREREMOVE=1\nFDNAME={name}", [])

    def _send_fds(self, message: str, fds: list[int]) -> bool:
        if not self._sock:
            return False
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            self._sock.sendmsg([message.encode()], ancillary, 0, self.address)
        except OSError as exc:
            log.error("cannot %s at %s: %s", message.split("\n")[0], self.address.lstrip("\0"),
                      exc.strerror)
            return False
        return True

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send(READY="1", STATUS=status)
        self._last_ping = time.monotonic()

    def alive(self, status: str | None = None) -> None:
        """From the main loop: the watchdog ping (when due),
        with the status line when it changed."""
        if not self._sock:
            return
        fields = {}
        now = time.monotonic()
        if self.ping_every and now - self._last_ping >= self.ping_every:
            fields["WATCHDOG"] = "1"
            self._last_ping = now
        if status is not None and status != self._last_status:
            fields["STATUS"] = status
            self._last_status = status
        if fields:
            self.send(**fields)

    def stopping(self, status: str = "stopping") -> None:
        self.send(STOPPING="1", STATUS=status)

    def close(self) -> None:
        if self._sock:
            self._sock.close()
            self._sock = None


LISTEN_FDS_START = 3          # SD_LISTEN_FDS_START: the first fd handed over
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
MAX_FDS_PER_MESSAGE = 253     # SCM_MAX_FD


def valid_fd_name(name: str) -> bool:
    """A name systemd accepts for FDNAME: printable ASCII without ':', at most 255."""
    return 0 < len(name) <= 255 and all(32 < ord(c) < 127 for c in name) and ":" not in name


def listen_fds(environ: dict[str, str] | None = None) -> list[tuple[str, int]]:
    """The fds the service manager handed this process, as (name, fd), each
    close-on-exec; the LISTEN_* variables are removed so that children do not
    take them for theirs. Empty when none are meant for this process."""
    environ = os.environ if environ is None else environ
    pid, count = environ.get("LISTEN_PID", ""), environ.get("LISTEN_FDS", "")
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    for key in LISTEN_VARIABLES:
        environ.pop(key, None)
    if pid != str(os.getpid()) or not count.isdigit():
        return []
    out = []
    for i in range(int(count)):
        fd = LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
        except OSError:
            continue   # not open: nothing handed over there
        out.append((names[i] if i < len(names) else "unknown", fd))
    return out


class FdStore:
    """The service manager's side of the protocol, for `agentwarden up`: a
    datagram socket at `path` (the child's NOTIFY_SOCKET) that keeps the fds
    sent with FDSTORE=1, closes those of FDSTOREREMOVE=1, and takes messages
    only from root processes `trusted(pid)` accepts (the kernel's credentials
    of each datagram). The other assignments (READY, STATUS, WATCHDOG) are
    read and dropped: `up` watches its children itself."""

    def __init__(self, path, max_fds: int = 4096):
        self.path = str(path)
        self.max_fds = max_fds
        self.fds: dict[str, int] = {}       # FDNAME -> the fd kept (one per name)
        self.refused = 0
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o600)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self, trusted) -> None:
        """Handle every datagram waiting now; trusted(pid) -> whether that
        process may store fds (the service's own processes)."""
        room = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * 4) + socket.CMSG_SPACE(struct.calcsize("3i"))
        while True:
            try:
                data, ancillary, flags, _addr = self.sock.recvmsg(4096, room, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            if flags & socket.MSG_CTRUNC:   # out of fds (RLIMIT_NOFILE): what was sent is lost
                self.refused += 1
                log.error("fd store: a message's fds were cut off (too many open files)")
            fds, sender = [], None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
                elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    sender = struct.unpack("3i", payload[:12])
            fields = dict(line.split("=", 1) for line in data.decode(errors="replace").split("\n")
                          if "=" in line)
            if sender is None or sender[1] != 0 or not trusted(sender[0]):
                self.refused += 1
                log.error("fd store: refused a message from pid %s", sender and sender[0])
                fds_close(fds)
                continue
            name = fields.get("FDNAME", "stored")
            if fields.get("FDSTOREREMOVE") == "1":
                fds_close([self.fds.pop(name)] if name in self.fds else [])
            if fields.get("FDSTORE") == "1" and fds:
                if name in self.fds or len(self.fds) >= self.max_fds or not valid_fd_name(name):
                    self.refused += 1
                    log.error("fd store: not keeping %s (a duplicate, an invalid name, or full)", name)
                    fds_close(fds)
                    continue
                self.fds[name] = fds.pop(0)
            fds_close(fds)

    def handed_over(self) -> tuple[dict[str, str], list[int]]:
        """What a restarted child gets: the environment (LISTEN_FDS and
        LISTEN_FDNAMES; LISTEN_PID is set in the child) and the fds in order,
        to be placed from fd 3 on."""
        names = list(self.fds)
        if not names:
            return {}, []
        return {"LISTEN_FDS": str(len(names)), "LISTEN_FDNAMES": ":".join(names)}, \
            [self.fds[name] for name in names]

    def close(self) -> None:
        """A real stop: the stored fds close (sessions fail closed)."""
        fds_close(list(self.fds.values()))
        self.fds.clear()
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def place_fds_and_exec(argv: list[str], env: dict[str, str], fds: list[int]) -> None:
    """In a child between fork and exec: put fds at 3, 4, ... (inheritable),
    set LISTEN_PID to this process, and exec argv. Two passes, so that no fd
    is overwritten before it is moved."""
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 1024) for fd in fds]
    for i, fd in enumerate(high):
        os.dup2(fd, LISTEN_FDS_START + i, inheritable=True)
    os.execve(argv[0], argv, {**env, "LISTEN_PID": str(os.getpid())})


def fds_close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass

