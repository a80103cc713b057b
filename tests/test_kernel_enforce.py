"""Policies enforced on real agents in real cgroups: kill, freeze, kill-agent,
in-kernel kill, monitor mode, indirect exec routes, symlinks."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from agentwarden import bpfsys, control, headers

from conftest import TEST_CGROUP_PARENT, events_of, wait_for

pytestmark = pytest.mark.kernel

PY = sys.executable


def _policy(agent: str, mode: str, action: str, exec_allow, read_allow=("/**",),
            write_allow=("/**",), files_deny=(), exec_deny=()) -> str:
    def lst(items):
        return "[" + ", ".join(f'"{i}"' for i in items) + "]"
    return (f'[agent.{agent}]\nmode = "{mode}"\non-violation = "{action}"\n'
            f"[agent.{agent}.exec]\nallow = {lst(exec_allow)}\n"
            + (f"deny = {lst(exec_deny)}\n" if exec_deny else "")
            + f"[agent.{agent}.files]\nread-allow = {lst(read_allow)}\n"
            f"write-allow = {lst(write_allow)}\n"
            + (f"deny = {lst(files_deny)}\n" if files_deny else ""))


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _violations(warden, agent: str) -> list[dict]:
    return [r for r in warden.records() if r["kind"] == "violation" and r["agent"] == agent]


def _frozen(path) -> bool:
    return "frozen 1" in (path / "cgroup.events").read_text()


SHELLS = ["/usr/bin/sh", "/usr/bin/dash", "/bin/sh", "/bin/dash"]


def test_allowed_exec_runs_and_unlisted_exec_is_killed(warden, agent_cgroup):
    agent = _name("kill")
    cg = agent_cgroup(agent)
    warden.set_policy(agent, _policy(agent, "enforce", "kill", ["/usr/bin/true", "/usr/bin/echo"]))
    assert cg.run(["/usr/bin/echo", "allowed"]).stdout == b"allowed\n"
    started = time.monotonic()
    result = cg.run(["/usr/bin/sleep", "30"])
    assert result.returncode == -9 and time.monotonic() - started < 10
    warden.settle()
    [violation] = _violations(warden, agent)
    assert violation["attempted"] == "exec /usr/bin/sleep 30 (/usr/bin/sleep)"
    assert violation["decision"] == "violation" and violation["rule"] is None
    assert violation["action"] == "kill" and violation["action_taken"].startswith("killed process")
    assert violation["mode"] == "enforce" and violation["policy_hash"].startswith("sha256:")
    # Every decision carries its rule and the policy hash.
    [echo] = [r for r in events_of(warden.records(), cg.id, "exec") if r["argv"] == ["/usr/bin/echo", "allowed"]]
    assert echo["verdict"]["decision"] == "allow"
    assert echo["verdict"]["rule"].startswith('exec.allow "/usr/bin/echo" at ')
    assert echo["verdict"]["policy_hash"] == violation["policy_hash"]


def test_a_process_that_exited_before_the_kill_is_not_reported_killed(warden, agent_cgroup):
    """The daemon judges an exec after the program has exited (a zombie, not
    yet reaped by its parent): the record says so, not "killed"."""
    agent = _name("exited")
    cg = agent_cgroup(agent)
    warden.set_policy(agent, _policy(agent, "enforce", "kill", ["/usr/bin/true"]))
    daemon = warden.status()["daemon"]["pid"]
    procs = str(cg.path / "cgroup.procs")
    os.kill(daemon, signal.SIGSTOP)   # the record waits in the probe's queue
    try:
        proc = subprocess.Popen(["/usr/bin/id", "-u"], stdout=subprocess.DEVNULL,
                                preexec_fn=lambda: open(procs, "w").write("0"))
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)   # exited, not reaped
    finally:
        os.kill(daemon, signal.SIGCONT)
    try:
        [violation] = wait_for(lambda: _violations(warden, agent), what="the violation")
    finally:
        proc.wait()
    assert violation["attempted"] == "exec /usr/bin/id -u (/usr/bin/id)"
    assert violation["action_taken"] == f"process {proc.pid} had already exited (exit status 0)"
    assert proc.returncode == 0


def test_write_outside_write_allow_freezes_until_thaw(warden, agent_cgroup, tmp_path):
    agent = _name("freeze")
    cg = agent_cgroup(agent)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    warden.set_policy(agent, _policy(agent, "enforce", "freeze", ["/**"],
                                     write_allow=[f"{workspace}/**", "/dev/null"]))
    marker = workspace / "after-thaw"
    script = (f"open({str(workspace / 'ok')!r}, 'w').write('fine')\n"
              f"open({str(tmp_path / 'forbidden')!r}, 'w').write('no')\n"
              f"import time\ntime.sleep(3)\nopen({str(marker)!r}, 'w').write('ran')\n")
    procs = str(cg.path / "cgroup.procs")
    proc = subprocess.Popen([PY, "-S", "-c", script],
                            preexec_fn=lambda: open(procs, "w").write("0"))
    try:
        wait_for(lambda: _frozen(cg.path), what="the agent to be frozen")
        state = open(f"/proc/{proc.pid}/status").read()
        assert proc.poll() is None and not marker.exists()
        time.sleep(3.5)  # past the script's own sleep: still frozen, marker not written
        assert not marker.exists() and _frozen(cg.path), state
        warden.cli("thaw", "--agent", agent)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert marker.read_text() == "ran"
    warden.settle()
    [violation] = _violations(warden, agent)
    assert violation["attempted"] == f"write {tmp_path / 'forbidden'}"
    assert violation["action_taken"] == f"froze {cg.path}"
    admin = [r for r in warden.records() if r["kind"] == "admin" and r["agent"] == agent]
    assert admin and admin[0]["action"] == "thaw"


def test_kill_agent_leaves_the_cgroup_empty(warden, agent_cgroup):
    agent = _name("killall")
    cg = agent_cgroup(agent)
    warden.set_policy(agent, _policy(agent, "enforce", "kill-agent", SHELLS + ["/usr/bin/sleep"]))
    procs = str(cg.path / "cgroup.procs")
    shell = subprocess.Popen(["/bin/sh", "-c", "sleep 30 & sleep 30 & /usr/bin/id; wait"],
                             preexec_fn=lambda: open(procs, "w").write("0"),
                             stdout=subprocess.DEVNULL)
    assert shell.wait(timeout=20) == -9
    wait_for(lambda: (cg.path / "cgroup.procs").read_text() == "", what="an empty cgroup")
    warden.settle()
    [violation] = _violations(warden, agent)
    assert violation["attempted"].startswith("exec /usr/bin/id")
    assert violation["action_taken"] == f"killed every process in {cg.path}"


def test_in_kernel_deny_kills_before_the_open_returns(warden, agent_cgroup, tmp_path):
    agent = _name("kernel")
    cg = agent_cgroup(agent)
    secret = tmp_path / "secret"
    secret.write_text("s3cret")
    secrets_dir = tmp_path / "vault"
    secrets_dir.mkdir()
    (secrets_dir / "key").write_text("k")
    warden.set_policy(agent, _policy(agent, "enforce", "kill", ["/**"], exec_deny=["/usr/bin/id"],
                                     files_deny=[str(secret), f"{secrets_dir}/**"]))
    marker = tmp_path / "next-line-ran"
    for target in (secret, secrets_dir / "key"):
        result = cg.run([PY, "-S", "-c", f"open({str(target)!r}).read()\nopen({str(marker)!r}, 'w')"])
        assert result.returncode == -9
        assert not marker.exists()  # the program's next line never ran
    result = cg.run(["/usr/bin/id"])
    assert result.returncode == -9 and result.stdout == b""  # killed before its first instruction
    warden.settle()
    records = events_of(warden.records(), cg.id)
    killed = [r for r in records if r.get("killed_in_kernel")]
    assert {r.get("resolved_path") or r.get("resolved_exec_path") for r in killed} == \
        {str(secret), str(secrets_dir / "key"), "/usr/bin/id"}
    assert all(r["kernel_rule"].startswith(("files.deny", "exec.deny")) for r in killed)
    violations = _violations(warden, agent)
    assert len(violations) == 3, [(v["attempted"], v["action_taken"]) for v in violations]
    assert all(v["action_taken"].startswith("killed in the kernel by ") for v in violations)


def test_monitor_mode_records_the_same_verdicts_and_touches_nothing(warden, agent_cgroup):
    agent = _name("monitor")
    cg = agent_cgroup(agent)
    warden.set_policy(agent, _policy(agent, "monitor", "kill", ["/usr/bin/true"],
                                     exec_deny=["/usr/bin/id"]))
    assert cg.run(["/usr/bin/sleep", "0.3"]).returncode == 0
    assert cg.run(["/usr/bin/id", "-u"]).stdout == b"0\n"
    warden.settle()
    violations = {v["attempted"].split()[1]: v for v in _violations(warden, agent)}
    assert violations["/usr/bin/sleep"]["decision"] == "violation"
    assert violations["/usr/bin/id"]["decision"] == "deny"
    for v in violations.values():
        assert v["mode"] == "monitor" and v["action"] == "kill"
        assert v["action_taken"] == "none (monitor mode)"


def test_loader_and_memfd_routes_are_violations(warden, agent_cgroup):
    agent = _name("routes")
    cg = agent_cgroup(agent)
    warden.set_policy(agent, _policy(agent, "enforce", "alert", ["/usr/**", "/bin/**", "/lib*/**"]))
    loader = "/lib64/ld-linux-x86-64.so.2"
    assert cg.run([loader, "/usr/bin/true"]).returncode == 0
    memfd = ("import os\nfd = os.memfd_create('payload', 0)\n"
             "os.write(fd, open('/usr/bin/true', 'rb').read())\n"
             "os.execve(fd, ['payload'], {})\n")
    assert cg.run([PY, "-S", "-c", memfd]).returncode == 0
    warden.settle()
    reasons = {v["attempted"]: v["reason"] for v in _violations(warden, agent)}
    [via_loader] = [r for a, r in reasons.items() if a.startswith(f"exec {loader}")]
    assert "dynamic loader" in via_loader
    [via_fd] = [r for a, r in reasons.items() if a.startswith("exec payload")]
    assert "file descriptor" in via_fd


def test_symlink_in_allowed_directory_to_denied_file_is_not_allowed(warden, agent_cgroup, tmp_path):
    agent = _name("link")
    cg = agent_cgroup(agent)
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("s")
    (allowed / "innocent").symlink_to(secret)
    warden.set_policy(agent, _policy(agent, "enforce", "alert", ["/**"],
                                     read_allow=["/usr/**", "/etc/**", "/lib*/**", f"{allowed}/**"],
                                     files_deny=[str(secret)]))
    assert cg.run(["/usr/bin/cat", str(allowed / "innocent")]).stdout == b"s"
    warden.settle()
    [violation] = [v for v in _violations(warden, agent) if "innocent" in v["attempted"]]
    assert violation["decision"] == "deny"
    assert str(secret) in violation["rule"] and "symlink" in violation["reason"]


def test_reload_refuses_a_broken_policy_and_keeps_the_old_one(warden, agent_cgroup):
    agent = _name("reload")
    cg = agent_cgroup(agent)
    good = warden.set_policy(agent, _policy(agent, "enforce", "kill", ["/usr/bin/true"]))
    broken = warden.settings.policy_dir / "zz-broken.toml"
    broken.write_text('[agent.other]\nmode = "enforce"\non-violation = "explode"\n')
    try:
        result = warden.cli("policy", "reload", check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert f"{broken}:3:" in result.stderr and "explode" in result.stderr
        assert "the old one stays in force" in result.stderr
        assert warden.status()["policy"]["policy_hash"] == good
        # Still enforced: the old policy kills what it does not allow.
        assert cg.run(["/usr/bin/sleep", "30"]).returncode == -9
    finally:
        broken.unlink()
    refused = [r for r in warden.records() if r["kind"] == "policy" and r["status"] == "refused"]
    assert refused and "explode" in refused[-1]["detail"]


def test_freeze_all_works_without_the_daemon(kernel, agent_cgroup, tmp_path):
    cg = agent_cgroup(_name("switch"))
    procs = str(cg.path / "cgroup.procs")
    sleeper = subprocess.Popen(["/usr/bin/sleep", "30"], preexec_fn=lambda: open(procs, "w").write("0"))
    env = {**os.environ, "AGENTWARDEN_RUN_DIR": str(tmp_path / "no-daemon"),
           "AGENTWARDEN_CGROUP_SCOPE": TEST_CGROUP_PARENT}  # not other instances' agents
    try:
        result = subprocess.run([PY, "-m", "agentwarden", "freeze", "--all"], env=env,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert f"froze {cg.path}" in result.stdout
        assert "not archived" in result.stderr  # said, not hidden
        wait_for(lambda: _frozen(cg.path), what="the kill switch to freeze the agent")
        subprocess.run([PY, "-m", "agentwarden", "thaw", "--all"], env=env, check=True,
                       capture_output=True, timeout=30)
        wait_for(lambda: not _frozen(cg.path), what="thaw")
    finally:
        sleeper.kill()
        sleeper.wait()


def _probe_maps(warden, *names: str) -> dict[str, int]:
    """fds of this process for the probe's maps of these names (pidfd_getfd)."""

    class Info(ctypes.Structure):   # the head of struct bpf_map_info
        _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                    ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                    ("map_flags", ctypes.c_uint32), ("name", ctypes.c_char * 16)]

    class InfoAttr(ctypes.Structure):
        _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]

    [probe] = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _child_probe(p, warden.proc.pid)]
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(probe)
    found = {}
    try:
        for entry in Path(f"/proc/{probe}/fdinfo").iterdir():
            try:
                if "map_type" not in entry.read_text():
                    continue
            except OSError:
                continue
            fd = libc.syscall(438, pidfd, int(entry.name), 0)   # pidfd_getfd
            assert fd >= 0, os.strerror(ctypes.get_errno())
            info = Info()
            bpfsys._bpf(15, InfoAttr(fd, ctypes.sizeof(info), ctypes.addressof(info)))   # BPF_OBJ_GET_INFO_BY_FD
            if info.name.decode() in names and info.name.decode() not in found:
                found[info.name.decode()] = fd
            else:
                os.close(fd)
    finally:
        os.close(pidfd)
    return found


