"""`agentwarden run` sessions on the real kernel: real seccomp filters, real
programs, real approvals from the CLI, exec verification in BPF."""
from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from agentwarden.probe import loader
from agentwarden.headers import FAST_HEADER, header_constants
from conftest import Warden, wait_for

pytestmark = pytest.mark.kernel

PY = sys.executable


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _policy(agent: str, *, on_violation="kill", exec_allow=(), exec_hold=(), write_allow=(),
            deny_files=(), extra="") -> str:
    def lst(items):
        return "[" + ", ".join(f'"{i}"' for i in items) + "]"
    return (f'[agent.{agent}]\nmode = "enforce"\non-violation = "{on_violation}"\n{extra}'
            f"[agent.{agent}.exec]\nallow = {lst(exec_allow)}\nhold = {lst(exec_hold)}\n"
            f"[agent.{agent}.files]\nread-allow = [\"/**\"]\nwrite-allow = {lst(write_allow)}\n"
            + (f"deny = {lst(deny_files)}\n" if deny_files else ""))


SHELL = ["/usr/bin/sh", "/usr/bin/dash", "/bin/sh", "/bin/dash"]


@pytest.fixture
def session_agent(warden, agent_cgroup):
    """An agent cgroup and a function to give it a policy and start `run` sessions."""
    def make(policy_kwargs: dict):
        agent = _name("s")
        cg = agent_cgroup(agent)
        warden.set_policy(agent, _policy(agent, **policy_kwargs))
        return agent, cg
    return make


