"""What approvers and agents see of a hold, on the real kernel: `holds show`
(an exec's program hash, the ancestry, a `sed -i` rename's diff), the agent's
stderr lines, and the exec/open records that name the hold that let them
through (a remembered approval's: test_kernel_sessions.py)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import Warden, wait_for
from test_kernel_sessions import (PY, SHELL, _policy, holds, session_agent, wait_hold,  # noqa: F401
                                  warden_of_its_own)

pytestmark = pytest.mark.kernel


def start(warden: Warden, agent: str, command: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "agentwarden", "run", "--agent", agent, "--", *command],
                            env={**warden.env, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def show(warden: Warden, hold_id: str) -> dict:
    return json.loads(warden.cli("holds", "show", hold_id, "--json").stdout)


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_holds_show_an_exec_tells_the_agent_and_names_the_hold_in_the_exec_record(warden, session_agent):
    agent, _ = session_agent(dict(exec_allow=SHELL, exec_hold=["/usr/bin/date *"]))
    script = "AGENTWARDEN_REASON='need the time' /usr/bin/date +held-%Y; echo status=$?"
    proc = start(warden, agent, ["/bin/sh", "-c", script])
    [hold] = wait_hold(warden, agent)
    shown = show(warden, hold["id"])
    assert shown["program"]["path"] == "/usr/bin/date"
    assert shown["program"]["sha256"] == sha256(os.path.realpath("/usr/bin/date"))
    assert shown["agent_says"] == "need the time"
    # The held process (the shell's child, not yet date) and its ancestors up
    # to the shell `run` started (its child), with their command lines and cwd.
    chain = shown["ancestry"]
    [shell] = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert chain[-1]["pid"] == int(shell) and chain[-1]["argv"] == ["/bin/sh", "-c", script]
    assert chain[0]["pid"] != int(shell) and chain[0]["cwd"] == os.getcwd()
    assert shown["recent"][-1]["verdict"] == f"held {hold['id']}"
    assert shown["user"] == "root" and shown["syscall"] == "execve"
    text = warden.cli("holds", "show", hold["id"]).stdout
    assert "agent says (its own claim, unverified): need the time" in text
    assert f"sha256 {shown['program']['sha256']}" in text and f"{shell:<7} /bin/sh -c" in text
    warden.cli("approve", hold["id"], "--reason", "it is only the date")
    out, err = proc.communicate(timeout=30)
    assert out.startswith("held-") and "status=0" in out
    assert f"held as {hold['id']}, waiting for an admin's approval (denied in 300s" in err, err

    # A denial: the agent reads who denied it and why, then EPERM as before.
    denied = start(warden, agent, ["/bin/sh", "-c", "/usr/bin/date +no; echo status=$?"])
    [second] = wait_hold(warden, agent)
    warden.cli("deny", second["id"], "--reason", "not today")
    out, err = denied.communicate(timeout=30)
    assert f"agentwarden: {second['id']} denied by root: not today; exec /usr/bin/date +no" in err, err
    assert "Operation not permitted" in err and "status=126" in out

    # Already decided, or never there: one line, exit status 1.
    for gone in (second["id"], "h999-none"):
        result = warden.cli("holds", "show", gone, check=False)
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr == f"agentwarden: error: no pending hold {gone!r} (unknown, or already decided)\n"

    warden.settle()
    records = [r for r in warden.records() if r.get("agent") == agent]
    [approved] = [r for r in records if r["kind"] == "exec" and r.get("hold_id") == hold["id"]]
    assert approved["argv"] == ["/usr/bin/date", "+held-%Y"] and approved["ret"] == 0
    [pending] = [r for r in records if r["kind"] == "hold" and r["hold_id"] == hold["id"]
                 and r["state"] == "pending"]
    assert pending["agent_says"] == "need the time"


def test_holds_show_a_sed_in_place_rename_shows_the_diff(warden, session_agent, tmp_path):
    """sed -i on a file no write rule allows (on-violation = "hold"): its temp
    file's open and the rename over the file are held, and shown."""
    config = tmp_path / "etc"
    config.mkdir()
    (config / "app.conf").write_text("# app\nmode=safe\nlevel=3\n")
    workspace = tmp_path / "ws"
    workspace.mkdir()
    agent, _ = session_agent(dict(on_violation="hold", exec_allow=SHELL + ["/usr/bin/sed"],
                                  write_allow=[f"{workspace}/**", "/dev/null"]))
    proc = start(warden, agent, ["/usr/bin/sed", "-i", "s/safe/fast/", str(config / "app.conf")],
                 AGENTWARDEN_REASON="switch to fast mode")
    seen = []
    while len(seen) < 2:   # sed writes a temp file (held: no write rule), then renames it over the config
        [hold] = wait_hold(warden, agent)
        shown = show(warden, hold["id"])
        seen.append(shown)
        warden.cli("approve", hold["id"])
        wait_for(lambda: hold["id"] not in [h["id"] for h in holds(warden)], what="the approval")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert (config / "app.conf").read_text() == "# app\nmode=fast\nlevel=3\n"
    opened, renamed = seen
    assert opened["syscall"] == "openat" and opened["files"][0]["note"] == "does not exist"
    assert renamed["syscall"] == "rename" and renamed["agent_says"] == "switch to fast mode"
    temp, target = renamed["files"]
    assert target["path"] == str(config / "app.conf") and target["size"] == len("# app\nmode=safe\nlevel=3\n")
    assert target["sha256"] == hashlib.sha256(b"# app\nmode=safe\nlevel=3\n").hexdigest()
    assert temp["sha256"] == hashlib.sha256(b"# app\nmode=fast\nlevel=3\n").hexdigest()
    diff = renamed["diff"]["text"].splitlines()
    assert "-mode=safe" in diff and "+mode=fast" in diff and " level=3" in diff
    assert f"+++ {config / 'app.conf'} (replaced by {temp['path']})" in diff
    assert f"held as {opened['id']}" in err and f"held as {renamed['id']}" in err
    warden.settle()
    [write] = [r for r in warden.records() if r.get("agent") == agent and r["kind"] == "open"
               and r.get("hold_id") == opened["id"]]
    assert write["path"] == temp["path"] and write["ret"] >= 0


def test_hold_messages_false_tells_the_agent_nothing(kernel, agent_cgroup, tmp_path):
    quiet = {"AGENTWARDEN_HOLD_MESSAGES": "false"}
    with warden_of_its_own(agent_cgroup, tmp_path, "quiet", quiet) as (warden, agent):
        warden.set_policy(agent, _policy(agent, exec_allow=SHELL, exec_hold=["/usr/bin/date"]))
        proc = start(warden, agent, ["/bin/sh", "-c", "/usr/bin/date; echo status=$?"])
        [hold] = wait_hold(warden, agent)
        warden.cli("deny", hold["id"], "--reason", "quietly")
        out, err = proc.communicate(timeout=30)
        assert out == "status=126\n" and "agentwarden" not in err and "Operation not permitted" in err
