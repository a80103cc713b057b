"""Sessions survive a daemon restart (`kill -9`) under `agentwarden up`, on
the real kernel: `up` keeps the sessions' seccomp listeners in its fd store
while no daemon runs, the restarted daemon resumes them. During the gap (made
as long as the test likes by stopping `up`, which restarts the daemon) a
notified exec waits and never runs; afterwards the session's next exec is
decided, a hold pending across the restart is approved from the CLI and its
command runs, and calls the dead daemon had received and not answered are
answered (one decided again, one failed with EPERM)."""
from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from agentwarden import seccomp_notify as sn
from agentwarden import session as session_mod
from conftest import AgentCgroup, Warden, stop_process, wait_for

pytestmark = pytest.mark.kernel

PY = sys.executable
SHELL = ["/usr/bin/sh", "/usr/bin/dash", "/bin/sh", "/bin/dash"]
GAP = 2.0          # seconds the test keeps the daemon away
SYS_PIDFD_GETFD = 438
EXECVE_NR = 59 if os.uname().machine == "x86_64" else 221


@pytest.fixture(scope="module")
def restart_warden(kernel, tmp_path_factory):
    """A warden of its own: these tests kill its daemon."""
    w = Warden(tmp_path_factory.mktemp("restart-warden"))
    yield w
    w.stop()


@pytest.fixture
def agent(kernel, restart_warden, tmp_path):
    name = f"r-{uuid.uuid4().hex[:6]}"
    cg = AgentCgroup(kernel, restart_warden, name)
    cg.tag()
    lst = lambda items: "[" + ", ".join(f'"{i}"' for i in items) + "]"  # noqa: E731
    restart_warden.set_policy(name, (
        f'[agent.{name}]\nmode = "enforce"\non-violation = "kill"\n'
        f'[agent.{name}.exec]\nallow = {lst(SHELL + ["/usr/bin/touch", "/usr/bin/cat"])}\n'
        f'hold = ["/usr/bin/date *"]\n'
        f'[agent.{name}.files]\nread-allow = ["/**"]\nwrite-allow = {lst([f"{tmp_path}/**"])}\n'))
    yield name
    cg.remove()


def start_run(warden: Warden, agent: str, script: str) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "agentwarden", "run", "--agent", agent, "--", "/bin/sh", "-c", script],
                            env=warden.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def pending(warden: Warden, agent: str) -> list[dict]:
    return [h for h in session_mod.admin_request(warden.settings, {"cmd": "holds"})["holds"]
            if h["agent"] == agent]


def waiting_in_execve(pid: int) -> bool:
    """The kernel's word that a task sits in execve (its syscall is blocked)."""
    try:
        return Path(f"/proc/{pid}/syscall").read_text().split()[0] == str(EXECVE_NR)
    except (OSError, IndexError):
        return False


def kill_daemon(warden: Warden) -> int:
    """`kill -9` of the daemon (its supervisor dies with it) while `up` is
    stopped, so the gap lasts until resume_up(); returns the daemon's pid."""
    daemon = psutil.Process(warden.status()["daemon"]["pid"])
    supervisor = [c for c in daemon.children() if "agentwarden.daemon.supervisor" in " ".join(c.cmdline())]
    os.kill(warden.proc.pid, signal.SIGSTOP)
    daemon.kill()

    def zombie(p: psutil.Process) -> bool:   # `up`, stopped, does not reap the daemon
        try:
            return p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    # The supervisor wholly gone, every thread: a thread not yet dead could still
    # take a notification (and it would be failed after the restart, not decided).
    wait_for(lambda: zombie(daemon) and not any(s.is_running() for s in supervisor),
             what="the daemon and its supervisor to die")
    return daemon.pid


def resume_up(warden: Warden, old_pid: int) -> None:
    os.kill(warden.proc.pid, signal.SIGCONT)

    def restarted():
        try:
            return warden.status()["daemon"]["pid"] != old_pid
        except Exception:
            return False
    wait_for(restarted, timeout=60, what="up to restart the daemon")