def start_run(warden: Warden, agent: str, command: list[str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "agentwarden", "run", "--agent", agent, *extra, "--", *command],
                            env=warden.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def holds(warden: Warden, env=None) -> list[dict]:
    from agentwarden import session
    return session.admin_request(warden.settings, {"cmd": "holds"})["holds"]


def wait_hold(warden: Warden, agent: str, count: int = 1) -> list[dict]:
    return wait_for(lambda: [h for h in holds(warden) if h["agent"] == agent][:count]
                    if len([h for h in holds(warden) if h["agent"] == agent]) >= count else None,
                    timeout=20, what=f"{count} hold(s) of {agent}")


def test_allowed_runs_without_prompt_held_waits_for_approve_or_deny(warden, session_agent, tmp_path):
    agent, _ = session_agent(dict(exec_allow=SHELL + ["/usr/bin/echo"], exec_hold=["/usr/bin/date *"],
                                  write_allow=[f"{tmp_path}/**", "/dev/null"]))
    # Allowed: runs at once, no hold; a write-open in the workspace proceeds too.
    done = start_run(warden, agent, ["/bin/sh", "-c", f"/usr/bin/echo hi > {tmp_path}/ws.txt; echo $?"],
                     "--task", "smoke", "--on-behalf-of", "alice")
    out, err = done.communicate(timeout=30)
    assert (done.returncode, out) == (0, "0\n"), err
    assert (tmp_path / "ws.txt").read_text() == "hi\n"
    assert not [h for h in holds(warden) if h["agent"] == agent]

    # Held, then approved: the output appears only after approval.
    held = start_run(warden, agent, ["/bin/sh", "-c", "/usr/bin/date +approved-%Y"])
    [hold] = wait_hold(warden, agent)
    assert hold["action"].startswith("exec /usr/bin/date +approved-")
    assert 'exec.hold "/usr/bin/date *"' in hold["rule"]
    assert held.poll() is None
    warden.cli("approve", hold["id"], "--reason", "fine by me")
    out, _ = held.communicate(timeout=30)
    assert out.startswith("approved-")

    # Held, then denied: the syscall fails with EPERM, the shell says so.
    denied = start_run(warden, agent, ["/bin/sh", "-c", "/usr/bin/date; echo status=$?"])
    [hold] = wait_hold(warden, agent)
    warden.cli("deny", hold["id"], "--reason", "no")
    out, err = denied.communicate(timeout=30)
    assert "Operation not permitted" in err and "status=126" in out

    warden.settle()
    records = [r for r in warden.records() if r.get("agent") == agent]
    states = [(r["state"], r.get("reason")) for r in records if r["kind"] == "hold"]
    assert ("approved", "root: fine by me") in states or any(
        s == "approved" and "fine by me" in (reason or "") for s, reason in states)
    assert any(s == "denied" and "no" in reason for s, reason in states)
    supervised = [r for r in records if r["kind"] == "supervision" and r["state"] == "started"]
    assert any(s["task"] == "smoke" and s["on_behalf_of"] == "alice" for s in supervised)
    # The archive's attribution: the session record and every event of it name the person and task.
    sessions = [r for r in records if r["kind"] == "session" and r["task"] == "smoke"]
    assert sessions and sessions[0]["person"] == "alice"
    smoke = sessions[0]["session"]
    assert any(r["kind"] == "exec" and r.get("session") == smoke for r in records)
    # Every hold record names the policy that decided it.
    assert all(r["policy_hash"].startswith("sha256:") for r in records if r["kind"] == "hold")


def supervisor_health(warden: Warden, check=lambda health: True) -> dict:
    """The supervisor's latest health record once check accepts it (one a second)."""
    return wait_for(lambda: (lambda h: h if h and check(h) else None)(warden.status().get("sessions")),
                    timeout=20, what="the supervisor's health record")


def fast_counter(warden: Warden, name: str) -> int:
    return supervisor_health(warden)["fast"][name]


def test_fast_path_decides_new_command_lines_by_the_rules_and_drops_them_when_the_policy_changes(
        warden, session_agent, tmp_path):
    agent, _ = session_agent(dict(exec_allow=SHELL + ["/usr/bin/true"], exec_hold=["/usr/bin/true hold-me"],
                                  write_allow=[f"{tmp_path}/**"]))
    assert supervisor_health(warden)["fast_path"] == "running"
    before, stashed_before = fast_counter(warden, "ruled"), fast_counter(warden, "stashed")
    performed_before = fast_counter(warden, "performed")
    # Ten command lines and ten files never seen before (by absolute and by
    # relative path), then one command line the hold rule names.
    loop = (f"cd {tmp_path} && for i in 1 2 3 4 5 6 7 8 9 10; do /usr/bin/true $i || exit 9; "
            f"echo $i > {tmp_path}/notes.$i || exit 8; echo $i > relative.$i || exit 7; done; "
            "/usr/bin/true hold-me; echo status=$?")
    proc = start_run(warden, agent, ["/bin/sh", "-c", loop])
    [hold] = wait_hold(warden, agent)
    assert hold["action"].startswith("exec /usr/bin/true hold-me")
    warden.cli("deny", hold["id"], "--reason", "not that one")
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out) == (0, "status=126\n"), err
    assert (tmp_path / "notes.10").read_text() == (tmp_path / "relative.10").read_text() == "10\n"
    # The shell, the ten execs and the twenty write-opens were allowed by the
    # compiled rules alone, none learned from Python first; the write-opens
    # were performed by the fast path for the task, not continued.
    supervisor_health(warden, lambda h: h["fast"]["ruled"] >= before + 31
                      and h["fast"]["performed"] >= performed_before + 20)
    assert "exec fast path running (" in warden.cli("status").stdout
    # The execs' filenames came from what the BPF program copied while each
    # waited (exec_stash), not from reading the shell's memory.
    if loader.exec_stash_supported():
        assert fast_counter(warden, "stashed") >= stashed_before + 10

    # The same command line and write, now held and refused: the rules and
    # whatever was learned were the old policy's.
    wanted = warden.set_policy(agent, _policy(agent, exec_allow=SHELL, exec_hold=["/usr/bin/true"]))
    supervisor_health(warden, lambda h: h["policy_hash"] == wanted)
    held = start_run(warden, agent, ["/bin/sh", "-c", f"cd {tmp_path}; echo 11 > {tmp_path}/notes.10; "
                                                      "echo 11 > relative.10; /usr/bin/true 1; echo status=$?"])
    [hold] = wait_hold(warden, agent)
    assert hold["action"].startswith("exec /usr/bin/true 1")
    warden.cli("deny", hold["id"], "--reason", "policy changed")
    out, err = held.communicate(timeout=30)
    assert "Operation not permitted" in err and "status=126" in out
    assert (tmp_path / "notes.10").read_text() == (tmp_path / "relative.10").read_text() == "10\n"


