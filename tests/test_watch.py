"""The watch guard with real processes as the probe (their pidfds) and cgroup
directories faked as plain directories holding a cgroup.freeze file."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from agentwarden.daemon.watch import LOST, STOPPED, WATCHING, WatchGuard
from conftest import wait_for


@pytest.fixture
def agents(tmp_path):
    made = {}

    def add(name: str, frozen: bool = False) -> None:
        path = tmp_path / name
        path.mkdir()
        (path / "cgroup.freeze").write_text("1" if frozen else "0")
        made[str(100 + len(made))] = {"path": str(path), "agent": name}
    add.cgroups = made
    add.frozen = lambda name: (tmp_path / name / "cgroup.freeze").read_text() == "1"
    return add


def a_probe() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


@pytest.fixture
def probe():
    """A live process standing in for the probe; gone after the test."""
    proc = a_probe()
    yield proc
    proc.kill()
    proc.wait()


def health(pid: int, **extra) -> dict:
    return {"kind": "health", "stage": "probe", "time": time.time_ns(), "pid": pid, "counters": {},
            **extra}


def test_a_probe_killed_freezes_every_agent_and_its_successor_thaws_them(agents):
    agents("coder")
    agents("reviewer", frozen=True)   # an admin froze it: it stays frozen
    guard = WatchGuard(lambda: agents.cgroups, silence_timeout=60)
    probe = a_probe()
    try:
        [first] = guard.heard(health(probe.pid))
        assert first["state"] == WATCHING and guard.check() == []
        probe.kill()
        probe.wait()
        assert guard.exited()
        [lost] = guard.check()
        assert lost["kind"] == "watch" and lost["state"] == LOST and lost["probe_pid"] == probe.pid
        assert "exited without being asked to" in lost["detail"]
        assert agents.frozen("coder") and agents.frozen("reviewer")
        agents("newcomer")                   # tagged while nobody watches
        [late] = guard.check()
        assert agents.frozen("newcomer") and "appeared" in late["detail"]
        successor = a_probe()
        try:
            [restored] = guard.heard(health(successor.pid))
        finally:
            successor.kill()
        assert restored["state"] == "restored" and restored["seconds"] >= 0
        assert not agents.frozen("coder") and not agents.frozen("newcomer")
        assert agents.frozen("reviewer")
    finally:
        probe.kill()


def test_a_deliberate_stop_freezes_nothing(agents):
    agents("coder")
    guard = WatchGuard(lambda: agents.cgroups, silence_timeout=60)
    probe = a_probe()
    guard.heard(health(probe.pid))
    [stopped] = guard.heard(health(probe.pid, stopping={"sender": "pid 1 (systemd, cgroup /init.scope)",
                                                        "deliberate": True}))
    probe.kill()
    probe.wait()
    assert stopped["state"] == STOPPED and guard.check() == []
    assert not agents.frozen("coder")


def test_a_stop_sent_by_anyone_else_freezes_at_once(agents, probe):
    agents("coder")
    guard = WatchGuard(lambda: agents.cgroups, silence_timeout=60)
    guard.heard(health(probe.pid))
    [lost] = guard.heard(health(probe.pid, stopping={
        "sender": "pid 4242 (python3, cgroup /agents/coder)", "deliberate": False}))
    assert lost["state"] == LOST and "pid 4242 (python3, cgroup /agents/coder)" in lost["detail"]
    assert agents.frozen("coder")


def test_a_silent_probe_is_lost_but_not_while_its_messages_wait_unread(agents, probe):
    agents("coder")
    guard = WatchGuard(lambda: agents.cgroups, silence_timeout=0.2)
    guard.heard(health(probe.pid))
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:      # the daemon is behind: never silence
        assert guard.check(behind=True) == []
    [lost] = wait_for(lambda: guard.check(), timeout=5, what="silence to count")
    assert lost["state"] == LOST and "no health record" in lost["detail"]
    assert agents.frozen("coder")


def test_records_without_a_pid_do_not_arm_the_guard(agents):
    agents("coder")
    guard = WatchGuard(lambda: agents.cgroups, silence_timeout=0.01)
    assert guard.heard({"kind": "health", "stage": "probe", "time": 1, "counters": {}}) == []
    time.sleep(0.05)   # longer than the timeout: still nothing, the guard is not armed
    assert guard.check() == [] and guard.state == "unarmed"


def test_a_restarted_daemon_still_thaws_what_the_last_one_froze(agents, tmp_path):
    agents("coder")
    state = tmp_path / "watch-frozen.json"
    guard = WatchGuard(lambda: agents.cgroups, silence_timeout=60, state_file=state)
    probe = a_probe()
    guard.heard(health(probe.pid))
    probe.kill()
    probe.wait()
    guard.check()
    assert agents.frozen("coder") and state.exists()
    # The daemon dies here; a new one starts with a new guard.
    successor_guard = WatchGuard(lambda: agents.cgroups, silence_timeout=60, state_file=state)
    assert successor_guard.state == LOST
    successor = a_probe()
    try:
        [restored] = successor_guard.heard(health(successor.pid))
    finally:
        successor.kill()
    assert restored["state"] == "restored"
    assert not agents.frozen("coder") and not state.exists()


def test_a_probe_whose_programs_stopped_freezes_at_once_and_its_successor_thaws(agents, probe):
    agents("coder")
    guard = WatchGuard(lambda: agents.cgroups, silence_timeout=60)
    guard.heard(health(probe.pid))
    [lost] = guard.heard(health(probe.pid, programs_stopped=["sys_enter_execve"]))
    assert lost["state"] == LOST and "lives but its BPF programs stopped running" in lost["detail"]
    assert "sys_enter_execve" in lost["detail"] and agents.frozen("coder")
    # Its last words say the same: nothing more, and nothing thaws.
    assert guard.heard(health(probe.pid, programs_stopped=["sys_enter_execve"])) == []
    assert agents.frozen("coder")
    successor = a_probe()
    try:
        [restored] = guard.heard(health(successor.pid))
    finally:
        successor.kill()
        successor.wait()
    assert restored["state"] == "restored" and not agents.frozen("coder")
