"""Archive figures: records/s appended (hash chain, default durability), records/s
verified, and bytes per exec and per open record on disk, in the active segment
and once sealed and compressed.

    .venv/bin/python bench/archive.py [--records N] [--dir DIR]   (or: make bench-archive)

Prints the figures, saves them in bench/results/archive-latest.json and rewrites
the archive block of docs/benchmarks.md (not with --no-docs).

No root needed. The records have exactly the fields the daemon archives: the
decoder's, plus agent, session, resolved paths and the verdict with its rule
and policy hash (as in a real archive, where those make up much of a record).
The writer runs on DIR (default /var/tmp: a real disk, so fsync costs what it costs).
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentwarden.daemon.archive import ArchiveWriter  # noqa: E402
from agentwarden.archive.segments import compress_bytes, list_segments, load_segment  # noqa: E402
from agentwarden.archive.verify import verify  # noqa: E402
from agentwarden.settings import ArchiveSettings  # noqa: E402

import report as bench_report  # noqa: E402  (bench/report.py, beside this file)

POLICY = "/etc/agentwarden/policy.d/coder.toml"
POLICY_HASH = "sha256:0c4d6543cad5ccc4bd618650241bc5136d3157e6da70922aabf97489a7549c48"
PROGRAMS = [["git", "status", "--porcelain"], ["git", "diff", "--stat", "HEAD~1"],
            ["python3", "-m", "pytest", "-q", "tests/test_parser.py"], ["ls", "-la", "src"],
            ["grep", "-rn", "def parse", "src/"], ["cat", "README.md"], ["sed", "-n", "1,80p", "src/app.py"]]
WHERE = {"git": "/usr/bin/git", "python3": "/usr/bin/python3.11", "ls": "/usr/bin/ls",
         "grep": "/usr/bin/grep", "cat": "/usr/bin/cat", "sed": "/usr/bin/sed"}


def _task(rng: random.Random, t: int, kind: str) -> dict:
    pid = rng.randint(20000, 40000)
    return {"kind": kind, "time": t, "pid": pid, "tid": pid, "ppid": pid - rng.randint(1, 50),
            "uid": 1000, "gid": 1000, "comm": "python3", "cgroup_id": 13363, "agent_cgroup_id": 13363}


def exec_record(rng: random.Random, t: int) -> dict:
    argv = rng.choice(PROGRAMS)
    path = WHERE[argv[0]]
    return {**_task(rng, t, "exec"), "comm": argv[0], "syscall": "execve", "filename": path,
            "exec_path": path, "argv": argv, "argv_truncated": False, "dirfd": -100, "at_flags": 0,
            "ret": 0, "error": None, "died_before_return": False, "filename_unreadable": False,
            "filename_truncated": False, "killed_in_kernel": False, "kernel_rule": None, "not_approved": False,
            "agent": "coder", "session": "coder-3f2a9c1b0d4e", "resolved_filename": path,
            "resolved_exec_path": path,
            "verdict": {"decision": "allow", "rule": f'exec.allow "/usr/bin/*" at {POLICY}:5',
                        "policy_hash": POLICY_HASH}}


def open_record(rng: random.Random, t: int) -> dict:
    module = f"src/pkg{rng.randint(0, 40)}/module_{rng.randint(0, 400)}.py"
    return {**_task(rng, t, "open"), "syscall": "openat", "path": module, "dirfd": -100,
            "flags": 0o2100000, "mode": 0, "resolve": 0, "ret": rng.randint(3, 40), "error": None,
            "path_unreadable": False, "path_truncated": False, "killed_in_kernel": False,
            "kernel_rule": None, "agent": "coder", "session": "coder-3f2a9c1b0d4e",
            "resolved_path": f"/home/coder/work/{module}",
            "verdict": {"decision": "allow", "rule": f'files.read-allow "/home/coder/**" at {POLICY}:9',
                        "policy_hash": POLICY_HASH}}


def workload(count: int, seed: int = 1) -> list[dict]:
    """One exec for every nine opens, a few microseconds apart."""
    rng = random.Random(seed)
    t = time.time_ns()
    records = []
    for i in range(count):
        t += rng.randint(5_000, 80_000)
        records.append(exec_record(rng, t) if i % 10 == 0 else open_record(rng, t))
    return records


def append(directory: Path, records: list[dict], key: bytes, batch: int = 256) -> tuple[float, ArchiveWriter]:
    """Append as the daemon does: a batch per wake, one write per batch, fsync when due."""
    writer = ArchiveWriter(directory, ArchiveSettings(), key)
    started = time.perf_counter()
    for i in range(0, len(records), batch):
        for record in records[i:i + batch]:
            writer.append(record)
        writer.flush()
        if writer.sync_due():
            writer.sync()
    writer.sync()
    elapsed = time.perf_counter() - started
    return elapsed, writer


def wait_compressed(writer: ArchiveWriter, directory: Path) -> None:
    deadline = time.monotonic() + 600
    while any(s.compression is None for s in list_segments(directory)[:-1]):
        if time.monotonic() > deadline:
            raise SystemExit("compression did not finish in 10 minutes")
        time.sleep(0.1)


def bytes_per_record(directory: Path, make, count: int, compression: str) -> tuple[float, float, float]:
    """(plain, sealed-compressed, the bare msgpack record) bytes per record."""
    from agentwarden.wire import pack
    rng = random.Random(2)
    records = [make(rng, time.time_ns() + i * 30_000) for i in range(count)]
    bare = sum(len(pack(r)) for r in records) / count
    writer = ArchiveWriter(directory, ArchiveSettings(segment_bytes=1 << 30, compress="none"))
    for record in records:
        writer.append(record)
    writer.close()
    [segment] = list_segments(directory)
    data = load_segment(segment)
    return len(data) / count, len(compress_bytes(data, compression)) / count, bare


def measure(args: argparse.Namespace) -> dict:
    defaults = ArchiveSettings()
    records = workload(args.records)
    root = Path(tempfile.mkdtemp(prefix="agentwarden-bench-", dir=args.dir))
    try:
        print(f"archive benchmark: {args.records:,} records (1 exec : 9 opens) in {root}, "
              f"{args.runs} runs each, on {os.cpu_count()} CPUs", flush=True)
        appended, verified, keyed_rates, fsyncs, segments = [], [], [], 0, []
        for run in range(args.runs):
            directory = root / f"plain{run}"
            elapsed, writer = append(directory, [dict(r) for r in records], b"")
            appended.append(args.records / elapsed)
            fsyncs = writer.counters["fsyncs"]
            wait_compressed(writer, directory)
            writer.close()
            segments = list_segments(directory)
            started = time.perf_counter()
            report = verify(directory, None)
            verified.append(report.records / (time.perf_counter() - started))
            assert report.ok, report.problem
            elapsed, writer = append(root / f"keyed{run}", [dict(r) for r in records], os.urandom(32))
            keyed_rates.append(args.records / elapsed)
            wait_compressed(writer, root / f"keyed{run}")
            writer.close()
            shutil.rmtree(directory)
            shutil.rmtree(root / f"keyed{run}")
        sizes = {}
        for name, make in (("exec", exec_record), ("open", open_record)):
            plain, sealed, bare = bytes_per_record(root / name, make, 20_000, defaults.compress)
            sizes[name] = {"plain": plain, "sealed": sealed, "bare": bare}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"records": args.records, "runs": args.runs, "dir": str(args.dir),
            "defaults": {"sync_interval": defaults.sync_interval,
                         "segment_mib": defaults.segment_bytes >> 20, "compress": defaults.compress},
            "append": appended, "append_keyed": keyed_rates, "verify": verified, "fsyncs": fsyncs,
            "segments": len(segments),
            "compressed": sum(s.compression is not None for s in segments), "bytes": sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Example: .venv/bin/python bench/archive.py --records 100000")
    parser.add_argument("--records", type=int, default=400_000, help="records to append (default 400,000)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each measurement; the median is shown")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where to write (a real disk)")
    args, meta, started = bench_report.bench_args(parser, "archive.py", "bench-archive")
    results = measure(args)
    bench_report.publish(results, meta, started, bench_report.render_archive_text,
                         bench_report.ARCHIVE_RESULTS, bench_report.archive_blocks, docs=not args.no_docs)


if __name__ == "__main__":
    main()