def test_a_failed_exec_leaves_no_approval_behind(warden, session_agent, tmp_path):
    """An allowed exec is approved in the BPF map before it continues; one
    that then fails (ENOENT here) must not leave its approval there, or the
    map fills up and every later exec is refused."""
    from agentwarden import bpfsys
    from daemon.supervisor.approvals import APPROVED_PATH_MAX
    missing = tmp_path / "missing" / "program"
    agent, _ = session_agent(dict(exec_allow=[PY, os.path.realpath(PY), str(missing)]))
    before = supervisor_health(warden)
    # The plain path is allowed by the fast path's rules; the same with a '.'
    # in it is left to Python, which normalises it (and teaches the fast path
    # the repeat): all three approve.
    script = ("import os, sys, threading\n"
              "plain = sys.argv[1]\n"
              "dotted = os.path.join(os.path.dirname(plain), '.', os.path.basename(plain))\n"
              "for path in [plain, dotted] * 2:\n"
              "    try:\n"
              "        os.execv(path, [path])\n"
              "    except FileNotFoundError:\n"
              "        pass\n"
              "print(threading.get_native_id(), flush=True)\n"
              "sys.stdin.readline()\n")
    proc = subprocess.Popen([PY, "-m", "agentwarden", "run", "--agent", agent, "--", PY, "-c", script,
                             str(missing)], env=warden.env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip().isdigit(), f"no thread id from the session: {line!r}, exit {proc.poll()}"
        tid = int(line)
        fd = bpfsys.open_pinned(warden.settings.bpf_pin_dir / "approved_exec")
        try:
            assert bpfsys.lookup(fd, tid.to_bytes(4, sys.byteorder), 8 + APPROVED_PATH_MAX) is None
        finally:
            os.close(fd)
        assert holder(warden, "approval_slots", tid) != tid
        supervisor_health(warden, lambda h: h["fast"]["ruled"] >= before["fast"]["ruled"] + 2
                          and h["continued"] >= before["continued"] + 1
                          and h["fast"]["learned"] >= before["fast"]["learned"] + 1)
    finally:
        out, err = proc.communicate("\n", timeout=30)
    assert proc.returncode == 0, err


def test_an_argv_longer_than_the_supervisor_reads_is_judged_cut_short(warden, session_agent):
    """An argument past what the supervisor reads cannot slip by an argv
    pattern: the command line is judged cut short, so a hold rule with an argv
    pattern holds on the executable alone."""
    agent, _ = session_agent(dict(exec_allow=SHELL + ["/usr/bin/true", "/usr/bin/seq"],
                                  exec_hold=["/usr/bin/true * hold-me *"]))
    proc = start_run(warden, agent, ["/bin/sh", "-c", "/usr/bin/true a b && echo short=ok; "
                                                      "/usr/bin/true $(/usr/bin/seq 5000) hold-me; echo long=$?"])
    [hold] = wait_hold(warden, agent)
    assert hold["action"].startswith("exec /usr/bin/true 1 2 3") and " ... (/usr/bin/true)" in hold["action"]
    warden.cli("deny", hold["id"], "--reason", "too long to read")
    out, err = proc.communicate(timeout=60)
    assert out == "short=ok\nlong=126\n", err


def test_hold_timeout_denies(warden, session_agent):
    agent, _ = session_agent(dict(exec_allow=SHELL, exec_hold=["/usr/bin/date"], extra="hold-timeout = 1\n"))
    proc = start_run(warden, agent, ["/bin/sh", "-c", "/usr/bin/date; echo status=$?"])
    out, err = proc.communicate(timeout=30)
    assert "Operation not permitted" in err and "status=126" in out
    warden.settle()
    [timed_out] = [r for r in warden.records() if r["kind"] == "hold" and r["agent"] == agent
                   and r["state"] == "timed-out"]
    assert timed_out["waited"] >= 1
    # The agent read why: held (for how long), then timed out.
    assert f"held as {timed_out['hold_id']}, waiting for an admin's approval (denied in 1s without one)" in err
    told = [line for line in err.splitlines() if line.startswith(f"agentwarden: {timed_out['hold_id']} timed out")]
    assert len(told) == 1 and told[0].endswith("s without an admin's answer; exec /usr/bin/date "
                                               "(/usr/bin/date) fails (EPERM)"), err


def test_remember_skips_the_second_prompt_and_expires(warden, session_agent):
    agent, _ = session_agent(dict(exec_allow=SHELL, exec_hold=["/usr/bin/uname *"]))
    first = start_run(warden, agent, ["/usr/bin/uname", "-s"])
    [hold] = wait_hold(warden, agent)
    warden.cli("approve", hold["id"], "--remember", "3s")
    assert first.communicate(timeout=30)[0] == "Linux\n"
    started = time.monotonic()
    second = start_run(warden, agent, ["/usr/bin/uname", "-s"])
    assert second.communicate(timeout=30)[0] == "Linux\n"  # no prompt
    assert time.monotonic() - started < 3
    time.sleep(max(0.0, 3.2 - (time.monotonic() - started)))
    third = start_run(warden, agent, ["/usr/bin/uname", "-s"])
    [denied] = wait_hold(warden, agent)  # asked again: the memory expired
    warden.cli("deny", denied["id"])
    third.communicate(timeout=30)
    # Each exec names what let it through: the hold's approval, then its
    # remembered approval (the denied one never reached the kernel's tracepoints).
    warden.settle()
    execs = [r for r in warden.records() if r.get("agent") == agent and r["kind"] == "exec"
             and r["argv"] == ["/usr/bin/uname", "-s"]]
    assert [(r.get("hold_id"), r.get("remembered_from"), r["ret"]) for r in execs] == [
        (hold["id"], None, 0), (None, hold["id"], 0)]


def test_self_approval_from_inside_the_agent_is_refused_even_as_root(warden, session_agent, agent_cgroup):
    # The agent may run the CLI itself (python), so its request does reach the daemon.
    agent, cg = session_agent(dict(exec_allow=SHELL + [PY, os.path.realpath(PY)],
                                   exec_hold=["/usr/bin/date"]))
    proc = start_run(warden, agent, ["/usr/bin/date"])
    try:
        [hold] = wait_hold(warden, agent)
        for request in (["approve", hold["id"]], ["holds", "show", hold["id"]]):
            attempt = cg.run([PY, "-m", "agentwarden", *request], env=warden.env, text=True)
            assert attempt.returncode == 1 and "Traceback" not in attempt.stderr
            assert f"requests from inside agent {agent!r} are refused, even as root" in attempt.stderr
        assert [h["id"] for h in holds(warden) if h["agent"] == agent] == [hold["id"]]
    finally:
        proc.kill()
        proc.wait()


def holder(warden: Warden, array: str, tid: int) -> int:
    """The thread that holds tid's slot of approval_slots (its approval) or of
    exec_stash (its filename); 0: none."""
    from agentwarden import bpfsys
    from daemon.supervisor.approvals import APPROVED_PATH_MAX
    slots = header_constants(FAST_HEADER)["AW_APPROVAL_SLOTS"]
    header = {"approval_slots": 8, "exec_stash": 16}[array]   # tid, len[, filename pointer]
    fd = bpfsys.open_pinned(warden.settings.bpf_pin_dir / array)
    try:
        value = bpfsys.lookup(fd, (tid % slots).to_bytes(4, sys.byteorder), header + APPROVED_PATH_MAX)
    finally:
        os.close(fd)
    return int.from_bytes(value[:4], sys.byteorder)


@contextlib.contextmanager
def every_slot_held(warden: Warden):
    """Every slot of approval_slots held by a thread that cannot exist (tids
    stop below 2**22), so every approval must go to approved_exec by bpf();
    each approves /usr/bin/touch, which must not count for any other thread."""
    from agentwarden import bpfsys
    from daemon.supervisor.approvals import APPROVED_PATH_MAX
    slots = header_constants(FAST_HEADER)["AW_APPROVAL_SLOTS"]
    fd = bpfsys.open_pinned(warden.settings.bpf_pin_dir / "approval_slots")
    try:
        def fill(holder: int) -> None:
            path = b"/usr/bin/touch\0" if holder else b""
            value = struct.pack("=II", holder, len(path)) + path.ljust(APPROVED_PATH_MAX, b"\0")
            for index in range(slots):
                bpfsys.update(fd, index.to_bytes(4, sys.byteorder), value)
        fill(0xFFFFFFFF)
        try:
            yield
        finally:
            fill(0)
    finally:
        os.close(fd)


def test_a_thread_stopped_after_a_refused_exec_leaves_no_filename_stashed(warden, session_agent):
    """The BPF program copies a session exec's filename while the thread waits
    for the supervisor. A thread that stops on its way back from a refused
    execve (a SIGSTOP that came while it was held) still has execve as its
    syscall: what is copied then would be a stale filename for its next exec."""
    agent, _ = session_agent(dict(exec_allow=[PY, os.path.realpath(PY)], exec_hold=["/usr/bin/date"]))
    script = ("import os, sys, threading\n"
              "print(threading.get_native_id(), flush=True)\n"
              "try:\n"
              "    os.execv('/usr/bin/date', ['date'])\n"
              "except PermissionError:\n"
              "    print('refused', flush=True)\n")
    proc = start_run(warden, agent, [PY, "-c", script])
    try:
        tid = int(proc.stdout.readline())
        [hold] = wait_hold(warden, agent)
        if loader.exec_stash_supported():
            assert holder(warden, "exec_stash", tid) == tid   # copied while it waits
        os.kill(tid, signal.SIGSTOP)   # pending until the held execve returns
        warden.cli("deny", hold["id"])
        wait_for(lambda: psutil.Process(tid).status() == psutil.STATUS_STOPPED, timeout=10,
                 what="the session's thread stopped after its refused exec")
        assert holder(warden, "exec_stash", tid) != tid
        os.kill(tid, signal.SIGCONT)
        out, err = proc.communicate(timeout=30)
        assert out.strip().endswith("refused"), (out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("approvals", ["in slots", "in approved_exec (every slot held)"])
def test_exec_path_rewritten_between_check_and_exec_is_killed(warden, session_agent, tmp_path, approvals):
    racer_c = tmp_path / "racer.c"
    racer_c.write_text(r"""
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
static char path[32] = "/usr/bin/true";
static void *flip(void *unused) {
    for (;;) { memcpy(path, "/usr/bin/touch", 15); memcpy(path, "/usr/bin/true\0\0", 15); }
    return unused;
}
int main(int argc, char **argv) {
    int attempts = atoi(argv[2]), killed = 0, ran = 0;
    for (int i = 0; i < attempts && (killed < 5 || ran < 1); i++) {
        pid_t pid = fork();
        if (pid == 0) {
            pthread_t t;
            pthread_create(&t, 0, flip, 0);
            char *args[] = {"x", argv[1], 0};
            for (int k = 0; k < 100000; k++)
                execve(path, args, 0);   /* refused (EPERM) while it reads "touch": retry */
            _exit(127);
        }
        int status;
        waitpid(pid, &status, 0);
        killed += WIFSIGNALED(status) && WTERMSIG(status) == 9;
        ran += WIFEXITED(status) && WEXITSTATUS(status) == 0;
    }
    printf("killed=%d ran=%d\n", killed, ran);
    return 0;
}
""")
    racer = tmp_path / "racer"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(racer), str(racer_c)], check=True)
    marker = tmp_path / "touched"
    agent, _ = session_agent(dict(exec_allow=[str(racer), "/usr/bin/true"]))
    fast_before = fast_counter(warden, "continued")
    in_map_before = fast_counter(warden, "approved_in_map")
    with every_slot_held(warden) if approvals.startswith("in approved_exec") else contextlib.nullcontext():
        proc = start_run(warden, agent, [str(racer), str(marker), "3000"])
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    # Most of those execs were continued by the compiled fast path: it is covered too.
    health = supervisor_health(warden, lambda h: h["fast"]["continued"] > fast_before)
    in_map, continued = (health["fast"]["approved_in_map"] - in_map_before,
                         health["fast"]["continued"] - fast_before)
    if approvals.startswith("in approved_exec"):
        assert in_map >= continued > 0
    else:   # a slot is held only while its thread's exec is under way
        assert in_map < continued / 10, (in_map, continued)
    killed, ran = (int(out.split(f"{word}=")[1].split()[0]) for word in ("killed", "ran"))
    assert killed >= 1, out     # the race was won by the flipper, and caught
    assert ran >= 1, out        # and lost, so the approved program ran
    assert not marker.exists()  # /usr/bin/touch never ran its first instruction
    warden.settle()
    caught = [r for r in warden.records() if r.get("kind") == "exec" and r.get("agent") == agent
              and r.get("not_approved")]
    assert caught and all(r["exec_path"] == "/usr/bin/touch" for r in caught)


