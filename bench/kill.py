"""Violation to process gone, alone and with enough trials for a p99: the
in-kernel exec and open kills and the daemon's user-space kill (pidfd) of a
forbidden exec, with the default settings.

    .venv/bin/python bench/kill.py [--trials 200]   (as root; or: make bench-kill)

bench/run.py's enforcement part measures the same three paths with few trials
(30 in its full profile), beside the session costs, which take twenty minutes;
this runs only the kills, so a quiet machine can be had for it. Each trial
starts one process per path in the tagged cgroup of its own `agentwarden up`,
interleaved; latency is from the violating syscall's entry (the record's
kernel timestamp) to the parent's waitpid() returning. Target (issue 18):
user-space kill p99 <= 5 ms.

Prints the figures, saves them in bench/results/kill-latest.json and rewrites
the kill block of docs/benchmarks.md (not with --no-docs).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentwarden import cgroups  # noqa: E402

import enforcement  # noqa: E402
import report as bench_report  # noqa: E402  (bench/report.py, beside this file)
from monitors import BENCH_AGENT, Agentwarden, BenchCgroup  # noqa: E402
from run import one_bench_at_a_time  # noqa: E402

KILL_RESULTS = "kill-latest.json"
USER_SPACE = "user-space kill (daemon, pidfd)"
MAX_USER_SPACE_P99_MS = 5.0


def measure(trials: int, workdir: Path) -> dict:
    cgroup = BenchCgroup(cgroups.cgroup2_root())
    warden = Agentwarden(workdir / "agentwarden", cgroup)
    try:
        warden.start()
        warden.settle()
        paths = enforcement.kill_latency(warden.settings, warden.env, cgroup.path, BENCH_AGENT,
                                         warden.settings.policy_dir, trials,
                                         lambda line: print(f"bench:{line}", file=sys.stderr))
    finally:
        warden.stop()
        cgroup.remove()
    return {"trials": trials, "paths": paths}


def kill_section(results: dict) -> bench_report.Section:
    rows, notes = [], []
    for path, v in results["paths"].items():
        rows.append([path, f"{v['n']}", f"{v['median_us']:,.0f}", f"{v['p99_us']:,.0f}",
                     f"{v['max_us']:,.0f}", f"{v['killed']}/{v['trials']}"])
    user = results["paths"].get(USER_SPACE)
    if user:
        p99_ms = user["p99_us"] / 1000
        notes.append(f"target: {USER_SPACE} p99 ≤ {MAX_USER_SPACE_P99_MS:g} ms: {p99_ms:.1f} ms: "
                     f"{'met' if p99_ms <= MAX_USER_SPACE_P99_MS else 'NOT met'}")
    return bench_report.Section(
        "Violation to process gone, with enough trials for a p99",
        f"{results['trials']} trials, the three paths interleaved, one `agentwarden up` with the default "
        "settings. From the violating syscall's entry (the record's kernel timestamp) to the parent's "
        "waitpid() returning for the killed process: it includes the exec's own work and the teardown.",
        ["path", "n", "median µs", "p99 µs", "max µs", "killed"], rows, notes)


def kill_blocks(results: dict) -> dict[str, str]:
    return bench_report.block("kill", results, kill_section(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Example: .venv/bin/python bench/kill.py --trials 200")
    parser.add_argument("--trials", type=int, default=200, help="trials of each path (default 200)")
    args, meta, started = bench_report.bench_args(parser, "kill.py", "bench-kill")
    workdir = Path(tempfile.mkdtemp(prefix="agentwarden-bench-kill-"))
    try:
        with one_bench_at_a_time():
            results = measure(args.trials, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    bench_report.publish(results, meta, started, lambda r: bench_report.render_text(
        r, "kill bench", [kill_section(r)]), KILL_RESULTS, kill_blocks, docs=not args.no_docs)


if __name__ == "__main__":
    main()
