"""Enforcement figures: decisions per second with a 1,000-rule policy, and the
time from a violating syscall to the process being gone, for the in-kernel
path (deny rule in the BPF trie) and the user-space path (daemon kills)."""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agentwarden import control, policy
from agentwarden.daemon.archive import read_records

BENCH_POLICY_FILE = "bench.toml"


def _toml_list(items) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


def thousand_rule_policy(agent: str) -> str:
    """1,000 rules spread like a real whitelist: tool directories, data trees,
    workspaces, and a few denies."""
    exec_allow = [f"/opt/tool{i}/bin/*" for i in range(400)] + ["/usr/bin/git", "/usr/bin/python3*"]
    exec_hold = [f"/usr/bin/git * push{i} *" for i in range(48)]
    exec_deny = [f"/opt/bad{i}" for i in range(50)]
    read_allow = [f"/data/project{i}/**" for i in range(250)]
    write_allow = [f"/work/ws{i}/**" for i in range(200)]
    files_deny = [f"/data/project{i}/secrets/**" for i in range(50)]
    return (f'[agent.{agent}]\nmode = "enforce"\non-violation = "alert"\n'
            f"[agent.{agent}.exec]\nallow = {_toml_list(exec_allow)}\nhold = {_toml_list(exec_hold)}\n"
            f"deny = {_toml_list(exec_deny)}\n"
            f"[agent.{agent}.files]\nread-allow = {_toml_list(read_allow)}\n"
            f"write-allow = {_toml_list(write_allow)}\ndeny = {_toml_list(files_deny)}\n")


def _sample_events(agent: str, count: int) -> list[dict]:
    events = []
    for i in range(count):
        if i % 2:
            path = [f"/data/project{i % 300}/src/file{i}.py", f"/work/ws{i % 220}/out{i}",
                    f"/data/project{i % 50}/secrets/key", "/etc/passwd"][i % 4]
            events.append({"kind": "open", "agent": agent, "resolved_path": path,
                           "flags": os.O_WRONLY if "/work/" in path else os.O_RDONLY, "ret": 3})
        else:
            exe = [f"/opt/tool{i % 450}/bin/run", "/usr/bin/git", "/opt/bad7", "/usr/bin/curl"][i % 4]
            events.append({"kind": "exec", "agent": agent, "resolved_exec_path": exe, "exec_path": exe,
                           "argv": [exe, "push3", "origin"], "argv_truncated": False, "ret": 0})
    return events


def decision_throughput(events: int = 200_000) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / BENCH_POLICY_FILE
        path.write_text(thousand_rule_policy("bench"))
        loaded = policy.load_policy([path])
    rules = sum(len(r.rules) for r in loaded.agents["bench"].rules.values())
    sample = _sample_events("bench", events)
    started = time.perf_counter()
    decisions = [policy.decide(event, loaded).decision for event in sample]
    elapsed = time.perf_counter() - started
    return {"rules": rules, "decisions": len(decisions), "per_second": len(decisions) / elapsed,
            "mix": {d: decisions.count(d) for d in sorted(set(decisions))}}


def _run_joined(procs: Path, argv: list[str]) -> tuple[int, int, int]:
    """Start argv inside the cgroup; (pid, wait status, wall ns when it was gone)."""
    child = subprocess.Popen(argv, preexec_fn=lambda: procs.write_text("0"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status = os.waitpid(child.pid, 0)
    gone = time.time_ns()
    child.returncode = os.waitstatus_to_exitcode(status)
    return child.pid, child.returncode, gone


def _percentiles(values_ns: list[int]) -> dict:
    values = sorted(v / 1000 for v in values_ns)
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
    return {"n": len(values), "median_us": statistics.median(values), "p99_us": p99,
            "max_us": values[-1]}


def kill_latency(settings, env: dict, cgroup_path: Path, agent: str, policy_dir: Path,
                 trials: int, log=print) -> dict:
    """Needs a running agentwarden whose policy dir is policy_dir and whose
    probe watches cgroup_path as `agent`."""
    secret = policy_dir / "secret-file"
    secret.write_text("x")
    (policy_dir / BENCH_POLICY_FILE).write_text(
        f'[agent.{agent}]\nmode = "enforce"\non-violation = "kill"\n'
        # The venv's python is a symlink: the real binary must be allowed too.
        f'[agent.{agent}.exec]\nallow = ["{sys.executable}", "{os.path.realpath(sys.executable)}"]\n'
        f'deny = ["/usr/bin/id"]\n'
        f'[agent.{agent}.files]\nread-allow = ["/**"]\nwrite-allow = ["/**"]\ndeny = ["{secret}"]\n')
    wanted = control.request(settings, "reload", timeout=10)["policy_hash"]
    deadline = time.monotonic() + 10
    while control.request(settings, "status")["status"]["probe"]["health"].get("kernel_rules_policy") != wanted:
        if time.monotonic() > deadline:
            raise RuntimeError("the probe did not load the in-kernel rules")
        time.sleep(0.05)

    procs = cgroup_path / "cgroup.procs"
    open_secret = [sys.executable, "-S", "-c", f"open({str(secret)!r})"]
    paths = {"in-kernel exec deny (sched_process_exec)": ["/usr/bin/id"],
             "in-kernel open deny (sys_enter_openat)": open_secret,
             "user-space kill (daemon, pidfd)": ["/usr/bin/sleep", "10"]}
    gone: dict[str, dict[int, int]] = {name: {} for name in paths}
    for i in range(trials):  # interleaved, so drift hits every path alike
        for name, argv in paths.items():
            pid, code, at = _run_joined(procs, argv)
            if code == -9:
                gone[name][pid] = at
    time.sleep(2.5)  # two health intervals: the archive has caught up
    starts: dict[int, int] = {}
    for record in read_records(settings.archive_dir):
        if record.get("kind") == "exec" and record["argv"][:1] in (["/usr/bin/id"], ["/usr/bin/sleep"]):
            starts[record["pid"]] = record["time"]
        elif record.get("kind") == "open" and record.get("resolved_path") == str(secret):
            starts[record["pid"]] = record["time"]
    results = {}
    for name, ended in gone.items():
        latencies = [at - starts[pid] for pid, at in ended.items() if pid in starts]
        results[name] = {**_percentiles(latencies), "killed": len(ended), "trials": trials}
        log(f"  {name}: median {results[name]['median_us']:.0f} us, p99 {results[name]['p99_us']:.0f} us")
    (policy_dir / BENCH_POLICY_FILE).unlink()
    return results
