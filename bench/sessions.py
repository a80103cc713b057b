"""What a session costs: per allowed exec and per allowed write-open, under
`agentwarden run` (seccomp notification round trip to the daemon, exec
verification in BPF) against the same workload without agentwarden, in one
run. Two more sides split the added cost. Watched runs the workload in the
tagged agent cgroup without `run` (recorded, not held): what monitoring costs.
The floor runs the watched workload under notify_floor.c, a minimal user-notify
supervisor that reads each call's arguments and continues it, nothing more:
what any supervisor that reads what it decides on costs on this machine.
Beyond the floor, the cost is agentwarden's own.

Execs come three ways: the same command line each time and a new command
line each time (the supervisor's compiled fast path allows both by the
agent's rules), and a new command line through a path with a "." component,
which the fast path leaves to the supervisor's Python. Another operation, an
execve of an allowed path that does not exist, times the syscall alone: what
the notification round trip adds, without fork, exec and exit around it. The
last two are write-opens, by absolute path and relative to the cwd.

These VMs drift by a hundred microseconds per fork+exec from one second to
the next, so each side is a long-lived worker, all pinned to the same CPU, and
the bench alternates them one operation at a time, in a shuffled order each
round, and every round does every operation. "Added" is the session's median minus bare's; the median of the
per-round differences is reported next to it."""
from __future__ import annotations

import contextlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from agentwarden import control

HERE = Path(__file__).resolve().parent
POLICY_FILE = "bench-sessions.toml"


def build(workdir: Path, name: str) -> Path:
    binary = workdir / name
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(HERE / f"{name}.c")], check=True)
    return binary


