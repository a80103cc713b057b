"""Once an agent, always an agent: a root agent that moves itself (or its child)
to a cgroup outside its agent's stays watched under its original agent, and
the move is a violation -- killed in the kernel where the policy kills."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import events_of, wait_for

pytestmark = pytest.mark.kernel

# The attacker: moves itself to the cgroup given, then runs a shell that reads
# a file and forks a child that execs. Prints its pid first.
ESCAPE = """\
import os, sys
escape, secret = sys.argv[1], sys.argv[2]
print(os.getpid(), flush=True)
with open(escape + "/cgroup.procs", "w") as f:
    f.write(str(os.getpid()))
os.execv("/bin/sh", ["/bin/sh", "-c", f"/usr/bin/cat {secret}; /usr/bin/true escaped"])
"""

# A parent that moves its child (waiting on a pipe, no watched call yet) out,
# then lets it run: the child execs.
MOVE_CHILD = """\
import os, sys
escape = sys.argv[1]
r, w = os.pipe()
pid = os.fork()
if pid == 0:   # no watched call (close, open...) before the exec
    os.read(r, 1)
    os.execv("/usr/bin/true", ["/usr/bin/true", "moved-by-parent"])
os.close(r)
print(pid, flush=True)
with open(escape + "/cgroup.procs", "w") as f:
    f.write(str(pid))
