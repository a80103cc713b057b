"""sd_notify over a real AF_UNIX datagram socket, as systemd would receive it."""
from __future__ import annotations

import os
import socket
import uuid

import pytest

from agentwarden.sdnotify import Notifier


@pytest.fixture(params=["path", "abstract"])
def receiver(request, tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        address = str(tmp_path / "notify")
        sock.bind(address)
    else:
        name = f"agentwarden-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        address = "@" + name
    sock.settimeout(2)
    yield sock, address
    sock.close()


def messages(sock) -> list[dict[str, str]]:
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(dict(line.split("=", 1) for line in sock.recv(4096).decode().split("\n")))
    except BlockingIOError:
        pass
    sock.settimeout(2)
    return out


def test_ready_status_watchdog_and_stopping(receiver):
    sock, address = receiver
    n = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "4000000",
                  "WATCHDOG_PID": str(os.getpid())})
    assert n.enabled and n.ping_every == 1.0
    n.ready("starting up")
    assert messages(sock) == [{"READY": "1", "STATUS": "starting up"}]
    n.alive("starting up")          # too early for a ping, status unchanged: nothing
    assert messages(sock) == []
    n._last_ping -= 1.5
    n.alive("2 events")
    assert messages(sock) == [{"WATCHDOG": "1", "STATUS": "2 events"}]
    n.alive("3 events")             # status changed, ping not due
    assert messages(sock) == [{"STATUS": "3 events"}]
    n.stopping()
    assert messages(sock) == [{"STOPPING": "1", "STATUS": "stopping"}]
    n.close()


def test_watchdog_for_another_pid_is_not_pinged(receiver):
    sock, address = receiver
    n = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"})
    assert n.ping_every is None
    n._last_ping = 0
    n.alive()
    assert messages(sock) == []


def test_without_systemd_nothing_happens():
    n = Notifier({})
    assert not n.enabled
    n.ready("x")
    n.alive("y")
    n.stopping()
    assert Notifier({"NOTIFY_SOCKET": "relative/path"}).enabled is False


def test_a_vanished_socket_is_not_fatal(tmp_path, caplog):
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert n.send(READY="1") is False
    assert n.send(READY="1") is False
    assert sum("cannot notify systemd" in r.message for r in caplog.records) == 1