class Worker:
    """One side's session_workload: an operation in, its latency (ns) out."""

    def __init__(self, side: str, argv: list[str], env: dict, errors: Path, cwd: Path | None = None):
        self.side = side
        self.errors = errors
        with errors.open("w") as stderr:   # the worker keeps its own copy
            self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=stderr, text=True, bufsize=1, cwd=cwd)

    def time(self, operation: str) -> int:
        try:
            self.proc.stdin.write(operation + "\n")
            self.proc.stdin.flush()
            answer = self.proc.stdout.readline()
        except BrokenPipeError:   # it stopped before reading the operation: say why below
            answer = ""
        if not answer:
            self.proc.wait(timeout=10)
            raise RuntimeError(f"the {self.side} workload stopped (exit {self.proc.returncode}): "
                               f"{self.errors.read_text().strip()[-500:]}")
        return int(answer)

    def close(self) -> None:
        if self.proc.stdin:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _summary(values: list[int]) -> dict:
    ordered = sorted(values)
    return {"n": len(ordered), "median_us": statistics.median(ordered) / 1000,
            "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1000}


def _paired(side: list[int], bare: list[int]) -> float:
    """Median over rounds of (this side's latency - bare's in the same round), in us."""
    return statistics.median(s - b for s, b in zip(side, bare)) / 1000


SIDES = ("bare", "watched", "floor", "session")
OPERATIONS = ("exec", "execnew", "execpy", "execfail", "wopen", "wopenrel")
WARM_UP = 20   # rounds of each operation not counted: caches, the fast path's first sight


def session_costs(settings, env: dict, agent: str, agent_cgroup: Path, policy_dir: Path, rounds: int,
                  log=print, continued: tuple | None = None, baseline: tuple | None = None) -> dict:
    """Needs a running agentwarden (policy dir policy_dir) whose probe watches
    agent_cgroup, tagged `agent`. rounds: operations of each kind per side.
    continued: (settings, env) of a second agentwarden watching another
    cgroup of `agent`, with perform_file_changes = false: the fifth side.
    baseline: (settings, env, directory, name) of a third, another tree's
    (bench/run.py baseline_tree), whose `run` starts in that directory (where
    `-m agentwarden` finds the tree's package: monitors.importable): one more side."""
    sides = SIDES + (("continued",) if continued else ()) + (("baseline",) if baseline else ())
    with tempfile.TemporaryDirectory(prefix="agentwarden-bench-") as tmp:
        work = Path(tmp)
        binary = build(work, "session_workload")
        floor = build(work, "notify_floor")
        writes = work / "writes"
        writes.mkdir()
        missing = work / "missing" / "program"
        policy = (f'[agent.{agent}]\nmode = "enforce"\non-violation = "kill"\n'
                  f'[agent.{agent}.exec]\nallow = ["{binary}", "/usr/bin/true", "{missing}"]\n'
                  f'[agent.{agent}.files]\nread-allow = ["/**"]\nwrite-allow = ["{writes}/**"]\n')
        wardens = [(settings, policy_dir)] + ([(continued[0], continued[0].policy_dir)] if continued else []) \
            + ([(baseline[0], baseline[0].policy_dir)] if baseline else [])
        for each_settings, each_dir in wardens:
            (each_dir / POLICY_FILE).write_text(policy)
            control.request(each_settings, "reload", timeout=10)
        run = [sys.executable, "-m", "agentwarden", "run", "--agent", agent, "--"]
        # The shell joins the agent cgroup, then becomes the workload.
        watched = ["sh", "-c", f'echo $$ > {agent_cgroup}/cgroup.procs && exec "$@"', "watched"]
        # Every side's workload on the same CPU: migrations would swamp the difference.
        pin = ["taskset", "-c", str(os.cpu_count() - 1)]
        # The supervisors are not pinned: neither is agentwarden's.
        prefix = {"bare": pin, "watched": pin + watched, "floor": [str(floor)] + pin + watched,
                  "session": pin + run, "continued": pin + run, "baseline": pin + run}
        side_env = {side: env for side in sides}
        if continued:
            side_env["continued"] = continued[1]
        if baseline:
            side_env["baseline"] = baseline[1]
        command = [str(binary), "/usr/bin/true", str(missing), str(writes)]
        samples = {(what, side): [] for what in OPERATIONS for side in sides}
        order = random.Random(1)   # the same shuffles every run
        workers = []
        try:
            workers = [Worker(side, prefix[side] + command, side_env[side], work / f"{side}.err",
                              cwd=baseline[2] if side == "baseline" else None)
                       for side in sides]
            # Every operation in every round: the machine's drift over the
            # minutes this takes falls on all operations alike.
            for round_number in range(WARM_UP + rounds):
                for what in OPERATIONS:
                    for worker in order.sample(workers, len(workers)):
                        took = worker.time(what)
                        if round_number >= WARM_UP:
                            samples[(what, worker.side)].append(took)
        finally:
            for worker in workers:
                worker.close()
            for _, each_dir in wardens:
                (each_dir / POLICY_FILE).unlink()
    results = {}
    for what in OPERATIONS:
        bare, watched, floor, session = (_summary(samples[(what, side)]) for side in SIDES)
        results[what] = {"bare": bare, "watched": watched, "floor": floor, "session": session,
                         "added_median_us": session["median_us"] - bare["median_us"],
                         "added_paired_us": _paired(samples[(what, "session")], samples[(what, "bare")]),
                         "added_p99_us": session["p99_us"] - bare["p99_us"],
                         "watched_added_median_us": watched["median_us"] - bare["median_us"],
                         "floor_added_median_us": floor["median_us"] - bare["median_us"]}
        r = results[what]
        log(f"  {what}: bare median {bare['median_us']:.1f} us, watched {watched['median_us']:.1f} us, "
            f"under run {session['median_us']:.1f} us ({r['added_median_us']:+.1f} us at the median, "
            f"{r['added_paired_us']:+.1f} us paired, {r['added_p99_us']:+.1f} us p99; watching alone "
            f"{r['watched_added_median_us']:+.1f} us, minimal supervisor {r['floor_added_median_us']:+.1f} us)")
        if continued:
            c = _summary(samples[(what, "continued")])
            r["continued"] = c
            r["continued_added_median_us"] = c["median_us"] - bare["median_us"]
            r["continued_added_paired_us"] = _paired(samples[(what, "continued")], samples[(what, "bare")])
            log(f"  {what}: under run with file changes continued after the check (the old way) "
                f"{c['median_us']:.1f} us ({r['continued_added_median_us']:+.1f} us at the median, "
                f"{r['continued_added_paired_us']:+.1f} us paired); performed/continued "
                f"{session['median_us'] / c['median_us']:.2f}x")
        if baseline:
            b = _summary(samples[(what, "baseline")])
            r["baseline"] = {**b, "tree": baseline[3]}
            r["baseline_added_median_us"] = b["median_us"] - bare["median_us"]
            r["baseline_added_paired_us"] = _paired(samples[(what, "baseline")], samples[(what, "bare")])
            log(f"  {what}: under run of the baseline tree {baseline[3]} {b['median_us']:.1f} us "
                f"({r['baseline_added_median_us']:+.1f} us at the median, {r['baseline_added_paired_us']:+.1f} "
                f"us paired); this tree/baseline {session['median_us'] / b['median_us']:.2f}x")
    return results
