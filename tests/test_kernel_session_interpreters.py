"""Interpreters under `agentwarden run`: the supervisor reads a script's #!
line (a chain of them, binfmt_misc entries) before it decides the exec, and
judges each interpreter as an exec of its own -- refused, held or allowed
before anything runs; the BPF program kills an exec whose interpreters are not
the ones approved (a #! line swapped after the check). Ordinary scripts and
real tools cost no hold and no violation."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from conftest import stop_process, wait_for
from test_kernel_sessions import (SHELL, _policy, fast_counter, holds, session_agent, start_run,  # noqa: F401
                                  supervisor_health, wait_hold)

pytestmark = pytest.mark.kernel

ATTACKER = Path(__file__).parent / "attackers" / "shebang_swap.c"
TOOLS = ["/usr/bin/*", "/bin/*"]


@pytest.fixture
def evil(tmp_path) -> Path:
    """A forbidden interpreter with a visible side effect: a copy of touch,
    outside the allowed tools (it creates the files its command line names)."""
    (tmp_path / "evil").mkdir()
    return Path(shutil.copy("/usr/bin/touch", tmp_path / "evil" / "touch"))


def _script(path: Path, first_line: str, body: str = "exit 0\n") -> Path:
    path.write_text(f"{first_line}\n{body}")
    path.chmod(0o755)
    return path


def _records(warden, agent: str, kind: str) -> list[dict]:
    return [r for r in warden.records() if r["kind"] == kind and r.get("agent") == agent]


def _run(warden, agent: str, command: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = start_run(warden, agent, ["/bin/sh", "-c", command])
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _binfmt_read_since(warden, since_ns: int) -> None:
    """The supervisor reads binfmt_misc each second, just before its health
    record: the second record since since_ns follows a reading."""
    wait_for(lambda: len([r for r in warden.records() if r["kind"] == "health"
                          and r["stage"] == "supervisor" and r["time"] > since_ns]) >= 2,
             what="the supervisor to read binfmt_misc again")


def test_a_forbidden_interpreter_of_an_allowed_script_is_refused_before_it_runs(
        warden, session_agent, tmp_path, evil):
    script = _script(tmp_path / "allowed.sh", f"#!{evil}")
    marker = tmp_path / "marker"
    agent, _ = session_agent(dict(exec_allow=TOOLS + [str(script)], write_allow=[f"{tmp_path}/**"]))
    code, out, err = _run(warden, agent, f"{script} {marker}; echo status=$?")
    assert "status=126" in out and "Operation not permitted" in err, (out, err)
    assert not marker.exists()   # the interpreter never ran its first instruction
    warden.settle()
    [refusal] = [v for v in _records(warden, agent, "violation") if v["event"] == "seccomp"]
    assert refusal["action_taken"] == "refused: EPERM"
    assert str(script) in refusal["attempted"] and f"through {evil}" in refusal["attempted"]
    assert not [r for r in _records(warden, agent, "exec") if r["exec_path"] == str(evil)]


def test_a_held_interpreter_runs_once_approved_and_not_when_denied(warden, session_agent, tmp_path, evil):
    script = _script(tmp_path / "tool.sh", f"#!{evil}")
    agent, _ = session_agent(dict(exec_allow=TOOLS + [str(script)], exec_hold=[str(evil)],
                                  write_allow=[f"{tmp_path}/**"]))
    approved, denied = tmp_path / "approved", tmp_path / "denied"
    proc = start_run(warden, agent, ["/bin/sh", "-c", f"{script} {approved}; echo status=$?"])
    [hold] = wait_hold(warden, agent)
    assert hold["action"].startswith(f"exec {script} {approved} ({script}) through {evil}")
    assert f'exec.hold "{evil}"' in hold["rule"]
    assert not approved.exists() and proc.poll() is None
    warden.cli("approve", hold["id"], "--reason", "ok")
    out, err = proc.communicate(timeout=30)
    assert "status=0" in out and approved.exists(), (out, err)

    proc = start_run(warden, agent, ["/bin/sh", "-c", f"{script} {denied}; echo status=$?"])
    [hold] = wait_hold(warden, agent)
    warden.cli("deny", hold["id"], "--reason", "no")
    out, err = proc.communicate(timeout=30)
    assert "status=126" in out and not denied.exists(), (out, err)
    warden.settle()
    # The approved interpreter was the supervisor's decision: the daemon raises nothing after it.
    assert not [v for v in _records(warden, agent, "violation") if v["event"] == "exec"]
    [ran] = [r for r in _records(warden, agent, "exec") if r["syscall"] == "interpreter"]
    assert ran["exec_path"] == str(evil) and ran["argv"][:3] == [str(evil), str(script), str(approved)]
    assert not ran["not_approved"]


def test_a_binfmt_misc_handler_is_judged_before_it_runs(warden, session_agent, tmp_path, evil):
    registry = Path("/proc/sys/fs/binfmt_misc")
    if not (registry / "register").exists():
        os.system("mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null")
    if not (registry / "register").exists():
        pytest.skip("binfmt_misc is not available")
    tag = uuid.uuid4().hex[:8]
    magic = f"AWSESS{tag}"
    program = tmp_path / "program.bin"
    program.write_text(f"{magic}\n")
    program.chmod(0o755)
    marker = tmp_path / "marker"
    agent, _ = session_agent(dict(exec_allow=TOOLS + [str(program)], write_allow=[f"{tmp_path}/**"]))
    (registry / "register").write_text(f":aw{tag}:M::{magic}::{evil}:")
    registered = time.time_ns()
    try:
        _binfmt_read_since(warden, registered)
        code, out, err = _run(warden, agent, f"{program} {marker}; echo status=$?")
        assert "status=126" in out and not marker.exists(), (out, err)
        # The handler allowed: it runs, with no hold and no violation.
        allowing = _policy(agent, exec_allow=TOOLS + [str(program), str(evil)], write_allow=[f"{tmp_path}/**"])
        warden.set_policy(agent, allowing)
        code, out, err = _run(warden, agent, f"{program} {marker}; echo status=$?")
        assert "status=0" in out and marker.exists(), (out, err)
    finally:
        (registry / f"aw{tag}").write_text("-1")
    warden.settle()
    [refusal] = _records(warden, agent, "violation")
    assert refusal["event"] == "seccomp" and f"through {evil}" in refusal["attempted"]
    [ran] = [r for r in _records(warden, agent, "exec") if r["syscall"] == "interpreter"]
    assert ran["exec_path"] == str(evil) and ran["argv"][:2] == [str(evil), str(program)]


def test_an_elf_binary_a_binfmt_misc_entry_claims_is_not_left_to_the_fast_path(
        warden, session_agent, tmp_path, evil):
    """binfmt_misc is tried before the kernel's ELF loader (qemu-user entries
    claim ELF files of other machines): the compiled fast path, which the
    rules would let approve this path, leaves it to the supervisor."""
    registry = Path("/proc/sys/fs/binfmt_misc")
    if not (registry / "register").exists():
        pytest.skip("binfmt_misc is not available")
    tag = uuid.uuid4().hex[:7]
    program = tmp_path / "native"
    head = bytearray(Path("/usr/bin/true").read_bytes())
    head[9:16] = tag.encode()   # e_ident's padding, which the ELF loader ignores
    program.write_bytes(bytes(head))
    program.chmod(0o755)
    marker = tmp_path / "marker"
    agent, _ = session_agent(dict(exec_allow=TOOLS + [str(program)], write_allow=[f"{tmp_path}/**"]))
    escaped = "".join(f"\\x{b:02x}" for b in head[:16])
    mask = "".join(f"\\x{b:02x}" for b in b"\xff" * 4 + b"\0" * 5 + b"\xff" * 7)
    (registry / "register").write_text(f":aw{tag}:M:0:{escaped}:{mask}:{evil}:")
    registered = time.time_ns()
    try:
        _binfmt_read_since(warden, registered)
        code, out, err = _run(warden, agent, f"{program} {marker}; echo status=$?")
    finally:
        (registry / f"aw{tag}").write_text("-1")
    assert "status=126" in out and not marker.exists(), (out, err)   # refused, not killed (137)
    _binfmt_read_since(warden, time.time_ns())
    code, out, err = _run(warden, agent, f"{program} && echo status=$?")
    assert "status=0" in out, (out, err)   # the entry gone: the native binary runs


def test_each_level_of_a_chain_is_judged(warden, session_agent, tmp_path, evil):
    middle = _script(tmp_path / "middle.sh", f"#!{evil}")
    script = _script(tmp_path / "allowed.sh", f"#!{middle}")
    marker = tmp_path / "marker"
    agent, _ = session_agent(dict(exec_allow=TOOLS + [str(script), str(middle)], write_allow=[f"{tmp_path}/**"]))
    code, out, err = _run(warden, agent, f"{script} {marker}; echo status=$?")
    assert "status=126" in out and not marker.exists(), (out, err)
    # The middle script held: the hold names both interpreters.
    warden.set_policy(agent, _policy(agent, exec_allow=TOOLS + [str(script), str(evil)], exec_hold=[str(middle)],
                                     write_allow=[f"{tmp_path}/**"]))
    proc = start_run(warden, agent, ["/bin/sh", "-c", f"{script} {marker}; echo status=$?"])
    [hold] = wait_hold(warden, agent)
    assert hold["action"].endswith(f"through {evil} and {middle}")
    warden.cli("approve", hold["id"])
    out, err = proc.communicate(timeout=30)
    assert "status=0" in out and marker.exists(), (out, err)
    warden.settle()
    [refusal] = _records(warden, agent, "violation")
    assert refusal["event"] == "seccomp" and f"through {evil} and {middle}" in refusal["attempted"]
    ran = [r for r in _records(warden, agent, "exec") if r["syscall"] == "interpreter"]
    assert sorted(r["exec_path"] for r in ran) == sorted([str(evil), str(middle)])
    assert not any(r["not_approved"] for r in ran)


def test_env_is_the_interpreter_and_what_it_runs_is_an_exec_of_its_own(warden, session_agent, tmp_path):
    script = _script(tmp_path / "tool.py", "#!/usr/bin/env python3", "print('py-ok')\n")
    agent, _ = session_agent(dict(exec_allow=SHELL + ["/usr/bin/env", str(script)]))
    code, out, err = _run(warden, agent, f"PATH=/usr/bin:/bin; {script}; echo status=$?")
    # env was approved as the script's interpreter and ran; its own exec of python3 was refused.
    assert "py-ok" not in out and "status=126" in out, (out, err)
    warden.settle()
    [refusal] = _records(warden, agent, "violation")
    assert refusal["attempted"].startswith(f"exec python3 {script}") and "through" not in refusal["attempted"]


def test_ordinary_scripts_and_real_tools_cost_no_hold_and_no_violation(warden, session_agent, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    py = _script(work / "tool.py", "#!/usr/bin/env python3", "import sys; print('py-ok', *sys.argv[1:])\n")
    sh = _script(work / "tool.sh", "#!/bin/sh -e", 'echo sh-ok "$@"\n')
    (work / "Makefile").write_text(f"all:\n\t{sh} from-make\n\t{py} from-make\n")
    agent, _ = session_agent(dict(
        exec_allow=TOOLS + ["/usr/lib/git-core/**", f"{work}/**"],
        write_allow=[f"{work}/**", "/dev/null", "/dev/tty"], on_violation="hold"))
    commands = (f"export PATH=/usr/bin:/bin HOME={work} && cd {work} && {py} one && {sh} two && make -s && git init -q repo && cd repo && "
                "git config user.email a@b && git config user.name a && "
                f"printf '#!/bin/sh\\n{sh} from-hook\\n' > .git/hooks/pre-commit && chmod +x .git/hooks/pre-commit && "
                "echo x > f && git add f && git commit -qm one && git log --oneline | wc -l")
    proc = start_run(warden, agent, ["/bin/sh", "-c", commands])
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        stop_process(proc)
    assert proc.returncode == 0, (out, err, [h["action"] for h in holds(warden) if h["agent"] == agent])
    assert out.split() == ["py-ok", "one", "sh-ok", "two", "sh-ok", "from-make", "py-ok", "from-make",
                           "1"], (out, err)
    assert "sh-ok from-hook" in err   # git runs hooks with their output on stderr
    warden.settle()
    assert not [h for h in holds(warden) if h["agent"] == agent]
    assert not _records(warden, agent, "violation")
    assert not [r for r in _records(warden, agent, "hold")]
    interpreters = [r for r in _records(warden, agent, "exec") if r["syscall"] == "interpreter"]
    assert {r["exec_path"] for r in interpreters} >= {"/usr/bin/env", "/bin/sh"}
    assert not any(r["not_approved"] for r in interpreters)


def test_a_shebang_swapped_after_the_check_is_killed_in_the_kernel(warden, session_agent, tmp_path, evil):
    attacker = tmp_path / "shebang_swap"
    subprocess.run(["gcc", "-O2", "-o", str(attacker), str(ATTACKER)], check=True)
    script, marker = tmp_path / "script", tmp_path / "marker"
    agent, cg = session_agent(dict(exec_allow=SHELL + [str(attacker), str(script)],
                                   write_allow=[f"{tmp_path}/**"]))
    # The agent's own process outside the session (its harness, say) swaps the file.
    procs = cg.path / "cgroup.procs"
    flipper = subprocess.Popen([str(attacker), "flip", str(script), "/bin/sh", str(evil), "60"],
                               stdout=subprocess.PIPE, text=True,
                               preexec_fn=lambda: procs.write_text("0"))
    try:
        proc = start_run(warden, agent, [str(attacker), "exec", str(script), str(marker), "3000"])
        out, err = proc.communicate(timeout=300)
    finally:
        flipper.kill()
        flipper.wait()
    assert proc.returncode == 0, err
    counts = dict(word.split("=") for word in out.split())
    assert int(counts["killed"]) >= 1, out   # the swap won the race, and was caught
    assert int(counts["ran"]) >= 1, out      # and lost: the approved interpreter ran
    assert not marker.exists()               # touch never ran its first instruction
    warden.settle()
    caught = [r for r in _records(warden, agent, "exec") if r["syscall"] == "interpreter" and r["not_approved"]]
    assert caught and all(r["exec_path"] == str(evil) for r in caught)
    violations = [v for v in _records(warden, agent, "violation") if v["event"] == "exec"]
    assert violations and all(v["action_taken"] == "killed in the kernel: not what the session's supervisor "
                                                   "approved" for v in violations)


def test_an_elf_binary_the_fast_path_knows_then_overwritten_by_a_script_runs_nothing_unapproved(
        warden, session_agent, tmp_path, evil):
    """The fast path reads an allowed ELF binary's first bytes once and then
    knows it by its identity (device, inode, size, mode, mtime and ctime):
    the same file overwritten in place -- same inode, same size -- by a #!
    script whose interpreter is forbidden is read again and refused; a script
    renamed over it (another inode) too. Never run."""
    program = Path(shutil.copy("/usr/bin/true", tmp_path / "tool"))
    marker = tmp_path / "marker"
    agent, _ = session_agent(dict(exec_allow=TOOLS + [str(program)], write_allow=[f"{tmp_path}/**"]))
    read_before = fast_counter(warden, "exec_files_read")
    code, out, err = _run(warden, agent, f"{program}; echo status=$?")
    assert "status=0" in out, (out, err)
    known_before = supervisor_health(warden, lambda h: h["fast"]["exec_files_read"] > read_before)[
        "fast"]["exec_files_known"]
    code, out, err = _run(warden, agent, f"for i in 1 2 3 4 5; do {program} || exit 9; done; echo status=$?")
    assert "status=0" in out, (out, err)
    supervisor_health(warden, lambda h: h["fast"]["exec_files_known"] >= known_before + 5)

    size, inode = program.stat().st_size, program.stat().st_ino
    script = f"#!{evil}\n".encode()
    with program.open("r+b") as f:   # in place: the inode the fast path knows
        f.write(script + b"#" * (size - len(script) - 1) + b"\n")
    assert program.stat().st_size == size and program.stat().st_ino == inode
    code, out, err = _run(warden, agent, f"{program} {marker}; echo status=$?")
    # Refused by the supervisor: the change moved the file's ctime (multigrain
    # timestamps), so the fast path read it again; the kernel's check would
    # have killed it otherwise (137).
    assert "status=126" in out, (out, err)
    assert not marker.exists()   # the forbidden interpreter never ran its first instruction

    replacement = Path(shutil.copy("/usr/bin/true", tmp_path / "tool.new"))
    os.replace(replacement, program)   # an ELF again, another inode: known once read
    code, out, err = _run(warden, agent, f"{program} && {program} && echo status=$?")
    assert "status=0" in out, (out, err)
    swapped = _script(tmp_path / "tool.sh", f"#!{evil}")
    os.replace(swapped, program)
    code, out, err = _run(warden, agent, f"{program} {marker}; echo status=$?")
    assert "status=126" in out or "status=137" in out, (out, err)
    assert not marker.exists()
    warden.settle()
    refused = [v for v in _records(warden, agent, "violation") if f"through {evil}" in v.get("attempted", "")
               or v.get("action_taken", "").startswith("killed in the kernel")]
    assert len(refused) >= 2, refused   # each attempt, refused or killed, is a violation