def test_bad_input_to_run_approve_and_the_socket(warden, session_agent, tmp_path):
    agent, _ = session_agent(dict(exec_allow=SHELL))
    for args, message in (
            (["run", "--agent", "no-such-agent", "--", "/bin/true"], "unknown agent 'no-such-agent'"),
            (["run", "--agent", agent], "no command given"),
            (["run", "--agent", agent, "--", "/no/such/program"], "command not found"),
            (["approve", "h999-none"], "no pending hold 'h999-none'"),
            (["deny", "h999-none"], "no pending hold 'h999-none'"),
            (["approve", "h1", "--remember", "soon"], "not a duration")):
        result = warden.cli(*args, check=False)
        usage = "--remember" in args   # docs/cli.md: 2 a bad option, 1 refused
        assert result.returncode == (2 if usage else 1) and "Traceback" not in result.stderr, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
    nobody = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             PY, "-m", "agentwarden", "run", "--agent", agent, "--", "/bin/true"],
                            env=warden.env, capture_output=True, text=True, timeout=30)
    assert nobody.returncode == 4 and "needs root" in nobody.stderr
    # Garbage on the sessions socket: an error reply, no crash, no hang.
    import socket
    for garbage in (b"\xc1", b"not msgpack", b"\x93\x01\x02\x03", b'\x81\xa3cmd\xa8register'):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(5)
        sock.connect(str(warden.settings.sessions_socket))
        sock.send(garbage)
        reply = __import__("msgpack").unpackb(sock.recv(65536))
        sock.close()
        assert reply["ok"] is False
    # An approval of an already decided hold is refused.
    agent2, _ = session_agent(dict(exec_allow=SHELL, exec_hold=["/usr/bin/date"]))
    proc = start_run(warden, agent2, ["/usr/bin/date"])
    [hold] = wait_hold(warden, agent2)
    warden.cli("approve", hold["id"])
    proc.communicate(timeout=30)
    again = warden.cli("approve", hold["id"], check=False)
    assert again.returncode == 1 and "already decided" in again.stderr
    wait_for(lambda: warden.status()["sessions"].get("notifications", 0) > 0,
             what="the supervisor to report notifications")  # still alive


