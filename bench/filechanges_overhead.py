"""What the file-change and side-door tracepoints cost a process that is not an agent.

Loads the BPF program (as the probe does, one agent cgroup tagged so that the
filter does its real work), then times bench/workload.c's loops in an untagged
process -- `change` (chmod, rename, rename back, link, unlink on tmpfs) and
`exec` (fork+exec+wait of /bin/true: every fork passes the clone side door's
check) -- alternately with the new tracepoints attached and detached
(everything else attached both times), and prints the medians per call. Run
as root:

    .venv/bin/python bench/filechanges_overhead.py [--rounds 15]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from agentwarden import cgroups
from agentwarden.probe import loader

CHANGES = ["unlink", "unlinkat", "rmdir", "rename", "renameat", "renameat2", "truncate", "ftruncate",
           "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "lchown", "fchown", "fchownat",
           "link", "linkat", "symlink", "symlinkat", "mkdir", "mkdirat"]
SIDEDOORS = ["io_uring_setup", "open_by_handle_at", "unshare", "clone", "clone3", "setns", "mount",
             "umount", "fsopen", "fsmount", "move_mount", "open_tree", "fspick", "mount_setattr",
             "chroot", "pivot_root"]


def tracepoints() -> list[bytes]:
    return [f"syscalls:sys_{edge}_{name}".encode() for name in CHANGES + SIDEDOORS for edge in ("enter", "exit")
            if (loader.TRACEFS / f"events/syscalls/sys_enter_{name}").is_dir()]


def timed(workload: Path, *args: str) -> float:
    """ns per operation of one run of the workload binary."""
    out = json.loads(subprocess.run([str(workload), *args], check=True, capture_output=True, text=True).stdout)
    return out["elapsed_ns"] / out["ops"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=50000, help="change calls per round")
    parser.add_argument("--execs", type=int, default=300, help="fork+execs per round")
    args = parser.parse_args()
    build = Path(tempfile.mkdtemp(prefix="aw-bench-"))
    workload = build / "workload"
    subprocess.run(["gcc", "-O2", "-o", str(workload), str(Path(__file__).parent / "workload.c")], check=True)
    bpf = loader.compile_and_attach()
    root = cgroups.cgroup2_root()
    tagged = root / f"aw-bench-{os.getpid()}"
    tagged.mkdir()
    try:
        level = len(tagged.relative_to(root).parts)
        table = bpf[b"agent_cgroups"]
        table[table.Key(cgroups.cgroup_id(tagged))] = table.Leaf(1)
        config = bpf[b"config"]
        leaf = config.Leaf()
        leaf.tagged_levels = 1 << level
        config[config.Key(0)] = leaf
        points = tracepoints()
        results: dict[str, dict[str, list[float]]] = {"with": {"change": [], "exec": []},
                                                      "without": {"change": [], "exec": []}}
        attached = True
        with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
            for _ in range(args.rounds):
                for config_name in ("without", "with"):
                    want = config_name == "with"
                    if want != attached:
                        for point in points:
                            if want:
                                bpf.attach_tracepoint(tp=point, fn_name=b"tracepoint__" + point.replace(b":", b"__"))
                            else:
                                bpf.detach_tracepoint(point)
                        attached = want
                    results[config_name]["change"].append(timed(workload, "change", str(args.calls), tmp))
                    results[config_name]["exec"].append(timed(workload, "exec", str(args.execs), "/bin/true"))
        for name in ("change", "exec"):
            without = statistics.median(results["without"][name])
            with_ = statistics.median(results["with"][name])
            unit = "change syscall" if name == "change" else "fork+exec+wait"
            print(f"{name:8} without {without:8.0f} ns  with {with_:8.0f} ns  "
                  f"difference {with_ - without:+6.0f} ns per {unit} "
                  f"(medians of {args.rounds} rounds; {len(points)} tracepoints toggled)")
    finally:
        bpf.cleanup()
        tagged.rmdir()
        shutil.rmtree(build)


if __name__ == "__main__":
    main()