def _child_probe(proc: Path, parent: int) -> bool:
    try:
        stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        return int(stat[1]) == parent and (proc / "cmdline").read_bytes().split(b"\0")[-2] == b"probe"
    except (OSError, IndexError, ValueError):
        return False


def test_only_agents_whose_violations_act_have_their_execs_wake_the_probe(warden, agent_cgroup):
    """The daemon names the agents whose exec violations it acts on (enforce,
    on-violation other than alert); the probe marks them in agent_policy, and
    says it knows (key 0): the kernel wakes it at once for their execs only."""
    c = headers.header_constants()
    agents = {action: _name(f"wake-{action}") for action in ("kill", "freeze", "alert", "monitor")}
    cgs = {action: agent_cgroup(agent) for action, agent in agents.items()}
    toml = "".join(_policy(agent, "monitor" if action == "monitor" else "enforce",
                           "kill" if action == "monitor" else action, ["/usr/**"])
                   for action, agent in agents.items())
    warden.set_policy("wake", toml)
    maps = _probe_maps(warden, "agent_policy", "agent_cgroups")
    try:
        def flags(action: str) -> int:
            number = bpfsys.lookup(maps["agent_cgroups"], cgs[action].id.to_bytes(8, "little"), 4)
            assert number is not None, f"{action}: its cgroup is not in agent_cgroups"
            agent = int.from_bytes(number, "little") & ~c["AW_AGENT_SESSION_BIT"]
            value = bpfsys.lookup(maps["agent_policy"], agent.to_bytes(4, "little"), 4)
            return int.from_bytes(value, "little") if value else 0
        known = bpfsys.lookup(maps["agent_policy"], c["AW_POLICY_KNOWN_KEY"].to_bytes(4, "little"), 4)
        assert known and int.from_bytes(known, "little") & c["AW_POLICY_KNOWN"]
        assert flags("kill") & c["AW_POLICY_EXEC_PROMPT"] and flags("freeze") & c["AW_POLICY_EXEC_PROMPT"]
        assert not flags("alert") & c["AW_POLICY_EXEC_PROMPT"]
        assert not flags("monitor") & c["AW_POLICY_EXEC_PROMPT"]
        # The lazy agent's exec is recorded all the same.
        assert cgs["alert"].run(["/usr/bin/true"]).returncode == 0
    finally:
        for fd in maps.values():
            os.close(fd)
        (warden.settings.policy_dir / "wake.toml").unlink()
        control.request(warden.settings, "reload", timeout=10)
    warden.settle()
    assert events_of(warden.records(), cgs["alert"].id, "exec")