ADMIN_GROUP = "agentwarden"
APPROVERS = ("aw-test-alice", "aw-test-bob")


@pytest.fixture
def admins():
    made_group = subprocess.run(["getent", "group", ADMIN_GROUP], capture_output=True).returncode != 0
    if made_group:
        subprocess.run(["groupadd", "--system", ADMIN_GROUP], check=True)
    for user in APPROVERS:
        subprocess.run(["useradd", "--no-create-home", "--no-user-group", "-G", ADMIN_GROUP, user],
                       capture_output=True)
    yield APPROVERS
    for user in APPROVERS:
        subprocess.run(["userdel", user], capture_output=True)
    if made_group:
        subprocess.run(["groupdel", ADMIN_GROUP], capture_output=True)


@pytest.fixture
def own_warden(kernel, tmp_path):
    """A warden of this test alone (it is killed or needs the admin group at start)."""
    run_dir = Path(f"/run/agentwarden-test-{uuid.uuid4().hex[:8]}")
    w = Warden(tmp_path, run_dir=run_dir)
    yield w
    w.stop()
    shutil.rmtree(run_dir, ignore_errors=True)


@contextlib.contextmanager
def warden_of_its_own(agent_cgroup, tmp_path, prefix: str, env: dict):
    """A warden with these settings in the environment (its own run dir), and
    an agent it watches."""
    run_dir = Path(f"/run/agentwarden-test-{uuid.uuid4().hex[:8]}")
    warden = Warden(tmp_path, run_dir=run_dir, env=env)
    try:
        agent = _name(prefix)
        cg = agent_cgroup(agent, tag=False)
        cg.warden = warden
        cg.tag()
        yield warden, agent
    finally:
        warden.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def test_without_the_fast_path_python_decides_every_exec(kernel, agent_cgroup, tmp_path):
    python_only = {"AGENTWARDEN_EXEC_FAST_PATH": "false"}
    with warden_of_its_own(agent_cgroup, tmp_path, "slow", python_only) as (warden, agent):
        warden.set_policy(agent, _policy(agent, exec_allow=SHELL + ["/usr/bin/true"],
                                         exec_hold=["/usr/bin/date"]))
        health = supervisor_health(warden)
        assert health["fast_path"] == "turned off (exec_fast_path = false)" and "fast" not in health
        assert "exec fast path off: turned off" in warden.cli("status").stdout
        proc = start_run(warden, agent, ["/bin/sh", "-c", "/usr/bin/true; /usr/bin/true; /usr/bin/date; echo $?"])
        [hold] = wait_hold(warden, agent)
        warden.cli("deny", hold["id"])
        out, err = proc.communicate(timeout=30)
        assert out == "126\n", err
        supervisor_health(warden, lambda h: h["continued"] >= 3)   # sh and both /usr/bin/true


