"""What drift costs: the time a write to a tracked file adds under `agentwarden
run`, side by side with an untracked write in the same session; and the size
of the store after 1,000 changes to a 10 KB file.

    .venv/bin/python bench/drift.py [--rounds 1000]   (as root; or: make bench-drift)

1. Tracked write: one `agentwarden run` session runs a Python worker that, each
   round, in a shuffled order, opens with O_WRONLY|O_TRUNC, writes 10 KB (a
   new content each time) and closes a file in a tracked directory and one in
   an untracked directory; both are allowed by the policy. The untracked
   write-open is answered by the supervisor's compiled fast path; the tracked
   one is forwarded to Python, which keeps the file's content before (hash,
   store) first. Medians of open+write+close, and the median of the
   per-round differences. The content after is taken once the writer is done
   (a second after its last write, or the session's end; not in the timed
   path): its time per change is reported apart.
2. Store size: 1,000 changes to a 10 KB text file (one line edited each time),
   each observed before and after into a fresh store and index, as the
   supervisor does: bytes on disk, objects, against keeping two full copies
   per change; and with drift_store_max = 0 (hashes only).

bench/run.py runs part 1 in its enforcement part. Prints the figures, saves
them in bench/results/drift-latest.json and rewrites the drift block of
docs/benchmarks.md (not with --no-docs).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentwarden import cgroups, control, drift  # noqa: E402

import report as bench_report  # noqa: E402  (bench/report.py, beside this file)

POLICY_FILE = "bench-drift.toml"
WARM_UP = 20
SIZE = 10 * 1024
CHANGES = 1000

WORKER = r"""
import json, os, random, sys, time
tracked, untracked, rounds, warm = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
times = {"tracked": [], "untracked": []}
order = random.Random(1)
for number in range(warm + rounds):
    for side in order.sample(["tracked", "untracked"], 2):
        data = (b"%d " % number) + b"x" * (10240 - len(b"%d " % number))
        started = time.perf_counter_ns()
        fd = os.open(tracked if side == "tracked" else untracked, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.close(fd)
        took = time.perf_counter_ns() - started
        if number >= warm:
            times[side].append(took)
print(json.dumps(times))
"""


def _us(values: list[int]) -> dict:
    ordered = sorted(values)
    return {"n": len(ordered), "median_us": statistics.median(ordered) / 1000,
            "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1000}


def tracked_write_cost(settings, env: dict, agent: str, policy_dir: Path, rounds: int, log=print) -> dict:
    """Needs a running agentwarden (policy dir policy_dir) whose probe watches
    a cgroup tagged `agent`. rounds: writes of each kind."""
    with tempfile.TemporaryDirectory(prefix="agentwarden-bench-drift-") as tmp:
        work = Path(tmp)
        tracked, untracked = work / "tracked", work / "untracked"
        tracked.mkdir()
        untracked.mkdir()
        python = os.path.realpath(sys.executable)
        (policy_dir / POLICY_FILE).write_text(
            f'[agent.{agent}]\nmode = "enforce"\non-violation = "kill"\n'
            f'[agent.{agent}.exec]\nallow = ["{python}"]\n'
            f'[agent.{agent}.files]\nread-allow = ["/**"]\nwrite-allow = ["{work}/**"]\n'
            f'track = ["{tracked}/**"]\n')
        try:
            control.request(settings, "reload", timeout=10)
            before = _drift_counters(settings)
            done = subprocess.run([sys.executable, "-m", "agentwarden", "run", "--agent", agent, "--",
                                   python, "-B", "-I", "-c", WORKER, str(tracked / "app.conf"),
                                   str(untracked / "data.bin"), str(rounds), str(WARM_UP)],
                                  env=env, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                raise SystemExit(f"bench: the drift session failed ({done.returncode}): {done.stderr[-500:]}")
            times = json.loads(done.stdout)
            # The writer is done: the supervisor takes the content after of each change.
            deadline = time.monotonic() + 60
            while _drift_counters(settings) == before and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            (policy_dir / POLICY_FILE).unlink()
    tracked_, untracked_ = _us(times["tracked"]), _us(times["untracked"])
    paired = statistics.median(t - u for t, u in zip(times["tracked"], times["untracked"])) / 1000
    result = {"rounds": rounds, "tracked": tracked_, "untracked": untracked_,
              "added_median_us": tracked_["median_us"] - untracked_["median_us"], "added_paired_us": paired,
              "ratio": tracked_["median_us"] / untracked_["median_us"]}
    log(f"  drift: a 10 KB write under run: untracked {untracked_['median_us']:.1f} us, tracked "
        f"{tracked_['median_us']:.1f} us at the median ({result['added_median_us']:+.1f} us, "
        f"{paired:+.1f} us paired, x{result['ratio']:.2f})")
    return result


def _drift_counters(settings) -> dict:
    sessions = control.request(settings, "status", timeout=5)["status"].get("sessions") or {}
    return {k: v for k, v in sessions.items() if k.startswith("drift_")}


def store_size(changes: int = CHANGES, size: int = SIZE) -> dict:
    """changes edits of a size-byte text file, each observed before and after
    into a fresh store and index, as the supervisor does."""
    with tempfile.TemporaryDirectory(prefix="agentwarden-bench-store-") as tmp:
        work = Path(tmp)
        target = work / "app.conf"
        lines = [f"key{n:05d} = {'v' * 20}\n" for n in range(size // 32)]
        body = "".join(lines)
        target.write_text(body + "#" * (size - len(body) - 1) + "\n")
        results = {}
        for limit in (1 << 20, 0):
            root = work / f"drift-{limit}"
            store, index = drift.Store(root, limit), drift.Index(root)
            capture_ns = []
            for number in range(changes):
                started = time.perf_counter_ns()
                before = drift.observe(str(target), store)
                capture_ns.append(time.perf_counter_ns() - started)
                text = target.read_text().splitlines(keepends=True)
                text[number % len(lines)] = f"key{number % len(lines):05d} = {number:020d}\n"
                target.write_text("".join(text))
                after = drift.observe(str(target), store)
                index.save({"id": drift.new_id(), "time": time.time_ns(), "path": str(target), "agent": "bench",
                            "before": before, "after": after, "source": "session", "syscalls": ["openat"]})
            objects = [p for p in (root / "objects").rglob("*") if p.is_file()] if (root / "objects").exists() else []
            entries = list((root / "changes").glob("*.json"))
            results["store" if limit else "hashes_only"] = {
                "objects": len(objects), "store_bytes": sum(p.stat().st_size for p in objects),
                "store_disk_bytes": sum(p.stat().st_blocks * 512 for p in objects),
                "index_bytes": sum(p.stat().st_size for p in entries),
                "index_disk_bytes": sum(p.stat().st_blocks * 512 for p in entries),
                "capture_median_us": statistics.median(capture_ns) / 1000}
    return {"changes": changes, "file_bytes": size, "two_copies_bytes": 2 * changes * size, **results}


def main() -> None:
    from monitors import BENCH_AGENT, Agentwarden, BenchCgroup   # noqa: E402  (bench/)
    from run import one_bench_at_a_time   # noqa: E402  (bench/run.py's lock)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Example: .venv/bin/python bench/drift.py --rounds 1000")
    parser.add_argument("--rounds", type=int, default=1000, help="writes of each kind (default 1000)")
    args, meta, started = bench_report.bench_args(parser, "drift.py", "bench-drift")
    with one_bench_at_a_time():
        workdir = Path(tempfile.mkdtemp(prefix="agentwarden-bench-drift-"))
        cgroup = BenchCgroup(cgroups.cgroup2_root())
        warden = Agentwarden(workdir / "agentwarden", cgroup)
        try:
            print("store: 1,000 changes to a 10 KB file")
            results = {"store": store_size()}
            warden.start()
            print("tracked write under run")
            results["write"] = tracked_write_cost(warden.settings, warden.env, BENCH_AGENT,
                                                  warden.settings.policy_dir, args.rounds)
        finally:
            warden.stop()
            cgroup.remove()
            shutil.rmtree(workdir, ignore_errors=True)
    bench_report.publish(results, meta, started, lambda r: bench_report.render_text(
        r, "drift bench", [bench_report.drift_section(r), bench_report.drift_write_section(r["write"])]),
        bench_report.DRIFT_RESULTS,
        bench_report.drift_blocks, docs=not args.no_docs)


if __name__ == "__main__":
    main()
