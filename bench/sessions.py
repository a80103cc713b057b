"""What a session costs: per allowed exec and per allowed write-open, under
`agentwarden run` (seccomp notification round trip to the daemon, exec
verification in BPF) against the same workload without agentwarden, in one
run, interleaved. A third side runs the workload in the tagged agent cgroup
without `run` (watched, not held), which splits the added cost into what
monitoring costs and what the seccomp round trip adds on top. Execs come two
ways: the same command line each time (after the first, the supervisor's
compiled fast path answers it) and a new command line each time (Python
decides every one). A fourth operation, an execve of an allowed path that
does not exist, times the syscall alone: what the notification round trip
adds, without fork, exec and exit around it.

These VMs drift by a hundred microseconds per fork+exec from one minute to
the next, so sides are interleaved in many short rounds, every workload is
pinned to the same CPU, and "added" is the median of per-round differences
(each round's session median minus that round's bare median)."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from agentwarden import control

HERE = Path(__file__).resolve().parent
POLICY_FILE = "bench-sessions.toml"


def build(workdir: Path) -> Path:
    binary = workdir / "session_workload"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(HERE / "session_workload.c")], check=True)
    return binary


def _latencies(argv: list[str], env: dict) -> list[int]:
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])}... failed: {result.stderr.strip()[-500:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["ns"]


def _summary(values: list[int]) -> dict:
    ordered = sorted(values)
    return {"n": len(ordered), "median_us": statistics.median(ordered) / 1000,
            "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1000}


def _paired(side: list[list[int]], bare: list[list[int]]) -> float:
    """Median over rounds of (this side's round median - bare's), in us."""
    return statistics.median(statistics.median(s) - statistics.median(b)
                             for s, b in zip(side, bare)) / 1000


SIDES = ("bare", "watched", "session")
OPERATIONS = ("exec", "execnew", "execfail", "wopen")


def session_costs(settings, env: dict, agent: str, agent_cgroup: Path, policy_dir: Path, ops: int,
                  rounds: int, log=print) -> dict:
    """Needs a running agentwarden (policy dir policy_dir) whose probe watches
    agent_cgroup, tagged `agent`."""
    with tempfile.TemporaryDirectory(prefix="agentwarden-bench-") as tmp:
        work = Path(tmp)
        binary = build(work)
        writes = work / "writes"
        writes.mkdir()
        (policy_dir / POLICY_FILE).write_text(
            f'[agent.{agent}]\nmode = "enforce"\non-violation = "kill"\n'
            f'[agent.{agent}.exec]\nallow = ["{binary}", "/usr/bin/true", "{work}/missing/program"]\n'
            f'[agent.{agent}.files]\nread-allow = ["/**"]\nwrite-allow = ["{writes}/**"]\n')
        control.request(settings, "reload", timeout=10)
        run = [sys.executable, "-m", "agentwarden", "run", "--agent", agent, "--"]
        # The shell joins the agent cgroup, then becomes the workload.
        watched = ["sh", "-c", f'echo $$ > {agent_cgroup}/cgroup.procs && exec "$@"', "watched"]
        # Every side's workload on the same CPU: migrations would swamp the difference.
        pin = ["taskset", "-c", str(os.cpu_count() - 1)]
        prefix = {"bare": pin, "watched": pin + watched, "session": pin + run}
        targets = {"exec": "/usr/bin/true", "execnew": "/usr/bin/true", "wopen": str(writes),
                   "execfail": str(work / "missing" / "program")}
        samples = {(what, side): [] for what in OPERATIONS for side in SIDES}  # one list per round
        try:
            for _ in range(rounds):  # interleaved: drift hits every side alike
                for what in OPERATIONS:
                    cmd = [str(binary), what, str(ops), targets[what]]
                    for side in SIDES:
                        samples[(what, side)].append(_latencies(prefix[side] + cmd, env))
        finally:
            (policy_dir / POLICY_FILE).unlink()
    results = {}
    for what in OPERATIONS:
        rounds_of = {side: samples[(what, side)] for side in SIDES}
        bare, watched, session = (_summary([v for r in rounds_of[side] for v in r]) for side in SIDES)
        results[what] = {"bare": bare, "watched": watched, "session": session,
                         "added_median_us": _paired(rounds_of["session"], rounds_of["bare"]),
                         "added_p99_us": session["p99_us"] - bare["p99_us"],
                         "watched_added_median_us": _paired(rounds_of["watched"], rounds_of["bare"])}
        log(f"  {what}: bare median {bare['median_us']:.1f} us, watched {watched['median_us']:.1f} us, "
            f"under run {session['median_us']:.1f} us (+{results[what]['added_median_us']:.1f} us median, "
            f"+{results[what]['added_p99_us']:.1f} us p99; watching alone "
            f"+{results[what]['watched_added_median_us']:.1f} us)")
    return results
