"""The watch never silently stops: an agent that stops or kills the probe finds
itself (and every other agent) frozen until `agentwarden up` has the probe
watching again; the archive says when, why and who."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import psutil
import pytest

from agentwarden import cgroups
from conftest import REQUIRE_KERNEL, TEST_CGROUP_PARENT, Warden, wait_for

pytestmark = pytest.mark.kernel


def frozen(path) -> bool:
    return "frozen 1" in (path / "cgroup.events").read_text().split("\n")


def probe_of(warden: Warden) -> psutil.Process:
    def find():
        for child in psutil.Process(warden.proc.pid).children():
            if child.cmdline()[-1:] == ["probe"]:
                return child
        return None
    return wait_for(find, what="up's probe process")


def watch_records(warden: Warden) -> list[dict]:
    return [r for r in warden.records() if r["kind"] == "watch"]


@pytest.fixture
def scoped_warden(kernel, tmp_path):
    # A scope of its own: the agents this instance freezes are nobody else's.
    scope = f"{TEST_CGROUP_PARENT}/watch-{uuid.uuid4().hex[:8]}"
    (kernel / scope).mkdir(parents=True)
    warden = Warden(tmp_path, env={"AGENTWARDEN_CGROUP_SCOPE": scope})
    yield warden, kernel / scope
    warden.stop()


def test_stopping_or_killing_the_probe_freezes_agents_until_it_watches_again(scoped_warden):
    warden, scope = scoped_warden
    agent = scope / "coder"
    agent.mkdir()
    cgroups.tag(agent, "coder")
    wait_for(lambda: str(cgroups.cgroup_id(agent)) in warden.status()["probe"]["tags"],
             what="the probe to watch the agent")

    def join():
        (agent / "cgroup.procs").write_text("0")

    worker = subprocess.Popen(["sleep", "600"], preexec_fn=join)
    probe = probe_of(warden)
    # 1. The agent itself sends the probe SIGTERM (and lives on, so it can be named).
    attacker = subprocess.Popen(["python3", "-c", f"import os, signal, time; os.kill({probe.pid}, "
                                 "signal.SIGTERM); time.sleep(600)"], preexec_fn=join)
    try:
        wait_for(lambda: frozen(agent), timeout=5, what="the agent to be frozen")
        lost = wait_for(lambda: [r for r in watch_records(warden) if r["state"] == "lost"],
                        what="a watch record saying the watch was lost")[-1]
        assert f"told to stop by pid {attacker.pid} (python3, uid 0, cgroup /" in lost["detail"], lost
        assert str(agent) in lost["action_taken"]
        wait_for(lambda: not frozen(agent), timeout=120, what="up to restart the probe and the agent to thaw")
        assert probe_of(warden).pid != probe.pid
        assert [r["state"] for r in watch_records(warden)][-2:] == ["lost", "restored"]

        # 2. kill -9: nothing is said, the pidfd tells the daemon at once.
        probe = probe_of(warden)
        killed_at = time.monotonic()
        probe.send_signal(signal.SIGKILL)
        wait_for(lambda: frozen(agent), timeout=1.0, interval=0.01,
                 what="the agent to be frozen within 1 s of the probe's death")
        took = time.monotonic() - killed_at
        lost = wait_for(lambda: [r for r in watch_records(warden) if r["state"] == "lost"][1:],
                        what="the second lost record")[-1]
        assert f"(pid {probe.pid}) exited without being asked to" in lost["detail"]
        print(f"frozen {took * 1000:.0f} ms after kill -9 of the probe")
        wait_for(lambda: not frozen(agent), timeout=120, what="the agent to thaw after the restart")
        assert worker.poll() is None   # frozen and thawed, never killed
    finally:
        worker.kill()
        attacker.kill()
        (agent / "cgroup.freeze").write_text("0")
    # 3. A deliberate stop (up's SIGTERM) freezes nothing.
    warden.stop()
    assert not frozen(agent)
    assert watch_records(warden)[-1]["state"] == "stopped"
    os.rmdir(agent)


DETACH = Path(__file__).parent / "attackers" / "detach_probe.sh"


def test_detached_programs_freeze_agents_until_the_probe_watches_again(scoped_warden):
    if not shutil.which("gdb"):
        if REQUIRE_KERNEL:
            pytest.fail("gdb is missing and AGENTWARDEN_REQUIRE_KERNEL=1")
        pytest.skip("gdb is needed to close the probe's fds from outside")
    warden, scope = scoped_warden
    agent = scope / "coder"
    agent.mkdir()
    cgroups.tag(agent, "coder")
    wait_for(lambda: str(cgroups.cgroup_id(agent)) in warden.status()["probe"]["tags"],
             what="the probe to watch the agent")

    def join():
        (agent / "cgroup.procs").write_text("0")

    worker = subprocess.Popen(["sleep", "600"], preexec_fn=join)
    probe = probe_of(warden)
    try:
        # The probe lives on; its programs stop running, a few at a time.
        result = subprocess.run([str(DETACH), str(probe.pid)], capture_output=True, check=True)
        batches = [(int(line.split()[-3]), int(line.split()[-1]))
                   for line in result.stdout.decode().splitlines()]
        assert batches, result.stderr
        wait_for(lambda: frozen(agent), timeout=1.0, interval=0.01, what="the agent to be frozen")
        lost = wait_for(lambda: [r for r in watch_records(warden) if r["state"] == "lost"],
                        what="a watch record saying the watch was lost")[0]
        assert f"the probe (pid {probe.pid}) lives but its BPF programs stopped running" in lost["detail"]
        assert "sys_enter_" in lost["detail"] and str(agent) in lost["action_taken"]
        # Frozen during the batch of closes that detached what it noticed, or within 1 s after it.
        # (Batches less than 1 s apart overlap here: the first that holds it counts.)
        within = [end for start, end in batches if start <= lost["time"] <= end + 1_000_000_000]
        assert within, (lost["time"], batches)
        end = within[0]
        print(f"frozen {(lost['time'] - end) / 1e6:.0f} ms after the gdb session that detached "
              "the programs ended (negative: before it had exited)")
        wait_for(lambda: not frozen(agent), timeout=120, what="up to restart the probe and the agent to thaw")
        assert probe_of(warden).pid != probe.pid
        assert watch_records(warden)[-1]["state"] == "restored"
        assert worker.poll() is None
    finally:
        worker.kill()
        (agent / "cgroup.freeze").write_text("0")
    warden.stop()
    os.rmdir(agent)
