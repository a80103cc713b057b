"""Judge everything the kernel runs: a script allowed by path whose #! line
(or a binfmt_misc handler) names a forbidden interpreter. The interpreter is
an exec of its own (syscall "interpreter"), recorded, decided, killed in the
kernel by a deny rule; a #! chain's middle script too. Ordinary scripts whose
interpreter is allowed raise nothing. Under `agentwarden run`:
tests/test_kernel_session_interpreters.py."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from conftest import events_of
from test_kernel_enforce import _policy, _violations

pytestmark = pytest.mark.kernel

ATTACKER = Path(__file__).parent / "attackers" / "interpreter_script.sh"
TOOLS = ["/usr/bin/*", "/bin/*"]


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _setup(tmp_path) -> tuple[Path, Path]:
    """A work directory and a forbidden interpreter (a copy of sh outside the allowed tools)."""
    work = tmp_path / "work"
    work.mkdir()
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy("/bin/dash" if os.path.exists("/bin/dash") else "/bin/sh", evil / "sh")
    return work, evil / "sh"


def _interpreters(warden, cg) -> list[dict]:
    return [r for r in events_of(warden.records(), cg.id, "exec") if r["syscall"] == "interpreter"]


def test_a_forbidden_interpreter_of_an_allowed_script_is_an_exec_of_its_own(warden, agent_cgroup, tmp_path):
    agent = _name("interp")
    cg = agent_cgroup(agent)
    work, evil = _setup(tmp_path)
    warden.set_policy(agent, _policy(agent, "enforce", "alert", TOOLS + [f"{work}/allowed.sh"]))
    result = cg.run(["/bin/sh", str(ATTACKER), str(work), str(evil)])
    assert result.returncode == 0 and b"ran-by-interpreter" in result.stdout, result.stderr
    warden.settle()
    [interp] = _interpreters(warden, cg)
    assert interp["exec_path"] == str(evil) and interp["resolved_exec_path"] == str(evil)
    assert interp["argv"] == [str(evil), f"{work}/allowed.sh", "attack"]
    [script] = [r for r in events_of(warden.records(), cg.id, "exec")
                if r["syscall"] == "execve" and r["exec_path"] == f"{work}/allowed.sh"]
    assert script["pid"] == interp["pid"] and script["ret"] == 0
    [violation] = _violations(warden, agent)
    assert violation["event"] == "exec" and violation["pid"] == interp["pid"]
    assert str(evil) in violation["attempted"]


def test_a_denied_interpreter_is_killed_in_the_kernel_before_it_runs(warden, agent_cgroup, tmp_path):
    agent = _name("interpkill")
    cg = agent_cgroup(agent)
    work, evil = _setup(tmp_path)
    warden.set_policy(agent, _policy(agent, "enforce", "kill", TOOLS + [f"{work}/allowed.sh"],
                                     exec_deny=[str(evil)]))
    result = cg.run(["/bin/sh", str(ATTACKER), str(work), str(evil)])
    assert result.returncode == -9 and b"ran-by-interpreter" not in result.stdout
    warden.settle()
    [interp] = _interpreters(warden, cg)
    assert interp["exec_path"] == str(evil) and interp["killed_in_kernel"]
    [violation] = _violations(warden, agent)
    assert violation["action_taken"].startswith("killed in the kernel")


def test_the_middle_script_of_a_chain_is_judged_too(warden, agent_cgroup, tmp_path):
    agent = _name("interpchain")
    cg = agent_cgroup(agent)
    work, _ = _setup(tmp_path)
    warden.set_policy(agent, _policy(agent, "enforce", "kill", TOOLS + [f"{work}/allowed.sh"],
                                     exec_deny=[f"{work}/middle.sh"]))
    result = cg.run(["/bin/sh", str(ATTACKER), str(work), "/bin/sh", "chain"])
    assert result.returncode == -9 and b"ran-by" not in result.stdout
    warden.settle()
    interps = _interpreters(warden, cg)
    assert [r["exec_path"] for r in interps] == ["/bin/sh", f"{work}/middle.sh"]
    assert [r["killed_in_kernel"] for r in interps] == [False, True]
    assert [v["event"] for v in _violations(warden, agent)] == ["exec"]


def test_a_binfmt_misc_handler_is_judged(warden, agent_cgroup, tmp_path):
    registry = Path("/proc/sys/fs/binfmt_misc")
    if not (registry / "register").exists():
        os.system("mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null")
    if not (registry / "register").exists():
        pytest.skip("binfmt_misc is not available")
    agent = _name("binfmt")
    cg = agent_cgroup(agent)
    work, evil = _setup(tmp_path)
    tag = uuid.uuid4().hex[:8]
    magic = f"AWTEST{tag}"
    (registry / "register").write_text(f":aw{tag}:M::{magic}::{evil}:")
    try:
        program = work / "program.bin"
        program.write_text(f"{magic}\n")
        program.chmod(0o755)
        warden.set_policy(agent, _policy(agent, "enforce", "alert", TOOLS + [str(program)]))
        cg.run([str(program)])
    finally:
        (registry / f"aw{tag}").write_text("-1")
    warden.settle()
    [interp] = _interpreters(warden, cg)
    assert interp["exec_path"] == str(evil) and interp["argv"][:2] == [str(evil), str(program)]
    [violation] = _violations(warden, agent)
    assert violation["event"] == "exec" and str(evil) in violation["attempted"]


def test_ordinary_scripts_whose_interpreter_is_allowed_raise_nothing(warden, agent_cgroup, tmp_path):
    agent = _name("interpok")
    cg = agent_cgroup(agent)
    work, _ = _setup(tmp_path)
    py = work / "tool.py"
    py.write_text("#!/usr/bin/env python3\nprint('py-ok')\n")
    sh = work / "tool.sh"
    sh.write_text("#!/bin/sh -e\necho sh-ok \"$@\"\n")
    for script in (py, sh):
        script.chmod(0o755)
    warden.set_policy(agent, _policy(agent, "enforce", "kill", TOOLS + [f"{work}/*"]))
    result = cg.run(["/bin/sh", "-c", f"{py} && {sh} one two && {sh}"], check=True,
                    env={"PATH": "/usr/bin:/bin"})
    assert result.stdout.split() == [b"py-ok", b"sh-ok", b"one", b"two", b"sh-ok"]
    warden.settle()
    interps = _interpreters(warden, cg)
    assert sorted(r["exec_path"] for r in interps) == ["/bin/sh", "/bin/sh", "/usr/bin/env"]
    assert [r["argv"] for r in interps if r["exec_path"] == "/usr/bin/env"] == [
        ["/usr/bin/env", "python3", str(py)]]
    assert not _violations(warden, agent)