def records_of(warden: Warden, kind: str, session: str | None = None) -> list[dict]:
    return [r for r in warden.records() if r["kind"] == kind and (session is None or r.get("session") == session)]


def test_kill_9_of_the_daemon_is_a_pause_for_sessions_and_pending_holds(restart_warden, agent, tmp_path):
    w = restart_warden
    for fifo in ("go1", "go2"):
        os.mkfifo(tmp_path / fifo)
    run = start_run(w, agent, (
        f"/usr/bin/date +%s > {tmp_path}/held-ran &\n"
        f"read x < {tmp_path}/go1\n"
        f"/usr/bin/touch {tmp_path}/gap-marker\n"
        f"read x < {tmp_path}/go2\n"
        f"/usr/bin/touch {tmp_path}/after-restart\n"
        "wait\n"))
    hold = wait_for(lambda: pending(w, agent), timeout=30, what="the date exec to be held")[0]
    session = hold["session"]

    old = kill_daemon(w)
    (tmp_path / "go1").write_text("go\n")   # the shell goes on to exec touch: notified, nobody answers
    cgroup = Path(next(r["cgroup"] for r in records_of(w, "supervision", session)))
    wait_for(lambda: any(waiting_in_execve(int(p)) for p in (cgroup / "cgroup.procs").read_text().split()),
             what="the touch exec to wait in the kernel")
    time.sleep(GAP)   # the gap: nothing notified may run during it
    assert not (tmp_path / "gap-marker").exists(), "a notified exec ran while no daemon was there"
    # (the shell made the file before the exec was held; date would fill it)
    assert (tmp_path / "held-ran").read_text() == "", "the held exec ran while no daemon was there"
    assert run.poll() is None, f"the session ended with the daemon: {run.communicate()}"

    resume_up(w, old)
    wait_for(lambda: (tmp_path / "gap-marker").exists(), timeout=30,
             what="the exec that waited through the gap to be decided")
    still = wait_for(lambda: pending(w, agent), timeout=30, what="the hold to be pending again")
    assert [h["id"] for h in still] == [hold["id"]]
    w.cli("approve", hold["id"], "--reason", "after the restart")
    wait_for(lambda: (tmp_path / "held-ran").exists() and (tmp_path / "held-ran").read_text().strip(),
             what="the approved command to run")
    (tmp_path / "go2").write_text("go\n")
    out, err = run.communicate(timeout=30)
    assert run.returncode == 0, (out, err)
    assert (tmp_path / "after-restart").exists()

    w.settle()
    resumed = [r for r in records_of(w, "supervision", session) if r["state"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["holds_resumed"] == [hold["id"]]
    assert resumed[0]["failed"] == []
    states = [r["state"] for r in records_of(w, "hold") if r["hold_id"] == hold["id"]]
    assert states[0] == "pending" and states[-1] == "approved", states
    assert not [r for r in records_of(w, "supervision", session) if r["state"] == "ended"
                and r.get("detail")], "the session was recorded as failed closed"


def _pidfd_getfd(pid: int, fd: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    pidfd = os.pidfd_open(pid)
    try:
        got = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if got < 0:
            raise OSError(ctypes.get_errno(), "pidfd_getfd")
        return got
    finally:
        os.close(pidfd)


def _listener_fds(pid: int) -> list[int]:
    out = []
    for entry in os.scandir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(entry.path) == "anon_inode:seccomp notify":
                out.append(int(entry.name))
        except OSError:
            pass
    return out


def _receive(listener: int, count: int, timeout: float = 60) -> list:
    """count notifications from the listener, waiting at most timeout (a
    notification whose task went away meanwhile does not count)."""
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"{len(got)} of {count} notifications received in {timeout:g} s"
        if select.select([listener], [], [], left)[0]:
            notification = sn.receive(listener)
            if notification is not None:
                got.append(notification)
    return got


def test_calls_the_dead_daemon_received_are_answered_not_left_hanging(restart_warden, agent, tmp_path):
    """The test plays the dying supervisor: with the real one stopped, it takes
    the session's listener (pidfd_getfd) and receives two notified execs
    itself; one is written into the session's receipt, as the fast path
    writes each notification it receives. Then the daemon is killed. The
    restarted one decides the receipt's call again (allowed: it runs) and
    fails the other with EPERM, and records both."""
    w = restart_warden
    os.mkfifo(tmp_path / "go")
    run = start_run(w, agent, (
        f"read x < {tmp_path}/go\n"
        f"/usr/bin/touch {tmp_path}/first & /usr/bin/touch {tmp_path}/second & wait\n"
        f"/usr/bin/touch {tmp_path}/after\n"))
    sessions = wait_for(lambda: [r for r in records_of(w, "supervision") if r["agent"] == agent
                                 and r["state"] == "started"], what="the session to start")
    session = sessions[0]["session"]
    daemon = psutil.Process(w.status()["daemon"]["pid"])
    supervisor = next(c for c in daemon.children() if "agentwarden.daemon.supervisor" in " ".join(c.cmdline()))
    receipt_path = w.settings.state_dir / "sessions" / f"{session}.receipt"
    assert receipt_path.exists()
    supervisor.suspend()   # its fast-path thread no longer receives
    listener = None
    try:
        listener = _pidfd_getfd(supervisor.pid, [fd for fd in _listener_fds(supervisor.pid)][0])
        (tmp_path / "go").write_text("go\n")
        received = _receive(listener, 2)
        assert {n.nr for n in received} == {EXECVE_NR}
        received.sort(key=lambda n: n.id)
        receipt_path.write_bytes(sn.pack(received[1]).ljust(4096, b"\0"))   # the last one received
        old = kill_daemon(w)
    finally:
        if listener is not None:
            os.close(listener)   # the store's copy alone keeps the session
    time.sleep(0.5)
    assert not (tmp_path / "first").exists() and not (tmp_path / "second").exists()
    resume_up(w, old)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0, (out, err)
    ran = sorted(p.name for p in tmp_path.iterdir() if p.name in ("first", "second"))
    assert len(ran) == 1, f"exactly the receipt's call runs, the other fails: {ran} {err}"
    assert "Operation not permitted" in err
    assert (tmp_path / "after").exists()
    w.settle()
    resumed = [r for r in records_of(w, "supervision", session) if r["state"] == "resumed"]
    assert len(resumed) == 1
    assert resumed[0]["redecided"] == [received[1].id] and resumed[0]["failed"] == [received[0].id]


def test_a_real_stop_fails_sessions_closed_and_the_next_start_records_it(restart_warden, agent, tmp_path):
    """Stopping `up` (not a restart) closes the stored listeners: the held exec
    fails with ENOSYS and never runs; the next `up` finds the kept session
    without a listener and records it as ended, with its hold. (Last in this
    module: it stops the module's warden.)"""
    w = restart_warden
    run = start_run(w, agent, f"/usr/bin/date +%s > {tmp_path}/held-ran; echo exit=$?")
    hold = wait_for(lambda: pending(w, agent), timeout=30, what="the date exec to be held")[0]
    kept = w.settings.state_dir / "sessions"
    assert (kept / f"hold-{hold['id']}.json").exists() and (kept / f"{hold['session']}.json").exists()
    stop_process(w.proc)
    out, err = run.communicate(timeout=30)
    assert "Function not implemented" in err and "exit=126" in out, (out, err)
    assert (tmp_path / "held-ran").read_text() == ""
    # The next start: the kept session has no listener any more.
    again = subprocess.Popen([PY, "-m", "agentwarden", "up"], env=w.env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        def ended():
            return [r for r in records_of(w, "supervision", hold["session"])
                    if r["state"] == "ended" and r.get("detail")]
        [record] = wait_for(ended, timeout=90, what="the kept session to be recorded as ended")
        assert record["holds_ended"] == [hold["id"]] and "did not survive" in record["detail"]
        assert not list(kept.glob(f"*{hold['session']}*")) and not (kept / f"hold-{hold['id']}.json").exists()
    finally:
        stop_process(again)
