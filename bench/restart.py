"""The daemon-restart gap as a session sees it: from a `kill -9` of the daemon
(and its session supervisor) to the session's first exec decided by the
restarted one, median over a few restarts.

    .venv/bin/python bench/restart.py [--restarts 5]   (as root; or: make bench-restart)

Starts its own `agentwarden up` (own run and state directories, own tagged
cgroup) and one `agentwarden run` session whose shell waits on a FIFO and,
for each line, execs /usr/bin/date, which appends the realtime clock in ns to
a file. Each round kills the supervisor and the daemon with SIGKILL at time
T, waits until both are gone, every thread (nothing can receive from then on), writes a
line to the FIFO, and takes the clock date wrote: that exec waited through
the gap (`up` restarts the daemon, which gets the listener back from `up`'s
fd store, and its supervisor resumes the session) and was then decided.
Before each round one line checks the session answers. Kills are 16 s apart:
`up`, as systemd, gives up on a daemon that exits five times within a minute.

Prints the figures, saves them in bench/results/restart-latest.json and
rewrites the restart block of docs/benchmarks.md (not with --no-docs).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402

from agentwarden import cgroups  # noqa: E402
from agentwarden.cli.up import START_LIMIT_BURST, START_LIMIT_INTERVAL  # noqa: E402

import report as bench_report  # noqa: E402  (bench/report.py, beside this file)
from monitors import BENCH_AGENT, Agentwarden, BenchCgroup, wait_until  # noqa: E402
from run import one_bench_at_a_time  # noqa: E402

WAIT = 60.0  # seconds for any one step before the bench gives up
# `up` gives up on a daemon that exits START_LIMIT_BURST times within
# START_LIMIT_INTERVAL s (as systemd would): kills are spaced to stay below.
SPACING = START_LIMIT_INTERVAL / (START_LIMIT_BURST - 1) + 1


def policy(workdir: Path) -> str:
    shells = '"/usr/bin/sh", "/usr/bin/dash", "/bin/sh", "/bin/dash"'
    return (f'[agent.{BENCH_AGENT}]\nmode = "enforce"\non-violation = "kill"\n'
            f'[agent.{BENCH_AGENT}.exec]\nallow = [{shells}, "/usr/bin/date", "/usr/bin/sleep"]\n'
            f'[agent.{BENCH_AGENT}.files]\nread-allow = ["/**"]\nwrite-allow = ["{workdir}/**"]\n')


def ticks(path: Path) -> list[int]:
    try:
        return [int(line) for line in path.read_text().split() if line.isdigit()]
    except OSError:
        return []


def gone(process: psutil.Process) -> bool:
    """Dead and reaped: a zombie leader's other threads may still run (and the
    supervisor's fast path could still take a notification; then, after the
    restart, it would be failed rather than decided)."""
    return not process.is_running()


def step(what: str, predicate):
    value = wait_until(predicate, WAIT, interval=0.001)
    if not value:
        raise SystemExit(f"bench: no {what} within {WAIT:g} s")
    return value


def measure(restarts: int, workdir: Path) -> dict:
    cgroup = BenchCgroup(cgroups.cgroup2_root())
    warden = Agentwarden(workdir / "agentwarden", cgroup, policy=policy(workdir))
    tick_file, fifo = workdir / "ticks", workdir / "go"
    os.mkfifo(fifo)
    proc = None
    gaps, back = [], []

    def tick_after(since_ns: int) -> int:
        """One exec of date by the session; the clock it wrote (after since_ns)."""
        with open(fifo, "w") as go:
            go.write("go\n")
        return step("a decided exec", lambda: next((t for t in ticks(tick_file) if t > since_ns), None))

    try:
        warden.start()
        script = f"while read x < {fifo}; do /usr/bin/date +%s%N >> {tick_file}; done"
        proc = subprocess.Popen([sys.executable, "-m", "agentwarden", "run", "--agent", BENCH_AGENT,
                                 "--", "/bin/sh", "-c", script], env=warden.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        last_kill = None
        for number in range(restarts):
            if last_kill is not None:
                time.sleep(max(0.0, last_kill + SPACING - time.monotonic()))
            tick_after(time.time_ns())   # the session answers before the kill
            daemon = psutil.Process(warden.status()["daemon"]["pid"])
            victims = [*daemon.children(), daemon]
            killed_at, last_kill = time.time_ns(), time.monotonic()
            for victim in victims:
                victim.send_signal(signal.SIGKILL)
            step("the daemon and its supervisor to die", lambda: all(gone(v) for v in victims))
            first = tick_after(killed_at)
            gaps.append(first - killed_at)
            print(f"bench: restart {number + 1}: exec decided {(first - killed_at) / 1e6:.0f} ms "
                  "after the kill", file=sys.stderr, flush=True)

            def answering():
                try:
                    return warden.status()["daemon"]["pid"] != daemon.pid and warden.status()["probe"]["health"]
                except Exception:
                    return False
            step("the restarted daemon", answering)
            back.append(time.time_ns() - killed_at)
            if proc.poll() is not None:
                raise SystemExit(f"bench: the session ended with restart {number + 1}: {proc.stderr.read()[-500:]}")
    finally:
        if proc and proc.poll() is None:
            proc.kill()
            proc.wait()
        warden.stop()
        cgroup.remove()
    ms = sorted(g / 1e6 for g in gaps)
    return {"restarts": restarts, "gaps_ms": [g / 1e6 for g in gaps],
            "gap": {"median_ms": statistics.median(ms), "min_ms": ms[0], "max_ms": ms[-1]},
            "status_back_ms": [b / 1e6 for b in back]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Example: .venv/bin/python bench/restart.py --restarts 5")
    parser.add_argument("--restarts", type=int, default=5, help="daemon kills to measure (default 5)")
    args, meta, started = bench_report.bench_args(parser, "restart.py", "bench-restart")
    workdir = Path(tempfile.mkdtemp(prefix="agentwarden-bench-restart-"))
    try:
        with one_bench_at_a_time():
            results = measure(args.restarts, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    bench_report.publish(results, meta, started, lambda r: bench_report.render_text(
        r, "restart bench", [bench_report.restart_section(r)]), bench_report.RESTART_RESULTS,
        bench_report.restart_blocks, docs=not args.no_docs)


if __name__ == "__main__":
    main()
