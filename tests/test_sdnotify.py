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


# -- the fd store: the service's side (Notifier) against the manager's (FdStore, as `up` runs it)

def test_fd_store_keeps_removes_and_hands_fds_back_at_3_on(tmp_path):
    import subprocess
    import sys

    from agentwarden.sdnotify import FdStore, place_fds_and_exec
    store = FdStore(tmp_path / "notify.sock")
    n = Notifier({"NOTIFY_SOCKET": store.path})
    files = {name: open(tmp_path / name, "w") for name in ("s-one", "s-two", "s-gone")}
    for name, f in files.items():
        assert n.store_fd(f.fileno(), name)
    assert n.store_fd(files["s-one"].fileno(), "s-one")   # a second copy of a name is refused
    assert n.remove_fd("s-gone")
    store.receive(lambda pid: pid == os.getpid())
    assert sorted(store.fds) == ["s-one", "s-two"] and store.refused == 1
    for f in files.values():
        f.close()   # the store's copies alone are left
    env, fds = store.handed_over()
    assert env == {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "s-one:s-two"}
    # A child gets them as systemd hands them over: from fd 3 on, LISTEN_PID its own.
    child = ("import os; from agentwarden.sdnotify import listen_fds; got = listen_fds(); "
             "print([(name, os.readlink(f'/proc/self/fd/{fd}')) for name, fd in got], "
             "'LISTEN_FDS' in os.environ)")
    argv = [sys.executable, "-c", child]
    full = {**os.environ, **env}
    out = subprocess.run(argv, env=full, preexec_fn=lambda: place_fds_and_exec(argv, full, fds),
                         capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == str([("s-one", str(tmp_path / "s-one")),
                                      ("s-two", str(tmp_path / "s-two"))]) + " False", out.stderr
    store.close()
    assert store.fds == {} and not os.path.exists(store.path)


def test_fd_store_refuses_processes_it_does_not_trust(tmp_path):
    from agentwarden.sdnotify import FdStore
    store = FdStore(tmp_path / "notify.sock")
    n = Notifier({"NOTIFY_SOCKET": store.path})
    with open(tmp_path / "f", "w") as f:
        assert n.store_fd(f.fileno(), "s-x")
    store.receive(lambda pid: False)
    assert store.fds == {} and store.refused == 1
    store.close()


def test_listen_fds_for_another_process_are_not_taken():
    from agentwarden.sdnotify import listen_fds
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "s-a"}
    assert listen_fds(environ) == [] and environ == {}   # and the variables are gone