def test_two_approver_rule_needs_two_different_admins(admins, own_warden, agent_cgroup, tmp_path):
    warden = own_warden
    agent = _name("two")
    cg = agent_cgroup(agent, tag=False)
    cg.warden = warden
    cg.tag()
    warden.set_policy(agent, _policy(agent, exec_allow=SHELL, exec_hold=["/usr/bin/date"],
                                     extra="hold-approvers = 2\n"))
    proc = start_run(warden, agent, ["/usr/bin/date", "+two-%Y"])
    [hold] = wait_hold(warden, agent)

    def approve_as(user):
        return subprocess.run(["setpriv", f"--reuid={user}", f"--regid={ADMIN_GROUP}", "--init-groups",
                               PY, "-m", "agentwarden", "approve", hold["id"], "--reason", f"{user} ok"],
                              env=warden.env, capture_output=True, text=True, timeout=30)

    first = approve_as("aw-test-alice")
    assert first.returncode == 0 and "1 more distinct approver" in first.stdout, first.stderr
    same = approve_as("aw-test-alice")
    assert same.returncode == 1 and "already approved" in same.stderr
    assert proc.poll() is None
    second = approve_as("aw-test-bob")
    assert second.returncode == 0 and "approved" in second.stdout, second.stderr
    assert proc.communicate(timeout=30)[0].startswith("two-")
    outsider = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               PY, "-m", "agentwarden", "holds"], env=warden.env,
                              capture_output=True, text=True, timeout=30)
    assert outsider.returncode == 4 and "Traceback" not in outsider.stderr
    warden.settle()
    [approved] = [r for r in warden.records() if r["kind"] == "hold" and r["state"] == "approved"]
    assert approved["approvers"] == ["aw-test-alice", "aw-test-bob"]
    assert [(a["name"], a["reason"]) for a in approved["approvals"]] == [
        ("aw-test-alice", "aw-test-alice ok"), ("aw-test-bob", "aw-test-bob ok")]
    assert len({a["uid"] for a in approved["approvals"]}) == 2 and approved["denial"] is None


