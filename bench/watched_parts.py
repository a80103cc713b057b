"""Where the watched coding workload's extra time goes: `.venv/bin/python
bench/watched_parts.py [--rounds N] [--bpf-stats] [--baseline [NAME=]DIR]
[--sides ...] [--no-docs]` (as root). Rewrites the watched-parts block of
docs/benchmarks.md and saves bench/results/watched-parts.json.

The workload of bench/agentload.py, run once per side in each round, sides in
a shuffled order, all against one `agentwarden up`:

- bare: not in the tagged cgroup (the programs see its syscalls and return);
- kernel: in the tagged cgroup, the probe stopped (SIGSTOP) for the pass: the
  programs record every call into the rings, nobody reads them meanwhile;
- probe: the daemon stopped for the pass: the probe is woken, decodes and
  sends; the daemon reads the batches after the pass;
- archive: the whole pipeline, no policy for the agent (the daemon archives);
- policy: the whole pipeline with the workload's enforce policy (the daemon
  decides every exec and open, then archives): the `watched` side of agentload.

Stopped parts are continued after the pass and the pipeline left to settle
(outside the timing) before the next. Per side, medians over rounds of: wall
time, the workload's own CPU (user+system of every tool call and its
children, from wait4), the probe's and the daemon's CPU (all threads,
/proc/PID/stat) and context switches (/proc/PID/task/*/status), and with
--bpf-stats (kernel.bpf_stats_enabled for the run, restored after) the
run time of the probe's programs (the fdinfo of its program fds). The
machine may be busy: CPU times and paired ratios say more than wall times.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import agentload
import report
from monitors import BENCH_AGENT, Agentwarden, BenchCgroup
from run import one_bench_at_a_time

from agentwarden import cgroups, control

SIDES = ("bare", "kernel", "probe", "archive", "policy")
DOCS_BLOCK = "watched-parts"
RESULTS_NAME = "watched-parts.json"
DESCRIBE = {"bare": "bare", "kernel": "kernel (probe stopped)", "probe": "probe (daemon stopped)",
            "archive": "archive (no policy)", "policy": "policy (agentload's watched)"}
STOP_AT_MOST = 4.0   # s a part stays stopped
TICKS = os.sysconf("SC_CLK_TCK")
BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def cpu_ns(pid: int, thread: int | None = None) -> int:
    """user + system of a process, all its threads (or of one thread)."""
    where = f"/proc/{pid}/task/{thread}/stat" if thread else f"/proc/{pid}/stat"
    fields = Path(where).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // TICKS


def switches(pid: int) -> tuple[int, int]:
    """Voluntary and involuntary context switches of all its threads."""
    vol = invol = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches"):
                    vol += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches"):
                    invol += int(line.split()[1])
        except OSError:
            pass
    return vol, invol


def prog_stats(pid: int) -> dict[str, tuple[int, int]]:
    """prog fd's name/id -> (run_time_ns, run_cnt) of the programs a process holds."""
    found = {}
    for fdinfo in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            text = fdinfo.read_text()
        except OSError:
            continue
        if "prog_tag" not in text:
            continue
        info = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        found[info.get("prog_id", fdinfo.name).strip()] = (int(info.get("run_time_ns", 0)),
                                                           int(info.get("run_cnt", 0)))
    return found


