"""The daemon's CPU time per record, away from the live pipeline:
`.venv/bin/python bench/record_cost.py [--records N]` (as root).

A real Daemon (its archive, resolver and governor in a temporary directory)
takes probe batches of 1,000 opens of 10,000 distinct real files, as the
throughput bench's workload makes them, once with no policy and once with a
policy that decides every open. It reports CPU seconds of this process per
record (time.process_time), which a busy machine disturbs far less than the
live throughput runs: run it in a baseline tree and in this one to compare.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentwarden import wire  # noqa: E402
from agentwarden.settings import Settings  # noqa: E402
from agentwarden.daemon.main import Daemon  # noqa: E402

FILES = 10_000
BATCH = 1_000
CGROUP_ID = 4242


def _open(path: str) -> dict:
    pid = os.getpid()
    return {"kind": "open", "time": time.time_ns(), "pid": pid, "tid": pid, "ppid": 1, "uid": 0, "gid": 0,
            "comm": "workload", "cgroup_id": CGROUP_ID, "agent_cgroup_id": CGROUP_ID, "syscall": "openat",
            "path": path, "dirfd": -100, "ret": 3, "error": None, "path_unreadable": False,
            "path_truncated": False, "flags": os.O_RDONLY, "mode": 0, "resolve": 0,
            "killed_in_kernel": False, "kernel_rule": None}


def cost(work: Path, files: Path, records: int, with_policy: bool) -> float:
    """CPU µs per record of Daemon.handle_message over `records` opens."""
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
    batches = [wire.encode_batch("probe", 1 + b, [_open(f"{files}/f{(b * BATCH + i) % FILES}")
                                                  for i in range(BATCH)])
               for b in range(records // BATCH)]
    started = time.process_time()
    for raw in batches:
        daemon.handle_message(raw)
    daemon.archive.sync()
    spent = time.process_time() - started
    for sock in (daemon.pull, daemon.pub, daemon.control):
        sock.close()
    daemon.archive.close()
    return 1e6 * spent / (len(batches) * BATCH)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200_000, help="opens per run (default 200,000)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aw-record-cost-") as tmp:
        files = Path(tmp) / "files"
        files.mkdir()
        for i in range(FILES):
            (files / f"f{i}").touch()
        for name, with_policy in (("no policy", False), ("policy in force", True)):
            us = cost(Path(tmp) / name.replace(" ", "-"), files, args.records, with_policy)
            print(f"{name}: {us:.1f} µs CPU per record ({1e6 / us:,.0f} records per CPU second)")


if __name__ == "__main__":
    main()
