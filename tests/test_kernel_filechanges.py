"""Every file change is seen, and no side door is silent: real tools and real
attacker programs in real tagged agent cgroups.

Route 1: rm, mv, chmod, ln, mkdir of an agent are recorded as `change`
records, resolved and judged by the write rules; a change of a path an
in-kernel deny rule names kills the agent from the tracepoint.
Route 2: io_uring (a C program that opens and reads a denied file with
IORING_OP_OPENAT/READ, no open syscall) and namespace changes are `sidedoor`
records and violations; under kill the kernel kills the attacker at
io_uring_setup, before it reads anything."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import events_of
from test_kernel_enforce import _policy, _violations

pytestmark = pytest.mark.kernel

PY = sys.executable
TOOLS = ["/usr/bin/*", "/bin/*", "/usr/sbin/*"]
ATTACKER = Path(__file__).parent / "attackers" / "io_uring_read.c"


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _changes(warden, cg) -> list[dict]:
    return events_of(warden.records(), cg.id, "change")


def test_rm_mv_chmod_ln_mkdir_are_recorded_and_judged_by_the_write_rules(warden, agent_cgroup, tmp_path):
    agent = _name("changes")
    cg = agent_cgroup(agent)
    work, outside = tmp_path / "work", tmp_path / "outside"
    work.mkdir()
    outside.mkdir()
    (outside / "victim").write_text("v")
    (outside / "keep").write_text("k")
    warden.set_policy(agent, _policy(agent, "enforce", "alert", TOOLS, read_allow=["/**"],
                                     write_allow=[f"{work}/**", "/dev/null"]))
    script = ("set -e; mkdir d; touch f; chmod 600 f; ln f hard; ln -s f soft; mv f d/f2; rm hard soft; "
              "rm -r d; rm ../outside/victim; mv ../outside/keep stolen")
    result = cg.run(["/bin/sh", "-c", script], cwd=work)
    assert result.returncode == 0, result.stderr
    warden.settle()
    changes = _changes(warden, cg)
    seen = {(c["syscall"], c["resolved_path"], c["resolved_path2"], c["error"]) for c in changes}
    w, o = str(work), str(outside)
    for syscall, path, path2 in [("mkdir", f"{w}/d", None), ("chmod", f"{w}/f", None),
                                 ("link", f"{w}/f", f"{w}/hard"), ("symlink", f"{w}/f", f"{w}/soft"),
                                 ("rename", f"{w}/f", f"{w}/d/f2"), ("unlink", f"{w}/hard", None),
                                 ("unlink", f"{w}/soft", None), ("unlink", f"{w}/d/f2", None),
                                 ("rmdir", f"{w}/d", None), ("unlink", f"{o}/victim", None),
                                 ("rename", f"{o}/keep", f"{w}/stolen")]:
        # the tools may use the *at forms (fchmodat, linkat, renameat2, unlinkat for rmdir, ...)
        forms = {syscall, f"{syscall}at", f"{syscall}at2", f"f{syscall}at", f"f{syscall}at2",
                 *(["unlinkat"] if syscall == "rmdir" else [])}
        assert any(s in forms for s, p, p2, err in seen if (p, p2, err) == (path, path2, None)), \
            (syscall, path, sorted((s, p, p2) for s, p, p2, _ in seen))
    [chmod] = [c for c in changes if c["syscall"].startswith(("chmod", "fchmodat"))]
    assert chmod["mode"] == 0o600 and chmod["verdict"]["decision"] == "allow"
    assert chmod["verdict"]["rule"].startswith(f'files.write-allow "{w}/**"')
    # The two changes outside the work directory, and nothing else, are violations.
    attempted = sorted(v["attempted"] for v in _violations(warden, agent))
    assert len(attempted) == 2, attempted
    assert attempted[0].startswith("renameat2 ") and attempted[0].endswith(f" {o}/keep -> {w}/stolen")
    assert attempted[1] == f"unlinkat {o}/victim"
    assert all(v["action_taken"] == "none (alert)" for v in _violations(warden, agent))
    # The records say what happened: alert only records, so the victim is gone.
    assert not (outside / "victim").exists() and (work / "stolen").exists()
    # log search --path finds a change by either of its paths.
    found = warden.cli("log", "search", "--kind", "change", "--path", f"{w}/stolen").stdout
    assert f"{o}/keep -> {w}/stolen" in found


def test_a_denied_path_kills_the_changing_agent_in_the_kernel(warden, agent_cgroup, tmp_path):
    """files.deny rules the kernel can decide alone apply to changes too, to
    both names of a rename: the agent dies before the call returns to it."""
    agent = _name("kchange")
    cg = agent_cgroup(agent)
    vault = tmp_path / "vault"
    vault.mkdir()
    (vault / "key").write_text("k")
    (tmp_path / "free").write_text("f")
    marker = tmp_path / "next-line-ran"
    warden.set_policy(agent, _policy(agent, "enforce", "kill", ["/**"], files_deny=[f"{vault}/**"]))
    for call in (f"os.chmod({str(vault / 'key')!r}, 0o777)",
                 f"os.rename({str(tmp_path / 'free')!r}, {str(vault / 'planted')!r})"):
        result = cg.run([PY, "-S", "-c", f"import os\n{call}\nopen({str(marker)!r}, 'w')"])
        assert result.returncode == -9, result.stderr
        assert not marker.exists()   # the program's next line never ran
    # As with opens, the kill lands as the call returns: the change itself was made.
    assert (vault / "key").stat().st_mode & 0o777 == 0o777 and (vault / "planted").exists()
    warden.settle()
    killed = [c for c in _changes(warden, cg) if c["killed_in_kernel"]]
    assert sorted(c["syscall"] for c in killed) == ["chmod", "rename"]
    assert all(c["kernel_rule"].startswith(f'files.deny "{vault}/**" at ') for c in killed), killed
    violations = _violations(warden, agent)
    assert sorted(v["attempted"].split()[0] for v in violations) == ["chmod", "rename"]
    assert all(v["action_taken"].startswith("killed in the kernel by files.deny") for v in violations)


@pytest.fixture(scope="module")
def io_uring_attacker(tmp_path_factory) -> Path:
    binary = tmp_path_factory.mktemp("attacker") / "io_uring_read"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(ATTACKER)], check=True)
    return binary


def _secret(tmp_path) -> Path:
    secret = tmp_path / "secret"
    secret.write_text("s3cret-" + uuid.uuid4().hex)
    return secret


def test_io_uring_read_of_a_denied_file_is_killed_at_setup(warden, agent_cgroup, tmp_path, io_uring_attacker):
    """Before: the attacker printed the secret and no record named io_uring or
    the file. Now io_uring_setup is a side door: a violation, and under kill
    the kernel kills the attacker before it submits anything."""
    agent = _name("uring")
    cg = agent_cgroup(agent)
    secret = _secret(tmp_path)
    warden.set_policy(agent, _policy(agent, "enforce", "kill", [str(io_uring_attacker)],
                                     files_deny=[str(secret)]))
    result = cg.run([str(io_uring_attacker), str(secret)])
    assert secret.read_text().encode() not in result.stdout   # the read never happened
    assert result.returncode == -9, (result.returncode, result.stdout, result.stderr)
    warden.settle()
    [door] = events_of(warden.records(), cg.id, "sidedoor")
    assert (door["syscall"], door["door"], door["killed_in_kernel"]) == ("io_uring_setup", "io_uring", True)
    assert door["verdict"]["decision"] == "violation"
    [violation] = _violations(warden, agent)
    assert violation["attempted"] == "io_uring_setup (side door io_uring)"
    assert violation["action_taken"].startswith("killed in the kernel by syscalls.allow")
    assert f"[agent.{agent}.syscalls] allow does not name" in violation["reason"]


def test_io_uring_allowed_by_the_policy_runs_and_alert_only_records(warden, agent_cgroup, tmp_path,
                                                                   io_uring_attacker):
    agent = _name("uring-ok")
    allowed, alerted = agent_cgroup(agent), agent_cgroup(_name("uring-alert"))
    secret = _secret(tmp_path)
    warden.set_policy(agent, _policy(agent, "enforce", "kill", [str(io_uring_attacker)])
                      + f'[agent.{agent}.syscalls]\nallow = ["io_uring"]\n')
    warden.set_policy(alerted.agent, _policy(alerted.agent, "enforce", "alert", [str(io_uring_attacker)]))
    for cg in (allowed, alerted):
        result = cg.run([str(io_uring_attacker), str(secret)])
        assert result.returncode == 0 and secret.read_text().encode() in result.stdout
    warden.settle()
    [door] = events_of(warden.records(), allowed.id, "sidedoor")
    assert door["verdict"]["decision"] == "allow" and not door["killed_in_kernel"]
    assert door["verdict"]["rule"].startswith('syscalls.allow "io_uring" at ')
    assert _violations(warden, agent) == []
    [violation] = _violations(warden, alerted.agent)
    assert violation["attempted"] == "io_uring_setup (side door io_uring)"
    assert violation["action_taken"] == "none (alert)"


def test_namespace_and_root_changes_are_side_doors(warden, agent_cgroup, tmp_path):
    """unshare (new user and mount namespaces) and chroot: recorded and, not
    allowed, violations; under kill the kernel kills them at entry."""
    agent = _name("ns")
    cg = agent_cgroup(agent)
    warden.set_policy(agent, _policy(agent, "enforce", "alert", TOOLS))
    cg.run(["/usr/bin/unshare", "--user", "--mount", "/bin/true"])
    cg.run(["/usr/sbin/chroot", str(tmp_path), "/true"])
    warden.settle()
    doors = {(d["syscall"], d["door"]) for d in events_of(warden.records(), cg.id, "sidedoor")}
    assert {("unshare", "unshare"), ("chroot", "chroot")} <= doors, doors
    [chroot] = [d for d in events_of(warden.records(), cg.id, "sidedoor") if d["door"] == "chroot"]
    assert chroot["resolved_path"] == str(tmp_path)
    attempted = {v["attempted"] for v in _violations(warden, agent)}
    assert {"unshare (side door unshare)", f"chroot {tmp_path} (side door chroot)"} <= attempted
    killer = agent_cgroup(_name("ns-kill"))
    warden.set_policy(killer.agent, _policy(killer.agent, "enforce", "kill", TOOLS))
    assert killer.run(["/usr/bin/unshare", "--user", "--mount", "/usr/bin/id"]).returncode == -9
