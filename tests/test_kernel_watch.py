"""The watch never silently stops: an agent that stops or kills the probe finds
itself (and every other agent) frozen until `agentwarden up` has the probe
watching again; the archive says when, why and who."""
from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid

import psutil
import pytest

from agentwarden import cgroups
from conftest import TEST_CGROUP_PARENT, Warden, wait_for

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
