"""The CLI's contract where it needs the kernel and a real daemon (the shared
warden: its cgroup_scope is the tests' parent cgroup): `--json` of the
commands that ask the daemon or act on cgroups parses, holds answered with
`--json`, the scope shown by `up`, `status` and `agents`, and `tag` refusing a
cgroup outside it; `up` ends with 130 on Ctrl-C. See docs/cli.md."""
from __future__ import annotations

import json
import signal
import subprocess
import uuid

import pytest

from agentwarden import cgroups
from conftest import TEST_CGROUP_PARENT, Warden, wait_for
from test_kernel_sessions import _policy, holds, start_run, wait_hold

pytestmark = pytest.mark.kernel


def as_json(result: subprocess.CompletedProcess):
    assert "Traceback" not in result.stderr, result.stderr
    return json.loads(result.stdout)


def test_json_of_the_daemon_and_cgroup_commands(warden, agent_cgroup):
    cg = agent_cgroup("jsonagent")
    status = as_json(warden.cli("status", "--json"))
    assert status["daemon"]["cgroup_scope"] == TEST_CGROUP_PARENT
    agents = [json.loads(line) for line in warden.cli("agents", "--json").stdout.splitlines()]
    assert {"agent": "jsonagent", "cgroup": str(cg.path)}.items() <= \
        next(a for a in agents if a["cgroup_id"] == cg.id).items()
    frozen = as_json(warden.cli("freeze", "--agent", "jsonagent", "--json"))
    assert frozen["action"] == "freeze" and frozen["archived"] is True and len(frozen["results"]) == 1
    assert (cg.path / "cgroup.freeze").read_text().strip() == "1"
    thawed = as_json(warden.cli("thaw", "--agent", "jsonagent", "--json"))
    assert thawed["action"] == "thaw" and (cg.path / "cgroup.freeze").read_text().strip() == "0"
    assert isinstance(as_json(warden.cli("holds", "--json")), list)
    reloaded = as_json(warden.cli("policy", "reload", "--json"))
    assert reloaded["ok"] is True and "problems" in reloaded
    verified = warden.cli("log", "verify", "--json")
    assert verified.returncode == 0 and as_json(verified)["ok"] is True and as_json(verified)["records"] > 0

    fresh = cgroups.cgroup2_root() / TEST_CGROUP_PARENT / f"jsontag-{uuid.uuid4().hex[:6]}"
    try:
        tagged = as_json(warden.cli("tag", str(fresh), "--agent", "jsontag", "--create", "--json"))
        assert tagged["watched"] is True and tagged["cgroup_id"] == cgroups.cgroup_id(fresh)
        untagged = as_json(warden.cli("untag", str(fresh), "--json"))
        assert untagged["untagged"] is True and untagged["dropped_by_probe"] is True
    finally:
        fresh.rmdir()


def test_approve_and_deny_answer_in_json(warden, agent_cgroup):
    agent = f"js-{uuid.uuid4().hex[:6]}"
    agent_cgroup(agent)
    warden.set_policy(agent, _policy(agent, exec_allow=["/usr/bin/sh", "/usr/bin/dash", "/bin/sh"],
                                     exec_hold=["/usr/bin/true", "/usr/bin/false"]))
    run = start_run(warden, agent, ["/bin/sh", "-c", "/usr/bin/true; echo $?; /usr/bin/false; echo $?"])
    try:
        [held] = wait_hold(warden, agent)
        approved = as_json(warden.cli("approve", held["id"], "--reason", "contract", "--json"))
        assert approved == {"hold_id": held["id"], "state": "approved", "needed": 0}
        [second] = wait_for(lambda: [h for h in holds(warden) if h["agent"] == agent and h["id"] != held["id"]]
                            or None, what="the second hold")
        denied = as_json(warden.cli("deny", second["id"], "--json"))
        assert denied == {"hold_id": second["id"], "state": "denied"}
        out, _ = run.communicate(timeout=30)
        assert out.split() == ["0", "126"]   # true ran; false's exec failed with EPERM
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()


def test_the_scope_is_shown_and_tag_refuses_a_cgroup_outside_it(warden, agent_cgroup):
    scope = TEST_CGROUP_PARENT
    root = cgroups.cgroup2_root()
    banner = warden.output()
    assert f"scope:     {root / scope} (cgroup_scope {scope!r}" in banner
    assert f"cgroup_scope = \"{scope}\" (environment AGENTWARDEN_CGROUP_SCOPE)" in banner
    assert f"tag {scope}/demo --agent demo --create" in banner
    assert f"scope:  only agent cgroups below {scope!r}" in warden.cli("status").stdout

    refused = warden.cli("tag", "aw-outside-demo", "--agent", "demo", "--create", check=False)
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1, refused.stderr
    assert f"use {scope}/aw-outside-demo" in refused.stderr and "cgroup_scope" in refused.stderr
    assert not (root / "aw-outside-demo").exists()   # refused before anything was made

    # Another instance's agent (tagged outside this scope) is not listed as ours.
    inside = agent_cgroup("scoped")
    outside = root / f"aw-other-instance-{uuid.uuid4().hex[:6]}"
    outside.mkdir()
    try:
        cgroups.tag(outside, "elsewhere")
        listed = warden.cli("agents").stdout
        assert str(inside.path) in listed and str(outside) not in listed
        assert listed.splitlines()[0] == f"cgroup_scope {scope!r}: only agents below {root / scope}"
    finally:
        outside.rmdir()


def test_up_interrupted_exits_130(kernel, tmp_path):
    own = Warden(tmp_path, run_dir=tmp_path / "own-run")
    own.proc.send_signal(signal.SIGINT)
    try:
        assert own.proc.wait(timeout=60) == 130
        assert "Traceback" not in own.output() and "Aborted" not in own.output()
    finally:
        own.stop()


def test_a_second_up_is_refused_and_a_killed_up_takes_its_parts_along(kernel, tmp_path):
    """`up` where a daemon already answers says so at once (it used to print its
    banner from the other daemon's status, then restart a daemon that could not
    take the archive's lock five times); `up` killed with SIGKILL takes its
    daemon and probe along (they used to run on, orphaned), leaving the sockets
    a stopped daemon leaves, which the commands then name."""
    import psutil
    own = Warden(tmp_path, run_dir=tmp_path / "own-run")
    try:
        daemon_pid = own.status()["daemon"]["pid"]
        second = own.cli("up", check=False, timeout=60)
        assert second.returncode == 1 and "watching" not in second.stdout, second.stdout
        assert second.stderr.startswith(f"agentwarden: error: a daemon already runs on "
                                        f"{own.settings.run_dir} (pid {daemon_pid}): stop it first")
        assert second.stderr.count("\n") == 1, second.stderr
        parts = psutil.Process(own.proc.pid).children()
        assert daemon_pid in [p.pid for p in parts] and len(parts) == 2
        own.proc.kill()
        own.proc.wait()
        _gone, alive = psutil.wait_procs(parts, timeout=30)
        assert alive == [], alive
        status = own.cli("status", check=False)
        assert status.returncode == 3 and "nothing listens on" in status.stderr, status.stderr
    finally:
        own.stop()