def run_pass(work: Path, env: dict, join: Path | None) -> tuple[int, int]:
    """One pass of every tool call: wall ns and the tool calls' own CPU ns."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    wall = cpu = 0
    for _what, command in agentload.tool_calls():
        def preexec():
            if join is not None:
                join.write_text("0")
        start = time.perf_counter_ns()
        proc = subprocess.Popen(["/bin/sh", "-c", command], env=env, cwd=work, preexec_fn=preexec,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        wall += time.perf_counter_ns() - start
        err = proc.stderr.read()
        proc.stderr.close()
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{command[:80]}: {err.decode(errors='replace')[-300:]}")
        cpu += int((usage.ru_utime + usage.ru_stime) * 1e9)
    return wall, cpu


def describe(side: str) -> str:
    mode, _, name = side.partition("@")
    mode, _, sched = mode.partition("/")
    text = DESCRIBE.get(mode, mode)
    return text + (f", {sched} scheduling" if sched else "") + (f", tree {name}" if name else "")


def section(results: dict) -> report.Section:
    summary = results["summary"]
    rows = []
    for side, s in summary.items():
        rows.append([describe(side), f"{s['wall'] / 1e6:,.0f}", f"{s.get('wall_ratio', 1.0):.3f}",
                     f"{s['own_cpu'] / 1e6:,.0f}", f"{s.get('own_cpu_ratio', 1.0):.3f}",
                     f"{s['probe_cpu'] / 1e6:,.0f}", f"{s['daemon_cpu'] / 1e6:,.0f}",
                     f"{s['probe_vcsw'] + s['probe_icsw']:,.0f}", f"{s['daemon_vcsw'] + s['daemon_icsw']:,.0f}",
                     f"{s['bpf_ns'] / 1e6:,.1f}" if results["bpf_stats"] else "-",
                     f"{s.get('records', 0):,.0f}", f"{s.get('fd_records', 0):,.0f}",
                     f"{s.get('fd_skipped', 0):,.0f}"])
    lost = "; ".join(f"{name}: {', '.join(f'{k} {v}' for k, v in counts.items())}"
                     for name, counts in results["lost"].items())
    return report.Section(
        "Where the watched workload's time goes",
        f"bench/agentload.py's workload, one pass per side per round, {results['rounds']} rounds in a shuffled "
        "order, all against one `agentwarden up` (and a baseline tree's, for its sides). Sides: bare, not in the "
        "tagged cgroup; kernel, the programs recording, the probe stopped; probe, the probe reading and sending, "
        "the daemon stopped; archive, the whole pipeline with no policy; policy, with the workload's enforce "
        "policy (on-violation alert), as agentload's watched side. Medians per pass: wall "
        "ms and its ratio to bare in the same round; the workload's own CPU (user+system of its tool calls, "
        "wait4) and its ratio; the probe's and the daemon's CPU (all threads, /proc/PID/stat, 10 ms ticks) and "
        "context switches; the run time of the probe's BPF programs (kernel.bpf_stats_enabled, with "
        "--bpf-stats); the records the programs emitted, of them `fd` records, and the `fd` records they "
        "skipped (kernel_fd_skipped: closes and copies of read-only regular files, devices, pipes, sockets). On a busy machine the wall "
        "times stretch; the CPU columns are steadier.",
        ["side", "wall ms", "× bare", "workload CPU ms", "× bare", "probe CPU ms", "daemon CPU ms",
         "probe switches", "daemon switches", "BPF ms", "records", "fd records", "fd skipped"], rows,
        [f"records lost: {lost}"])


# MODE/SCHED: the probe's and the daemon's threads under another scheduling
# policy for the pass (an experiment, no setting).
SCHEDULERS = {"batch": os.SCHED_BATCH, "idle": os.SCHED_IDLE}


def set_scheduler(pids: list[int], policy: int | dict[int, int]) -> dict[int, int]:
    """Each thread's policy set (a dict: restored); returns what they had."""
    had = {}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            tid = int(task.name)
            with contextlib.suppress(OSError):
                had[tid] = os.sched_getscheduler(tid)
                os.sched_setscheduler(tid, policy.get(tid, had[tid]) if isinstance(policy, dict) else policy,
                                      os.sched_param(0))
    return had


class Instance:
    """One `agentwarden up` with its tagged cgroup, its policy on or off."""

    def __init__(self, workdir: Path, name: str, tree: Path | None, cleanup: contextlib.ExitStack):
        self.cgroup = BenchCgroup(cgroups.cgroup2_root())
        cleanup.callback(self.cgroup.remove)
        self.aw = Agentwarden(workdir / name, self.cgroup, baseline=tree)
        cleanup.callback(self.aw.stop)
        self.aw.start()
        self.aw.settle()
        parts = self.aw.processes()
        self.probe, self.daemon = parts["probe"].pid, parts["daemon"].pid
        self.policy_file = self.aw.settings.policy_dir / agentload.POLICY_FILE
        self.policy_on: bool | None = None

    def set_policy(self, on: bool, work: Path) -> None:
        if self.policy_on is on:
            return
        if on:
            self.policy_file.write_text(agentload.policy(BENCH_AGENT, work))
        else:
            self.policy_file.unlink(missing_ok=True)
        control.request(self.aw.settings, "reload", timeout=10)
        self.policy_on = on


def kernel_counts(inst: Instance) -> tuple[int, int, int]:
    """The probe's counts so far: records the programs emitted, of them fd
    records, and fd records they skipped (a tree without the filter: 0)."""
    health = inst.aw.status()["probe"]["health"]
    emitted = health.get("kernel_emitted", {})
    return sum(emitted.values()), emitted.get("fd", 0), health.get("kernel_fd_skipped", 0)


