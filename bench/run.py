"""agentwarden benchmark: `.venv/bin/python bench/run.py [--quick]` (as root), or `make bench`.

1. Untagged overhead: an open-heavy and an exec-heavy C workload, in no
   tagged cgroup, with no monitor, under agentwarden, under bpftrace on the
   same tracepoints with the same cgroup filter, and under auditd with rules
   on the same syscalls. Slowdown of each against no monitor.
2. Tagged throughput: the highest rate of tagged opens agentwarden archives
   with zero loss, and where the rest goes above it; once with no policy
   (archive only) and once with a policy deciding every open.
3. Memory of the probe and the daemon, idle, at peak and after the throughput
   runs.
4. Enforcement: decisions/s with a 1,000-rule policy; violation -> process
   gone, in-kernel and user-space; the cost of an allowed exec and write-open
   under `agentwarden run` against the same workload without it.
5. Agent load (bench/agentload.py): session start (`run -- /bin/true` against
   `/bin/true`), and a coding agent's workload bare, watched and with each tool
   call under `run`, paired in one run.
6. Notify (bench/notify.py, also `make bench-notify`): hold to notification
   delivered.
7. Flood (bench/flood.py, also `make bench-flood`): the largest rate at which
   every record arrives, the exact counts above it, and a forbidden exec made
   while flooding.

Installs what it needs (gcc, bpftrace, auditd) when missing. Prints a report,
saves it in bench/results/ (latest.json, latest.md, and a copy of the JSON
named after the run's time) and rewrites the blocks of docs/benchmarks.md for
the parts it measured (not with --no-docs; `bench/report.py --write-docs`
re-renders them from latest.json). Everything it starts, the cgroup it makes
and the audit rules it sets are gone when it exits.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

try:
    from agentwarden import cgroups
except ImportError:
    sys.exit("bench: agentwarden is not importable; run it as .venv/bin/python bench/run.py "
             "(make bench sets the venv up)")

import drift
import flood
import agentload
import enforcement
import notify
import report
import sessions
from measure import (OverheadPlan, PeakRss, ThroughputPlan, measure_throughput,
                     measure_untagged)
from monitors import (BENCH_AGENT, Agentwarden, Auditd, BenchCgroup, Bpftrace,
                      MonitorUnavailable)
from prereqs import (REPO_DIR, BenchError, Workload, agentwarden_tracepoints,
                     build_workload, ensure_packages, traced_syscalls)

RESULTS_DIR = report.RESULTS_DIR
LOCK_PATH = Path("/run/lock/agentwarden-bench.lock")
EXEC_PROGRAM = "/bin/true"
THROUGHPUT_FILES = 10_000


@dataclass(frozen=True)
class Profile:
    name: str
    rounds: int        # visits of each monitor in the untagged comparison
    reps: int          # runs of each workload per visit
    open_count: int    # opens per open-workload run
    exec_count: int    # execs per exec-workload run
    rates: tuple[int, ...]
    seconds: float     # per throughput rate
    decisions: int     # synthetic events decided for decisions/s
    kill_trials: int   # violations per enforcement path
    session_rounds: int   # operations of each kind per side in the session-cost run
    starts: int = 50          # session starts per side (agent load)
    workload_rounds: int = 5  # rounds of the coding workload, each side once per round
    notify_holds: int = 50    # holds of the notify part


PROFILES = {
    "full": Profile("full", rounds=12, reps=2, open_count=200_000, exec_count=800,
                    rates=(25_000, 50_000, 75_000, 100_000, 150_000, 200_000, 300_000),
                    seconds=4, decisions=200_000, kill_trials=200, session_rounds=2000),
    "quick": Profile("quick", rounds=2, reps=1, open_count=100_000, exec_count=300,
                     rates=(25_000, 150_000, 300_000), seconds=2, decisions=20_000, kill_trials=30,
                     session_rounds=200, starts=20, workload_rounds=2, notify_holds=20),
}


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Example: sudo .venv/bin/python bench/run.py --quick")
    parser.add_argument("--quick", action="store_true", help="a short run (under 2 minutes)")
    parser.add_argument("--rounds", type=int, help="visits of each monitor (untagged comparison)")
    parser.add_argument("--rates", help="comma-separated target open rates, e.g. 25000,50000")
    parser.add_argument("--skip-untagged", action="store_true", help="no untagged comparison")
    parser.add_argument("--skip-throughput", action="store_true",
                        help="no throughput or memory runs")
    parser.add_argument("--skip-enforcement", action="store_true",
                        help="no decision, kill-latency or session-cost runs")
    parser.add_argument("--skip-agentload", action="store_true",
                        help="no session-start or coding-workload runs")
    parser.add_argument("--skip-notify", action="store_true", help="no hold-to-notification run")
    parser.add_argument("--skip-flood", action="store_true", help="no flood run")
    parser.add_argument("--no-docs", action="store_true",
                        help="save the results in bench/results/ but leave docs/benchmarks.md alone")
    return parser.parse_args()


def profile_from(args: argparse.Namespace) -> Profile:
    profile = PROFILES["quick" if args.quick else "full"]
    if args.rounds:
        profile = replace(profile, rounds=args.rounds)
    if args.rates:
        profile = replace(profile, rates=tuple(int(r) for r in args.rates.split(",")))
    return profile


def check_not_tagged(root: Path) -> None:
    """The untagged workloads inherit the bench's cgroup: it must not be an agent's."""
    with open("/proc/self/cgroup") as f:
        own = next(line.split(":", 2)[2].strip() for line in f if line.startswith("0::"))
    path = root / own.lstrip("/")
    for candidate in (path, *path.parents):
        if candidate == root.parent:
            break
        if cgroups.read_tag(candidate):
            raise BenchError(f"the bench runs inside the agent cgroup {candidate}: "
                             "run it from an untagged cgroup")


def machine_info(profile: Profile) -> dict:
    command = (" ".join([".venv/bin/python bench/run.py", *sys.argv[1:]])
               if sys.argv[1:] else "make bench")
    return {**report.machine(command), "profile": profile.name, "parameters": asdict(profile)}


def run_untagged(profile: Profile, workdir: Path, workload: Workload, cgroup: BenchCgroup,
                 canary, unusable: dict[str, str], cleanup: contextlib.ExitStack) -> dict:
    tracepoints = agentwarden_tracepoints()
    target = workdir / "open-target"
    target.touch()
    candidates = [Agentwarden(workdir / "untagged-agentwarden", cgroup)]
    if baseline_tree():
        candidates.append(Agentwarden(workdir / "untagged-baseline", cgroup, baseline=baseline_tree()))
    if "bpftrace" not in unusable:
        candidates.append(Bpftrace(workdir, cgroup, tracepoints, canary))
    if "auditd" not in unusable:
        candidates.append(Auditd(workdir, traced_syscalls(tracepoints)))
    monitors, skipped = [], dict(unusable)
    for monitor in candidates:
        cleanup.callback(monitor.cleanup)
        cleanup.callback(monitor.stop)  # runs first: callbacks run last-in first-out
        try:
            monitor.prepare()
            monitors.append(monitor)
        except MonitorUnavailable as exc:
            skipped[monitor.name] = str(exc)
            log(f"skipping {monitor.label}: {exc}")
    workloads = {
        "open": lambda: workload.ns_per_open(profile.open_count, target),
        "exec": lambda: workload.ns_per_exec(profile.exec_count, EXEC_PROGRAM),
    }
    result = measure_untagged(monitors, workloads, OverheadPlan(profile.rounds, profile.reps), log)
    for name, reason in skipped.items():
        result["configs"].setdefault(name, {"label": name, "note": "", "visits": 0,
                                            "rss_bytes": None})["skipped"] = reason
    result.update(rounds=profile.rounds, reps=profile.reps, workload_info={
        "open": {"label": "open+close", "count": profile.open_count,
                 "describe": f"{profile.open_count:,} x open(O_RDONLY)+close of one file"},
        "exec": {"label": "fork+exec", "count": profile.exec_count,
                 "describe": f"{profile.exec_count:,} x fork+execve({EXEC_PROGRAM})+waitpid"}})
    return result


def baseline_tree() -> Path | None:
    """AGENTWARDEN_BENCH_BASELINE=DIR: another tree of the project (`git
    archive REF | tar -x -C DIR`, then `sh scripts/build-fastpath.sh` there),
    whose agentwarden is one more side of the untagged, throughput and session parts, and
    whose `run` is one more session-start side (bench/agentload.py): before
    and after in one run."""
    value = os.environ.get("AGENTWARDEN_BENCH_BASELINE")
    if not value:
        return None
    tree = Path(value).resolve()
    if not (tree / "agentwarden" / "__main__.py").is_file() or not (tree / "daemon" / "_fastpath.so").is_file():
        raise BenchError(f"AGENTWARDEN_BENCH_BASELINE={value}: not a project tree with its fast path built "
                         "(git archive REF | tar -x -C DIR; cd DIR; sh scripts/build-fastpath.sh)")
    return tree


def allow_policy(files_dir: Path) -> str:
    """A policy under which the daemon decides every open of the throughput
    workload, and allows it (monitor mode: it would never act anyway)."""
    return (f'[agent.{BENCH_AGENT}]\nmode = "monitor"\non-violation = "alert"\n'
            f'[agent.{BENCH_AGENT}.files]\nread-allow = ["{files_dir}/**"]\n')


# Every open as a record of its own: repeats are not folded in the kernel.
EVERY_OPEN = {"AGENTWARDEN_FOLD_INTERVAL": "0"}
# name, what the daemon does with each event, the policy it runs with, settings.
THROUGHPUT_SERIES = (
    ("no policy", "Archive only: no policy, so the daemon records events without deciding; "
     "repeated opens folded in the kernel (the default)", None, None),
    ("policy in force", "A policy in force: the daemon decides every open (all allowed) "
     "before archiving it; repeated opens folded in the kernel (the default)", allow_policy, None),
    ("policy in force, every open a record", "A policy in force, and fold_interval = 0: every "
     "open is a record of its own, as before repeats were folded (what the pipeline itself "
     "sustains)", allow_policy, EVERY_OPEN),
)


def run_throughput(profile: Profile, workdir: Path, workload: Workload, cgroup: BenchCgroup,
                   files_dir: Path, cleanup: contextlib.ExitStack) -> list[dict]:
    plan = ThroughputPlan(rates=list(profile.rates), seconds=profile.seconds,
                          files=THROUGHPUT_FILES, drain_timeout=max(30.0, 4 * profile.seconds))
    results = []
    # With a baseline tree, each series again with its agentwarden, right after: before/after in one run.
    sides = [(name, describe, make_policy, env, None) for name, describe, make_policy, env in THROUGHPUT_SERIES]
    if baseline_tree():
        sides = [side for name, describe, make_policy, env, _ in sides for side in
                 ((name, describe, make_policy, env, None),
                  (f"{name}, baseline {baseline_tree().name}", describe, make_policy, env, baseline_tree()))]
    for number, (name, describe, make_policy, env, baseline) in enumerate(sides):
        aw = Agentwarden(workdir / f"throughput-{number}", cgroup,
                         policy=make_policy(files_dir) if make_policy else None, baseline=baseline, env=env)
        cleanup.callback(aw.stop)
        log(f"throughput, {name}: starting agentwarden")
        aw.start()
        aw.settle()
        idle = aw.rss_bytes()
        with PeakRss(aw.processes()) as peak:
            series = measure_throughput(aw, workload, cgroup, files_dir, plan, log)
        series.update(name=name, describe=describe,
                      memory={"idle": idle, "after": aw.rss_bytes(), "peak": peak.peak})
        aw.stop()
        results.append(series)
    return results


def run_enforcement(profile: Profile, workdir: Path, cgroup: BenchCgroup,
                    cleanup: contextlib.ExitStack) -> dict:
    result = {"decisions": enforcement.decision_throughput(profile.decisions)}
    log(f"enforcement: {result['decisions']['per_second']:,.0f} decisions/s with "
        f"{result['decisions']['rules']} rules")
    aw = Agentwarden(workdir / "enforcement", cgroup)
    cleanup.callback(aw.stop)
    aw.start()
    aw.settle()
    log("enforcement: violation -> process gone")
    result["kill_latency"] = enforcement.kill_latency(aw.settings, aw.env, cgroup.path, BENCH_AGENT,
                                                      aw.settings.policy_dir, profile.kill_trials, log)
    aw.settle()   # the kill trials' records archived: no backlog competes with the sessions
    # A second agentwarden, whose supervisor lets file changes continue after
    # the check (the way before it performed them): before and after in one run.
    old_cgroup = BenchCgroup(cgroup.path.parent)
    cleanup.callback(old_cgroup.remove)
    old = Agentwarden(workdir / "enforcement-continued", old_cgroup)
    old.env["AGENTWARDEN_PERFORM_FILE_CHANGES"] = "false"
    cleanup.callback(old.stop)
    old.start()
    old.settle()
    # And the baseline tree's agentwarden, when one is given, with its own `run`.
    base = None
    if baseline_tree():
        base_cgroup = BenchCgroup(cgroup.path.parent)
        cleanup.callback(base_cgroup.remove)
        base = Agentwarden(workdir / "enforcement-baseline", base_cgroup, baseline=baseline_tree())
        cleanup.callback(base.stop)
        base.start()
        base.settle()
    log("sessions: allowed exec and write-open, bare and under agentwarden run")
    result["sessions"] = sessions.session_costs(aw.settings, aw.env, BENCH_AGENT, cgroup.path,
                                                aw.settings.policy_dir, profile.session_rounds, log,
                                                continued=(old.settings, old.env),
                                                baseline=(base.settings, base.env, base.cwd, base.baseline.name) if base else None)
    old.stop()
    if base:
        base.stop()
    result["drift"] = drift.tracked_write_cost(aw.settings, aw.env, BENCH_AGENT, aw.settings.policy_dir,
                                               profile.session_rounds, log)
    aw.stop()
    return result


def run_agentload(profile: Profile, workdir: Path, cgroup: BenchCgroup,
                  cleanup: contextlib.ExitStack) -> dict:
    aw = Agentwarden(workdir / "agentload", cgroup)
    cleanup.callback(aw.stop)
    aw.start()
    aw.settle()
    log("agent load: session start, and a coding workload bare, watched and under run")
    result = agentload.measure(aw.settings, aw.env, BENCH_AGENT, cgroup.path, aw.settings.policy_dir,
                               profile.starts, profile.workload_rounds, workdir, log)
    aw.stop()
    return result


@contextlib.contextmanager
def one_bench_at_a_time():
    """Two runs would undo each other's audit rules and load each other's
    CPUs: a second one waits for the first."""
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_PATH, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            log(f"another bench run (pid {lock.read().strip() or '?'}) holds {LOCK_PATH}; "
                "waiting for it to finish")
            fcntl.flock(lock, fcntl.LOCK_EX)
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield


def make_files(directory: Path, count: int) -> Path:
    directory.mkdir()
    for i in range(count):
        (directory / f"f{i}").touch()
    return directory


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: run as root (it loads BPF programs, makes cgroups and sets audit rules)")
    profile = profile_from(args)
    meta = machine_info(profile)   # the commit measured: the tree as it is at the start
    started = time.monotonic()
    # SIGTERM unwinds like Ctrl-C, so the clean-up below always runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results: dict = {}
    with contextlib.ExitStack() as cleanup:
        cleanup.enter_context(one_bench_at_a_time())
        unusable = ensure_packages(log, comparison=not args.skip_untagged)
        workdir = Path(tempfile.mkdtemp(prefix="agentwarden-bench-"))
        cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)
        workload = Workload(build_workload(workdir))
        root = cgroups.cgroup2_root()
        check_not_tagged(root)
        cgroup = BenchCgroup(root)
        cleanup.callback(cgroup.remove)
        files_dir = make_files(workdir / "files", THROUGHPUT_FILES)

        def canary():
            """A few opens from inside the tagged cgroup."""
            return workload.open_at_rate(1000, 0.01, files_dir, 10, cgroup.procs)

        if not args.skip_untagged:
            results["untagged"] = run_untagged(profile, workdir, workload, cgroup, canary,
                                               unusable, cleanup)
        if not args.skip_throughput:
            results["throughput"] = run_throughput(profile, workdir, workload, cgroup, files_dir,
                                                   cleanup)
        if not args.skip_enforcement:
            results["enforcement"] = run_enforcement(profile, workdir, cgroup, cleanup)
        if not args.skip_agentload:
            results["agentload"] = run_agentload(profile, workdir, cgroup, cleanup)
        if not args.skip_notify:
            log("notify: hold to notification delivered")
            (workdir / "notify").mkdir()
            results["notify"] = notify.measure(profile.notify_holds, workdir / "notify")
        if not args.skip_flood:
            (workdir / "flood").mkdir()
            results["flood"] = flood.measure(flood.PROFILES[profile.name], workdir / "flood", cgroup)
    if results.get("untagged", {}).get("configs", {}).get("auditd", {}).get("visits"):
        log("note: audit has now been enabled in this boot; until a reboot every new process "
            "takes the slower audit syscall path unless "
            "`auditctl -a never,task` is loaded")
    results["meta"] = {**meta, "duration_s": time.monotonic() - started}
    print(report.render_text(results))
    json_path = report.write(results, RESULTS_DIR)
    log(f"wrote {json_path.relative_to(REPO_DIR)} and latest.md beside it")
    if not args.no_docs:
        try:
            written = report.update_docs(report.run_blocks(results))
        except report.DocsError as exc:
            raise BenchError(f"{exc} (the results are saved: fix it, then run "
                             "bench/report.py --write-docs)") from None
        log(f"wrote the {', '.join(written)} blocks of "
            f"{report.DOCS_PATH.relative_to(REPO_DIR)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        sys.exit(f"bench: error: {exc}")
    except KeyboardInterrupt:
        sys.exit(130)