os.write(w, b"x")
_, status = os.waitpid(pid, 0)
print(status, flush=True)
"""


def _policy(agent: str, mode: str, action: str) -> str:
    return (f'[agent.{agent}]\nmode = "{mode}"\non-violation = "{action}"\n'
            f'[agent.{agent}.exec]\nallow = ["/**"]\n'
            f'[agent.{agent}.files]\nread-allow = ["/**"]\nwrite-allow = ["/**"]\n')


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _violations(warden, agent: str) -> list[dict]:
    return [r for r in warden.records() if r["kind"] == "violation" and r["agent"] == agent]


def test_a_process_that_leaves_its_agent_stays_watched_under_it(warden, agent_cgroup, tmp_path):
    agent = _name("leaver")
    cg = agent_cgroup(agent)
    escape = agent_cgroup("escape", tag=False)    # a fresh cgroup, outside every agent
    warden.set_policy(agent, _policy(agent, "enforce", "alert"))
    secret = tmp_path / "secret"
    secret.write_text("the secret\n")
    result = cg.run([sys.executable, "-S", "-c", ESCAPE, str(escape.path), str(secret)], check=True)
    pid = int(result.stdout.split()[0])
    assert result.stdout.endswith(b"the secret\n")
    warden.settle()
    records = warden.records()
    mine = events_of(records, cg.id)
    # What it ran afterwards: recorded under the original agent, in its real cgroup.
    assert [r for r in records if r.get("cgroup_id") == escape.id], "no record names what it did"
    [shell] = [r for r in mine if r["kind"] == "exec" and r["pid"] == pid and r["argv"][0] == "/bin/sh"]
    assert shell["cgroup_id"] == escape.id
    [cat] = [r for r in mine if r["kind"] == "exec" and r["argv"][:1] == ["/usr/bin/cat"]]
    assert cat["cgroup_id"] == escape.id and cat["ppid"] == pid
    assert any(r["kind"] == "open" and r.get("resolved_path") == str(secret) and r["pid"] == cat["pid"]
               for r in mine)
    assert any(r["kind"] == "exec" and r["argv"] == ["/usr/bin/true", "escaped"] for r in mine)
    [move] = [r for r in mine if r["kind"] == "move"]
    assert move["moved_pid"] == pid and move["pid"] == pid and move["left"]
    assert move["dst_cgroup_id"] == escape.id and move["dst_agent_cgroup_id"] == 0
    assert move["dst_path"].endswith(escape.path.name) and move["agent"] == agent
    assert move["cgroup_id"] == escape.id and not move["killed_in_kernel"]
    # The move is a violation; alert only records it.
    [violation] = _violations(warden, agent)
    assert violation["event"] == "move" and violation["pid"] == pid
    assert violation["attempted"] == f"move of pid {pid} to cgroup {move['dst_path']}"
    assert violation["action_taken"] == "none (alert)"
    # None of it was credited to another agent or lost from the agent's view.
    assert not [r for r in records if r.get("cgroup_id") == escape.id
                and r.get("agent_cgroup_id") not in (cg.id, None)]


def test_leaving_is_killed_in_the_kernel_where_the_policy_kills(warden, agent_cgroup, tmp_path):
    agent = _name("leavekill")
    cg = agent_cgroup(agent)
    escape = agent_cgroup("escape", tag=False)
    warden.set_policy(agent, _policy(agent, "enforce", "kill"))
    secret = tmp_path / "secret"
    secret.write_text("the secret\n")
    result = cg.run([sys.executable, "-S", "-c", ESCAPE, str(escape.path), str(secret)])
    pid = int(result.stdout.split()[0])
    assert result.returncode == -9 and b"secret" not in result.stdout
    warden.settle()
    mine = events_of(warden.records(), cg.id)
    [move] = [r for r in mine if r["kind"] == "move"]
    assert move["left"] and move["killed_in_kernel"] and move["moved_pid"] == pid
    assert not [r for r in mine if r["kind"] == "exec" and r["pid"] == pid and r["argv"][0] == "/bin/sh"]
    [violation] = _violations(warden, agent)
    assert violation["event"] == "move" and violation["action"] == "kill"
    assert violation["action_taken"] == ("killed in the kernel by on-violation kill: "
                                         "leaving the agent's cgroups")


def test_a_child_moved_out_by_its_parent_dies_at_its_next_watched_call(warden, agent_cgroup):
    agent = _name("movechild")
    cg = agent_cgroup(agent)
    escape = agent_cgroup("escape", tag=False)
    warden.set_policy(agent, _policy(agent, "enforce", "kill"))
    daemon = warden.status()["daemon"]["pid"]
    os.kill(daemon, signal.SIGSTOP)   # the daemon's own kill would race the kernel's
    try:
        result = cg.run([sys.executable, "-S", "-c", MOVE_CHILD, str(escape.path)], check=True)
    finally:
        os.kill(daemon, signal.SIGCONT)
    child, status = (int(v) for v in result.stdout.split())
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9
    warden.settle()
    mine = events_of(warden.records(), cg.id)
    [move] = [r for r in mine if r["kind"] == "move"]
    assert move["moved_pid"] == child and move["pid"] != child
    assert move["left"] and move["kill_pending"] and not move["killed_in_kernel"]
    # Its exec was seen, under the agent, and killed before the new program ran.
    [exec_] = [r for r in mine if r["kind"] == "exec" and r["pid"] == child]
    assert exec_["cgroup_id"] == escape.id and exec_["argv"] == ["/usr/bin/true", "moved-by-parent"]
    assert [v["pid"] for v in _violations(warden, agent)] == [child]


def test_moves_within_the_agent_are_recorded_not_judged(warden, agent_cgroup):
    agent = _name("inside")
    cg = agent_cgroup(agent)
    sub = cg.child("sub")
    warden.set_policy(agent, _policy(agent, "enforce", "kill"))
    script = ("import os, sys\nopen(sys.argv[1] + '/cgroup.procs', 'w').write(str(os.getpid()))\n"
              "os.execv('/usr/bin/true', ['/usr/bin/true', 'inside'])\n")
    cg.run([sys.executable, "-S", "-c", script, str(sub)], check=True)
    warden.settle()
    mine = events_of(warden.records(), cg.id)
    [move] = [r for r in mine if r["kind"] == "move"]
    assert not move["left"] and move["dst_agent_cgroup_id"] == cg.id
    assert any(r["kind"] == "exec" and r["argv"] == ["/usr/bin/true", "inside"] for r in mine)
    assert not _violations(warden, agent)


CLONE3_ATTACKER = Path(__file__).parent / "attackers" / "clone3_into_cgroup.c"


def _clone3_attacker(tmp_path) -> Path:
    binary = tmp_path / "clone3_into_cgroup"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(CLONE3_ATTACKER)], check=True)
    return binary


def test_a_child_born_elsewhere_by_clone3_stays_watched_under_its_agent(warden, agent_cgroup, tmp_path):
    agent = _name("clone3")
    cg = agent_cgroup(agent)
    escape = agent_cgroup("escape", tag=False)
    warden.set_policy(agent, _policy(agent, "enforce", "alert"))
    secret = tmp_path / "secret"
    secret.write_text("the secret\n")
    result = cg.run([str(_clone3_attacker(tmp_path)), str(escape.path), str(secret)], check=True)
    child = int(result.stdout.split()[0])
    assert b"the secret" in result.stdout
    warden.settle()
    records = warden.records()
    mine = events_of(records, cg.id)
    # The child was born in the other cgroup, and all it did is recorded under the agent.
    [shell] = [r for r in mine if r["kind"] == "exec" and r["pid"] == child]
    # (right after a fork, its program's strings may not be mapped yet: the kernel's own path says)
    assert shell["cgroup_id"] == escape.id and shell["exec_path"] == "/bin/sh"
    [cat] = [r for r in mine if r["kind"] == "exec" and r["argv"][:1] == ["/usr/bin/cat"]]
    assert cat["cgroup_id"] == escape.id
    assert any(r["kind"] == "open" and r.get("resolved_path") == str(secret) and r["pid"] == cat["pid"]
               for r in mine)
    assert any(r["kind"] == "exec" and r["argv"] == ["/usr/bin/true", "escaped"] for r in mine)
    [move] = [r for r in mine if r["kind"] == "move"]
    assert move["born_by_clone3"] and move["left"] and move["moved_pid"] == child
    assert move["dst_cgroup_id"] == escape.id and not move["killed_in_kernel"]
    [violation] = _violations(warden, agent)
    assert violation["event"] == "move" and violation["pid"] == child
    assert violation["attempted"] == f"clone3 of pid {child} into cgroup id {escape.id}"
    assert not [r for r in records if r.get("cgroup_id") == escape.id
                and r.get("agent_cgroup_id") not in (cg.id, None)]


def test_a_child_born_elsewhere_dies_before_its_first_instruction_where_the_policy_kills(
        warden, agent_cgroup, tmp_path):
    agent = _name("clone3kill")
    cg = agent_cgroup(agent)
    escape = agent_cgroup("escape", tag=False)
    warden.set_policy(agent, _policy(agent, "enforce", "kill"))
    secret = tmp_path / "secret"
    secret.write_text("the secret\n")
    result = cg.run([str(_clone3_attacker(tmp_path)), str(escape.path), str(secret)], check=True)
    child, status = (int(v) for v in result.stdout.split())
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9
    assert b"secret" not in result.stdout
    warden.settle()
    mine = events_of(warden.records(), cg.id)
    [move] = [r for r in mine if r["kind"] == "move"]
    assert move["born_by_clone3"] and move["killed_in_kernel"] and move["moved_pid"] == child
    assert not [r for r in mine if r["kind"] == "exec" and r["pid"] == child]
    [violation] = _violations(warden, agent)
    assert violation["event"] == "move" and violation["action"] == "kill"


def test_a_child_born_by_clone3_within_its_agent_is_no_violation(warden, agent_cgroup, tmp_path):
    agent = _name("clone3in")
    cg = agent_cgroup(agent)
    sub = cg.child("sub")
    warden.set_policy(agent, _policy(agent, "enforce", "kill"))
    secret = tmp_path / "secret"
    secret.write_text("the secret\n")
    result = cg.run([str(_clone3_attacker(tmp_path)), str(sub), str(secret)], check=True)
    lines = result.stdout.split(b"\n")
    child, status = int(lines[0]), int(lines[-2])
    assert b"the secret" in result.stdout
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    warden.settle()
    mine = events_of(warden.records(), cg.id)
    assert not [r for r in mine if r["kind"] == "move"]
    assert any(r["kind"] == "exec" and r["pid"] == child for r in mine)
    assert not _violations(warden, agent)