def measure_pass(side: str, instances: dict[str, Instance], work: Path, env: dict) -> dict:
    mode, _, name = side.partition("@")
    mode, _, sched = mode.partition("/")
    inst = instances[name or "current"]
    inst.set_policy(mode == "policy", work.parent)   # as agentload: writes allowed where TMPDIR is
    for other in instances.values():
        other.aw.settle()
    stopped = {"kernel": inst.probe, "probe": inst.daemon}.get(mode)
    pids = {"probe": inst.probe, "daemon": inst.daemon}
    counts_before = kernel_counts(inst)
    before = {name: (cpu_ns(pid), switches(pid)) for name, pid in pids.items()}
    main_before = cpu_ns(inst.daemon, inst.daemon)
    progs_before = prog_stats(inst.probe)
    if stopped:
        os.kill(stopped, signal.SIGSTOP)
        # The daemon freezes the agents when the probe is silent for 5 s:
        # a pass that long (a very busy machine) goes on, and does not count.
        overran = threading.Timer(STOP_AT_MOST, os.kill, (stopped, signal.SIGCONT))
        overran.start()
    if sched:
        had = set_scheduler([inst.probe, inst.daemon], SCHEDULERS[sched])
    try:
        wall, own = run_pass(work, env, None if mode == "bare" else inst.cgroup.procs)
    finally:
        if stopped:
            overran.cancel()
            os.kill(stopped, signal.SIGCONT)
        if sched:
            set_scheduler([inst.probe, inst.daemon], had)
    after = {name: (cpu_ns(pid), switches(pid)) for name, pid in pids.items()}
    progs_after = prog_stats(inst.probe)
    if stopped and wall > STOP_AT_MOST * 1e9:
        return None
    sample = {"wall": wall, "own_cpu": own, "daemon_main_cpu": cpu_ns(inst.daemon, inst.daemon) - main_before}
    inst.aw.settle()   # outside the timing: the probe's counters of the pass
    for key, was, now in zip(("records", "fd_records", "fd_skipped"), counts_before, kernel_counts(inst)):
        sample[key] = now - was
    for name in pids:
        sample[f"{name}_cpu"] = after[name][0] - before[name][0]
        sample[f"{name}_vcsw"] = after[name][1][0] - before[name][1][0]
        sample[f"{name}_icsw"] = after[name][1][1] - before[name][1][1]
    sample["bpf_ns"] = sum(v[0] - progs_before.get(k, (0, 0))[0] for k, v in progs_after.items())
    sample["bpf_runs"] = sum(v[1] - progs_before.get(k, (0, 0))[1] for k, v in progs_after.items())
    return sample


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--bpf-stats", action="store_true",
                        help="enable kernel.bpf_stats_enabled for the run (it costs every program a little)")
    parser.add_argument("--sides", default=",".join(SIDES),
                        help="of bare, kernel, probe, archive, policy; MODE@base for the baseline's")
    parser.add_argument("--baseline", action="append", default=[], metavar="[NAME=]DIR",
                        help="another tree of the project (git archive REF | tar -x -C DIR, its fast "
                             "path built), run as another agentwarden for the MODE@NAME sides (NAME: base)")
    parser.add_argument("--no-docs", action="store_true",
                        help="save the results in bench/results/ but leave docs/benchmarks.md alone")
    args = parser.parse_args()
    meta, started = report.machine(" ".join([".venv/bin/python bench/watched_parts.py", *sys.argv[1:]])), time.monotonic()
    sides = tuple(args.sides.split(","))
    if os.geteuid() != 0:
        sys.exit("watched_parts: run as root")
    with contextlib.ExitStack() as cleanup, one_bench_at_a_time():
        workdir = Path(tempfile.mkdtemp(prefix="agentwarden-parts-"))
        cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)
        if args.bpf_stats:
            before = BPF_STATS.read_text()
            BPF_STATS.write_text("1")
            cleanup.callback(BPF_STATS.write_text, before)
        instances = {"current": Instance(workdir, "current", None, cleanup)}
        for given in args.baseline:
            name, _, tree = given.rpartition("=")
            instances[name or "base"] = Instance(workdir, name or "base", Path(tree).resolve(), cleanup)
        work = workdir / "agent-work"
        env = {**instances["current"].aw.env, "TMPDIR": str(workdir), "HOME": str(workdir),
               "GIT_CONFIG_NOSYSTEM": "1", "LC_ALL": "C",
               "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        samples = {side: {} for side in sides}   # side -> round -> figures
        order = random.Random(5)
        for number in range(args.rounds + 1):   # the first round warms up
            for side in order.sample(sides, len(sides)):
                sample = measure_pass(side, instances, work, env)
                if sample is None:
                    print(f"round {number}: {side} took over {STOP_AT_MOST} s with a part stopped: not counted")
                elif number:
                    samples[side][number] = sample
            if number:
                print(f"round {number}: " + ", ".join(
                    f"{s} {samples[s][number]['wall'] / 1e9:.3f}s" for s in sides if number in samples[s]), flush=True)
        lost = {}
        for name, inst in instances.items():
            inst.aw.settle()
            health = inst.aw.status()["probe"]["health"]
            lost[name] = {"kernel_dropped": sum(health.get("kernel_dropped", {}).values()),
                          "backlog_dropped": health.get("backlog_dropped", 0)}
            inst.set_policy(False, work)
    summary = {}
    for side in sides:
        got = samples[side]
        summary[side] = {k: statistics.median(s[k] for s in got.values()) for k in next(iter(got.values()))}
        paired = [got[n]["wall"] / samples["bare"][n]["wall"] for n in got if n in samples.get("bare", {})]
        if side != "bare" and paired:
            summary[side]["wall_ratio"] = statistics.median(paired)
            summary[side]["own_cpu_ratio"] = statistics.median(
                got[n]["own_cpu"] / samples["bare"][n]["own_cpu"] for n in got if n in samples["bare"])
    results = {"rounds": args.rounds, "bpf_stats": args.bpf_stats, "summary": summary, "lost": lost,
               "samples": {side: list(got.values()) for side, got in samples.items()}}
    report.publish(results, meta, started, lambda r: report.render_text(r, "watched parts", [section(r)]),
                   RESULTS_NAME, lambda r: report.block(DOCS_BLOCK, r, section(r)), not args.no_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
