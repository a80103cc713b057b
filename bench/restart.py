"""The daemon-restart gap as a session sees it: from a `kill -9` of the daemon
(and its session supervisor) to the session's first exec decided by the
restarted one, median over a few restarts.

    .venv/bin/python bench/restart.py [--restarts 5]   (as root; or: make bench-restart)

Starts its own `agentwarden up` (own run and state directories, own tagged
cgroup) and one `agentwarden run` session whose shell execs /usr/bin/date
(which appends the realtime clock in ns to a file) and /usr/bin/sleep 0.005
in a loop. Each round kills the supervisor and the daemon with SIGKILL at
time T (nothing decides from T on), waits for the first date line after T
(that exec waited through the gap: `up` restarts the daemon, which gets the
listener back from `up`'s fd store, and its supervisor resumes the session),
then for the daemon to report the probe again before the next round. The
loop's own period (about 7 ms) bounds how late the first exec after T starts.

Prints the figures, saves them in bench/results/restart-latest.json and
rewrites the restart block of docs/benchmarks.md (not with --no-docs).
"""
from __future__ import annotations

import argparse
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

import report as bench_report  # noqa: E402  (bench/report.py, beside this file)
from monitors import BENCH_AGENT, Agentwarden, BenchCgroup, wait_until  # noqa: E402
from run import one_bench_at_a_time  # noqa: E402

WAIT = 60.0  # seconds for any one step before the bench gives up


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


def step(what: str, predicate):
    value = wait_until(predicate, WAIT, interval=0.001)
    if not value:
        raise SystemExit(f"bench: no {what} within {WAIT:g} s")
    return value


def measure(restarts: int, workdir: Path) -> dict:
    cgroup = BenchCgroup(cgroups.cgroup2_root())
    warden = Agentwarden(workdir / "agentwarden", cgroup, policy=policy(workdir))
    tick_file = workdir / "ticks"
    proc = None
    gaps, back = [], []
    try:
        warden.start()
        script = f"while :; do /usr/bin/date +%s%N >> {tick_file}; /usr/bin/sleep 0.005; done"
        proc = subprocess.Popen([sys.executable, "-m", "agentwarden", "run", "--agent", BENCH_AGENT,
                                 "--", "/bin/sh", "-c", script], env=warden.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for number in range(restarts):
            seen = len(ticks(tick_file))
            step("ticks from the session", lambda: len(ticks(tick_file)) > seen + 10)
            daemon = psutil.Process(warden.status()["daemon"]["pid"])
            victims = [*daemon.children(), daemon]   # the supervisor first: nothing decides after T
            killed_at = time.time_ns()
            for victim in victims:
                victim.send_signal(signal.SIGKILL)
            first = step(f"a decided exec after restart {number + 1}",
                         lambda: next((t for t in ticks(tick_file) if t > killed_at), None))
            gaps.append(first - killed_at)

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