def test_root_counts_once_whatever_sudo_says(warden, session_agent):
    """The approver is the uid on the socket (SO_PEERCRED): root approving twice
    under two SUDO_USER names is one approval; --remember must be finite,
    positive and at most remember_max."""
    agent, _ = session_agent(dict(exec_allow=SHELL, exec_hold=["/usr/bin/date"],
                                  extra="hold-approvers = 2\n"))
    proc = start_run(warden, agent, ["/usr/bin/date", "+sod-%Y"])
    try:
        [hold] = wait_hold(warden, agent)
        for bad in ("inf", "nan", "-1", "0", "1e3"):
            refused = warden.cli("approve", hold["id"], "--remember", bad, check=False)
            assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
            assert "is not a duration" in refused.stderr or "must be positive" in refused.stderr, refused.stderr
        too_long = warden.cli("approve", hold["id"], "--remember", "31d", check=False)
        assert too_long.returncode == 1 and "remember_max" in too_long.stderr, too_long.stderr
        def approve_claiming(user: str, uid: str) -> subprocess.CompletedProcess:
            return subprocess.run([PY, "-m", "agentwarden", "approve", hold["id"], "--reason", f"{user} says ok"],
                                  env={**warden.env, "SUDO_USER": user, "SUDO_UID": uid},
                                  capture_output=True, text=True, timeout=30)
        as_alice = approve_claiming("alice", "1000")
        assert as_alice.returncode == 0 and "1 more distinct approver" in as_alice.stdout, as_alice.stderr
        as_bob = approve_claiming("bob", "1001")
        assert as_bob.returncode == 1 and "already approved" in as_bob.stderr, as_bob.stderr
        assert "root counts once" in as_bob.stderr
        assert proc.poll() is None   # still held
        warden.cli("deny", hold["id"], "--reason", "no second admin")
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    warden.settle()
    records = [r for r in warden.records() if r["kind"] == "hold" and r["hold_id"] == hold["id"]]
    [approval] = [r for r in records if r["state"] == "approval"]
    assert [a["uid"] for a in approval["approvals"]] == [0]
    # The environment's claim is no identity: the name is root's.
    assert approval["approvals"][0]["name"].startswith("root") and "alice" not in approval["approvals"][0]["name"]
    [denied] = [r for r in records if r["state"] == "denied"]
    assert denied["denial"]["uid"] == 0 and denied["denial"]["reason"] == "no second admin"


def test_stopping_the_service_fails_held_and_later_calls_closed(own_warden, agent_cgroup, tmp_path):
    """A real stop (of `up`, which keeps the listeners while the daemon
    restarts: tests/test_kernel_restart.py) ends the sessions, closed."""
    warden = own_warden
    agent = _name("closed")
    cg = agent_cgroup(agent, tag=False)
    cg.warden = warden
    cg.tag()
    warden.set_policy(agent, _policy(agent, exec_allow=SHELL + ["/usr/bin/sleep"], exec_hold=["/usr/bin/date"]))
    script = ("/usr/bin/date; echo held=$?; /usr/bin/sleep 0.5; echo later=$?; "
              f"echo x > {tmp_path}/write; echo write=$?")
    proc = start_run(warden, agent, ["/bin/sh", "-c", script])
    wait_hold(warden, agent)
    warden.proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    # The held exec, the later (allowed!) exec and the write all fail: nothing proceeds unchecked.
    assert "held=126" in out and "later=126" in out and "write=2" in out, (out, err)
    assert "Function not implemented" in err
    assert not (tmp_path / "write").exists()


