"""The sd_notify protocol, for Type=notify services with a watchdog.

One datagram of newline-separated KEY=VALUE assignments to the AF_UNIX socket
named by $NOTIFY_SOCKET ("@name" is in the abstract namespace). READY=1 says
start-up is complete; WATCHDOG=1 must arrive at least every $WATCHDOG_USEC
microseconds (when $WATCHDOG_PID is set, only that process is watched);
STATUS= is the one-line text `systemctl status` shows; STOPPING=1 says
shutdown began. Without $NOTIFY_SOCKET (not under systemd) every call does
nothing. A send that fails is logged once and otherwise ignored: monitoring
must not stop because systemd is busy.
"""
from __future__ import annotations

import logging
import os
import socket
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
