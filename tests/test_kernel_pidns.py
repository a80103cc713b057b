"""agentwarden in a pid namespace (a container): the supervisor's notifications
name tasks by their ids there, the BPF program by the kernel's; approvals match
because the program translates (bpf_get_ns_current_pid_tgid). Before, every
session exec there was killed as unapproved."""
from __future__ import annotations

import subprocess
import sys
import uuid

import psutil
import pytest

from agentwarden import cgroups
from conftest import TEST_CGROUP_PARENT, Warden, wait_for

pytestmark = pytest.mark.kernel


def test_a_session_in_a_pid_namespace_runs_allowed_and_approved_execs(kernel, tmp_path):
    scope = f"{TEST_CGROUP_PARENT}/pidns-{uuid.uuid4().hex[:8]}"
    (kernel / scope).mkdir(parents=True)
    agent = f"ns-{uuid.uuid4().hex[:6]}"
    warden = Warden(tmp_path, env={"AGENTWARDEN_CGROUP_SCOPE": scope},
                    wrapper=("unshare", "--pid", "--fork", "--mount-proc"))
    # `up` is pid 1 of the namespace; unshare does not pass signals on: stop it directly.
    up = psutil.Process(warden.proc.pid).children()[0]
    try:
        home = kernel / scope / agent
        home.mkdir()
        cgroups.tag(home, agent)
        wait_for(lambda: str(cgroups.cgroup_id(home)) in warden.status()["probe"]["tags"],
                 what="the probe to watch the agent")
        warden.set_policy(agent, f'[agent.{agent}]\nmode = "enforce"\non-violation = "kill"\n'
                                 f'[agent.{agent}.exec]\nallow = ["/usr/bin/sh", "/usr/bin/dash", "/bin/sh", '
                                 f'"/usr/bin/true"]\nhold = ["/usr/bin/date"]\n'
                                 f'[agent.{agent}.files]\nread-allow = ["/**"]\nwrite-allow = ["/dev/null"]\n')
        # Enter the namespace (and its /proc) to start the session.
        session = subprocess.Popen(
            ["nsenter", "--target", str(up.pid), "--pid", "--mount", "--", sys.executable, "-m",
             "agentwarden", "run", "--agent", agent, "--", "/bin/sh", "-c",
             "/usr/bin/true && echo allowed-ran; /usr/bin/date +approved-%Y"],
            env=warden.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            def pending():
                from agentwarden import session as session_mod
                found = session_mod.admin_request(warden.settings, {"cmd": "holds"})["holds"]
                return [h for h in found if h["agent"] == agent]
            [hold] = wait_for(pending, timeout=30, what="the held date")
            warden.cli("approve", hold["id"], "--reason", "pidns test")
            out, err = session.communicate(timeout=30)
        finally:
            session.kill()
        assert "allowed-ran" in out and "approved-" in out, (out, err)
        assert session.returncode == 0, err
        warden.settle()
        killed = [r for r in warden.records() if r["kind"] == "exec" and r.get("not_approved")]
        assert killed == [], killed
    finally:
        up.terminate()
        up.wait(timeout=30)
        warden.stop()