def test_in_kernel_deny_rules_apply_inside_sessions(warden, session_agent, tmp_path):
    """A session's cgroup carries the session bit in the BPF map; the deny trie's
    keys are the agent's number alone. The rule must still match: the read of a
    denied file is killed in the kernel, before the reader sees a byte."""
    secret = tmp_path / "secret"
    secret.write_text("s3cret-in-session")
    agent, _ = session_agent(dict(exec_allow=SHELL + ["/usr/bin/cat"], deny_files=[str(secret)]))
    proc = start_run(warden, agent, ["/usr/bin/cat", str(secret)])
    out, err = proc.communicate(timeout=30)
    assert "s3cret" not in out, (out, err)
    warden.settle()
    [opened] = [r for r in warden.records() if r["kind"] == "open" and r.get("agent") == agent
                and r.get("path") == str(secret)]
    assert opened["killed_in_kernel"], opened


def test_a_refused_exec_with_no_program_there_gets_the_kernels_answer(warden, session_agent, tmp_path):
    """EPERM ends execvp's PATH search and a shell's: a refused path where
    there is no program (missing, or not executable) must fail as the kernel
    would fail it (ENOENT, EACCES) with no violation, so the search goes on
    to the allowed program; a forbidden program that is there is still refused."""
    not_executable = tmp_path / "plain"
    not_executable.mkdir()
    for name in ("ls", "as", "grep"):
        (not_executable / name).write_text("#!/bin/sh\necho should not run\n")
        (not_executable / name).chmod(0o644)
    forbidden = tmp_path / "forbidden"
    forbidden.mkdir()
    shutil.copy("/usr/bin/true", forbidden / "tool")
    path = f"/nonexistent/bin:{tmp_path}/missing/bin:{not_executable}:/usr/bin"
    agent, _ = session_agent(dict(exec_allow=["/usr/bin/*", "/usr/lib/gcc/**", "/usr/libexec/gcc/**"],
                                  write_allow=[f"{tmp_path}/**", "/tmp/**", "/dev/null"]))
    before = supervisor_health(warden)["exec_cannot_run"]
    script = (f"PATH={path}; true && ls / >/dev/null && grep -rq root /etc/passwd && "
              f"find {tmp_path} -name tool | grep -q tool && echo searched=ok")
    proc = start_run(warden, agent, ["/usr/bin/sh", "-c", script])
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out) == (0, "searched=ok\n"), err
    if shutil.which("gcc"):
        (tmp_path / "hello.c").write_text("int main(void) { return 0; }\n")
        proc = start_run(warden, agent, ["/usr/bin/env", f"PATH={path}", "TMPDIR=" + str(tmp_path),
                                         "gcc", "-c", str(tmp_path / "hello.c"), "-o", str(tmp_path / "hello.o")])
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and (tmp_path / "hello.o").exists(), err
    # A forbidden program that exists: EPERM, and a violation.
    proc = start_run(warden, agent, ["/usr/bin/sh", "-c", f"{forbidden}/tool; echo status=$?"])
    out, err = proc.communicate(timeout=30)
    assert "Operation not permitted" in err and out == "status=126\n", (out, err)
    supervisor_health(warden, lambda h: h["exec_cannot_run"] >= before + 4)
    violations = wait_for(lambda: [r for r in warden.records() if r["kind"] == "violation"
                                   and r.get("agent") == agent] or None, timeout=20, what="the violation")
    warden.settle()
    violations = [r for r in warden.records() if r["kind"] == "violation" and r.get("agent") == agent]
    assert [v["attempted"] for v in violations] == [f"exec {forbidden}/tool ({forbidden}/tool)"], violations
    assert violations[0]["action_taken"] == "refused: EPERM"


def test_ended_sessions_leave_no_cgroup_behind(warden, session_agent):
    """The listener hangs up as the last task leaves the filter, which can be
    before it has left the cgroup (rmdir: EBUSY): the supervisor tries again,
    so a harness that starts a session per tool call does not pile up empty
    cgroups (about one in five stayed before)."""
    agent, cg = session_agent(dict(exec_allow=["/usr/bin/*", "/bin/*"]))
    for _ in range(20):
        proc = start_run(warden, agent, ["/bin/true"])
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    wait_for(lambda: not [p for p in cg.path.iterdir() if p.is_dir() and p.name.startswith("s-")],
             timeout=15, what="every ended session's cgroup removed")
