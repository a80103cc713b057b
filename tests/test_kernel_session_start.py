"""`agentwarden run` has its new session cgroup watched at once (the probe's
watch socket), not at the probe's next rescan. The warden here rescans once an
hour: whatever it watches of a session, it watches because `run` asked.
The session's very first exec -- the command itself -- and its first open are
judged: a forbidden command is refused, a held one waits, a denied file is
killed in the kernel, and the exec is recorded under the session."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from agentwarden import cgroups, session, wire
from conftest import Warden, wait_for

pytestmark = pytest.mark.kernel

SHELL = ["/usr/bin/sh", "/usr/bin/dash", "/bin/sh", "/bin/dash"]


def _policy(agent: str, secret: Path) -> str:
    return (f'[agent.{agent}]\nmode = "enforce"\non-violation = "kill"\n'
            f'[agent.{agent}.exec]\nallow = {SHELL + ["/usr/bin/cat", "/usr/bin/true"]!r}\n'
            f'hold = ["/usr/bin/date *"]\n'
            f'[agent.{agent}.files]\nread-allow = ["/**"]\ndeny = ["{secret}"]\n').replace("'", '"')


@pytest.fixture
def slow_rescan(kernel, agent_cgroup, tmp_path):
    """A warden that rescans cgroups once an hour, and an agent it found at its
    start (tagged before it started)."""
    agent = f"start-{uuid.uuid4().hex[:6]}"
    cg = agent_cgroup(agent, tag=False)
    cgroups.tag(cg.path, agent)
    run_dir = Path(f"/run/agentwarden-test-{uuid.uuid4().hex[:8]}")
    warden = Warden(tmp_path, run_dir=run_dir, env={"AGENTWARDEN_TAG_SCAN_INTERVAL": "3600"})
    cg.warden = warden
    try:
        assert str(cg.id) in warden.status()["probe"]["tags"]   # from the probe's first scan
        secret = tmp_path / "secret"
        secret.write_text("s3cret-first-open")
        warden.set_policy(agent, _policy(agent, secret))
        yield warden, agent, cg, secret
    finally:
        warden.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def run(warden: Warden, agent: str, *command: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "agentwarden", "run", "--agent", agent, "--", *command],
                            env=warden.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_the_first_exec_and_open_of_a_session_are_judged_without_a_rescan(slow_rescan):
    warden, agent, cg, secret = slow_rescan
    # A forbidden command as the session's first exec: refused, never runs.
    proc = run(warden, agent, "/usr/bin/id")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and out == "", (out, err)
    assert "cannot run /usr/bin/id: Operation not permitted" in err

    # A held command as the first exec: waits for an admin; denied, it never ran.
    proc = run(warden, agent, "/usr/bin/date", "+ran-%s")
    [hold] = wait_for(lambda: [h for h in session.admin_request(warden.settings, {"cmd": "holds"})["holds"]
                               if h["agent"] == agent], timeout=20, what="the first exec held")
    assert hold["action"].startswith("exec /usr/bin/date +ran-")
    warden.cli("deny", hold["id"], "--reason", "not now")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "ran-" not in out, (out, err)

    # The first command's first open of a denied file: killed in the kernel
    # (the session cgroup is in the BPF maps with its agent's number).
    proc = run(warden, agent, "/usr/bin/cat", str(secret))
    out, err = proc.communicate(timeout=30)
    assert "s3cret" not in out and proc.returncode != 0, (out, err)

    # An allowed first exec runs, and the BPF program saw it: its exec record
    # names the session and the agent.
    proc = run(warden, agent, "/usr/bin/true")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err

    warden.settle()
    records = warden.records()
    [opened] = [r for r in records if r["kind"] == "open" and r.get("agent") == agent
                and r.get("path") == str(secret)]
    assert opened["killed_in_kernel"], opened
    started = {r["session"] for r in records if r["kind"] == "session" and r["agent"] == agent
               and r["source"] == "xattr"}
    assert len(started) == 4, started   # four runs, four sessions, each told to the daemon
    execs = [r for r in records if r["kind"] == "exec" and r.get("agent") == agent]
    assert any(r.get("exec_path") == "/usr/bin/true" and r.get("session") in started for r in execs), execs
    # Made watched by run's requests, not by a rescan (one an hour here).
    health = warden.status()["probe"]["health"]
    assert health["watch_requests"] >= 4 and health["watch_refused"] == 0, health


def probe_ask(path: Path, message: dict) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.send(wire.pack(message))
        return wire.decode_reply(sock.recv(1 << 20))


def test_the_watch_socket_takes_nothing_on_trust(slow_rescan, agent_cgroup, kernel):
    warden, agent, cg, _ = slow_rescan
    path = warden.settings.probe_socket
    assert path.stat().st_mode & 0o777 == 0o600
    # An untagged cgroup is not watched because someone asks.
    plain = cg.child("untagged")
    reply = probe_ask(path, {"cmd": "watch", "cgroup": str(plain)})
    assert not reply["ok"] and "not tagged" in reply["error"]
    assert str(cgroups.cgroup_id(plain)) not in warden.status()["probe"]["tags"]
    # Nor one outside the probe's cgroups, nor a path that is no cgroup.
    for outside in (str(kernel), "/etc", "/sys/fs/cgroup/../../etc"):
        reply = probe_ask(path, {"cmd": "watch", "cgroup": outside})
        assert not reply["ok"], (outside, reply)
    for bad in ({"cmd": "watch"}, {"cmd": "watch", "cgroup": 7}, {"cmd": "tag", "cgroup_id": "1"},
                {"cmd": "nuke"}):
        reply = probe_ask(path, bad)
        assert not reply["ok"] and "malformed" in reply["error"], (bad, reply)
    # A tagged cgroup below the agent: watched at once, and the daemon is told.
    child = cg.child("tagged")
    cgroups.tag(child, agent)
    reply = probe_ask(path, {"cmd": "watch", "cgroup": str(child)})
    assert reply["ok"] and reply["tag"]["agent"] == agent and reply["tag"]["path"] == str(child)
    child_id = str(cgroups.cgroup_id(child))
    assert probe_ask(path, {"cmd": "tag", "cgroup_id": int(child_id)})["tag"]["agent"] == agent
    wait_for(lambda: child_id in warden.status()["probe"]["tags"], timeout=5,
             what="the daemon to hear of the watched cgroup")
    # Only root may ask.
    nobody = subprocess.run(
        [sys.executable, "-c", "import socket, sys; s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); "
         "s.connect(sys.argv[1])", str(path)], user="nobody", capture_output=True, text=True)
    assert nobody.returncode != 0 and "Permission denied" in nobody.stderr
    # Every refusal counted (the probe reports once per health interval).
    wait_for(lambda: warden.status()["probe"]["health"]["watch_refused"] >= 8, timeout=10,
             what="the probe to count the refused requests")
