"""The daemon's CPU time and memory per record, away from the live pipeline:
`.venv/bin/python bench/record_cost.py [--records N] [--rounds R]` (as root).
With AGENTWARDEN_BENCH_BASELINE=DIR (another tree of the project: `git archive
REF | tar -x -C DIR`, then `sh scripts/build-fastpath.sh` there) that tree's
daemon is measured too, alternated with this one's in the same run.

Each measurement is a process of its own holding a real Daemon (its archive,
resolver, governor and feed in a temporary directory, as `agentwarden daemon`
makes them; no subscriber on its feed), importing the tree measured. It takes
probe batches of 4,096 opens (the probe's largest) of 10,000 distinct real
files, as the throughput bench's workload makes them, syncing its archive
whenever it is due as the daemon's loop does; once with no policy and once
with a policy that decides every open. Reported per record: CPU of the loop's
thread (time.thread_time: decode, resolve, decide, archive, publish) and of
the whole process (with the archive's compression thread and ZeroMQ's), and
the process's peak RSS (VmHWM), which a busy machine disturbs far less than
the live throughput runs. Figures are medians over the rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
FILES = 10_000
BATCH = 4096      # probe/main.py MAX_BATCH: a flood arrives in full batches
CGROUP_ID = 4242
SERIES = (("no policy", False), ("policy in force", True))


def _open(path: str) -> dict:
    pid = os.getpid()
    return {"kind": "open", "time": time.time_ns(), "pid": pid, "tid": pid, "ppid": 1, "uid": 0, "gid": 0,
            "comm": "workload", "cgroup_id": CGROUP_ID, "agent_cgroup_id": CGROUP_ID, "syscall": "openat",
            "path": path, "dirfd": -100, "ret": 3, "error": None, "path_unreadable": False,
            "path_truncated": False, "flags": os.O_RDONLY, "mode": 0, "resolve": 0,
            "killed_in_kernel": False, "kernel_rule": None}


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def measure(tree: Path, files: Path, records: int, with_policy: bool) -> dict:
    """In this process: one Daemon of the tree importable here takes `records` opens."""
    from agentwarden import wire
    from agentwarden.daemon.main import Daemon
    from agentwarden.settings import Settings
    import agentwarden.daemon.main as daemon_main
    if not Path(daemon_main.__file__).resolve().is_relative_to(tree):
        raise SystemExit(f"record_cost: imported {daemon_main.__file__}, not the tree {tree}")
    with tempfile.TemporaryDirectory(prefix="aw-record-cost-") as tmp:
        work = Path(tmp)
        settings = Settings(run_dir=work / "run", state_dir=work / "state", policy_dir=work / "policy.d",
                            cgroup_scope="record-cost")
        settings.policy_dir.mkdir(parents=True)
        if with_policy:
            (settings.policy_dir / "bench.toml").write_text(
                f'[agent.bench]\nmode = "monitor"\non-violation = "alert"\n'
                f'[agent.bench.files]\nread-allow = ["{files}/**"]\n')
        daemon = Daemon(settings)
        tags = {"kind": "tags", "time": time.time_ns(), "agents": {str(CGROUP_ID): {
            "agent": "bench", "path": "/sys/fs/cgroup/record-cost", "level": 1, "watched": True}}}
        daemon.handle_message(wire.encode_batch("probe", 0, [tags]))
        loop_cpu = process_cpu = 0.0
        batches = records // BATCH
        for b in range(batches):
            raw = wire.encode_batch("probe", 1 + b, [_open(f"{files}/f{(b * BATCH + i) % FILES}")
                                                     for i in range(BATCH)])
            thread0, process0 = time.thread_time(), time.process_time()
            daemon.handle_message(raw)
            if daemon.archive.sync_due():
                daemon.sync_archive()
            loop_cpu += time.thread_time() - thread0
            process_cpu += time.process_time() - process0
            del raw
        thread0, process0 = time.thread_time(), time.process_time()
        daemon.archive.sync()
        loop_cpu += time.thread_time() - thread0
        process_cpu += time.process_time() - process0
        peak = _peak_rss()
        daemon.archive.close()
        count = batches * BATCH
        return {"loop_us": 1e6 * loop_cpu / count, "process_us": 1e6 * process_cpu / count,
                "peak_rss": peak, "records": count}


def run_one(tree: Path, files: Path, records: int, with_policy: bool) -> dict:
    """measure() in a process of its own that imports the tree's package."""
    env = dict(os.environ)
    if tree != REPO_DIR:
        from monitors import importable
        env["PYTHONPATH"] = str(importable(tree))
    out = subprocess.run([sys.executable, __file__, "--measure", str(tree), "--files", str(files),
                          "--records", str(records), *(["--policy"] if with_policy else [])],
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def baseline_tree() -> Path | None:
    value = os.environ.get("AGENTWARDEN_BENCH_BASELINE")
    if not value:
        return None
    tree = Path(value).resolve()
    if not (tree / "daemon" / "main.py").is_file():
        sys.exit(f"record_cost: AGENTWARDEN_BENCH_BASELINE={value} is not a project tree "
                 "(git archive REF | tar -x -C DIR)")
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=204_800, help="opens per run (default 204,800)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side, alternated (default 3)")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--files", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--policy", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure.resolve(), args.files, args.records, args.policy)))
        return
    trees = [("this tree", REPO_DIR)]
    base = baseline_tree()
    if base:
        trees.append((f"baseline {base.name}", base))
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="aw-record-cost-files-") as tmp:
        files = Path(tmp)
        for i in range(FILES):
            (files / f"f{i}").touch()
        for round_ in range(args.rounds):
            for series, with_policy in SERIES:
                # Alternate which side goes first: drift of a busy machine falls on both.
                for label, tree in trees if round_ % 2 == 0 else trees[::-1]:
                    results.setdefault((label, series), []).append(
                        run_one(tree, files, args.records, with_policy))
    print(f"{args.records // BATCH * BATCH:,} opens per run in batches of {BATCH:,}, "
          f"median of {args.rounds} runs per side")
    print("| side | series | loop CPU µs/record | process CPU µs/record | records per loop CPU second "
          "| peak RSS MB |")
    print("|---|---|---:|---:|---:|---:|")
    medians = {}
    for (label, series), runs in results.items():
        loop = statistics.median(r["loop_us"] for r in runs)
        process = statistics.median(r["process_us"] for r in runs)
        peak = statistics.median(r["peak_rss"] for r in runs) / 2**20
        medians[(label, series)] = (loop, process, peak)
        print(f"| {label} | {series} | {loop:.1f} | {process:.1f} | {1e6 / loop:,.0f} | {peak:.0f} |")
    if base:
        for series, _ in SERIES:
            new, old = medians[("this tree", series)], medians[(trees[1][0], series)]
            print(f"- {series}: this tree / baseline: loop CPU ×{new[0] / old[0]:.2f}, "
                  f"process CPU ×{new[1] / old[1]:.2f}, peak RSS ×{new[2] / old[2]:.2f}")


if __name__ == "__main__":
    main()
