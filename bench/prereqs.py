"""What the bench needs on the machine: Debian packages, the compiled C
workload, and the list of tracepoints agentwarden attaches to."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
BPF_SOURCE = REPO_DIR / "bpf" / "agentwarden.bpf.c"
WORKLOAD_SOURCE = BENCH_DIR / "workload.c"

# Debian package -> the command the bench needs from it.
REQUIRED_PACKAGES = {"gcc": "gcc", "libc6-dev": None}
# Comparison monitors: without them their column is skipped, not the bench.
OPTIONAL_PACKAGES = {"bpftrace": "bpftrace", "auditd": "auditctl"}

_TRACEPOINT = re.compile(r"^TRACEPOINT_PROBE\((\w+),\s*(\w+)\)", re.M)


class BenchError(RuntimeError):
    pass


def _installed(package: str) -> bool:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package],
                            capture_output=True, text=True)
    return result.returncode == 0 and "install ok installed" in result.stdout


def _apt_install(packages: list[str]) -> str | None:
    """Install with apt-get; the error text, or None on success."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]):
        result = subprocess.run(argv, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines()
            return lines[-1] if lines else f"{' '.join(argv[:2])} exited {result.returncode}"
    return None


def ensure_packages(log, comparison: bool = True) -> dict[str, str]:
    """Install what is missing (idempotent); the comparison monitors only when
    the untagged comparison runs (`comparison`). Returns {package: why unusable}
    for optional packages that could not be installed."""
    wanted = {**REQUIRED_PACKAGES, **(OPTIONAL_PACKAGES if comparison else {})}
    missing = [p for p in wanted if not _installed(p)]
    if missing:
        log(f"installing {' '.join(missing)} (apt-get)")
        error = _apt_install(missing)
        if error:
            log(f"apt-get failed: {error}")
    unusable = {}
    for package, command in wanted.items():
        if _installed(package) and (command is None or shutil.which(command)):
            continue
        if package in REQUIRED_PACKAGES:
            raise BenchError(f"{package} is missing and could not be installed; "
                             f"fix: apt-get install {package}")
        unusable[package] = f"{package} is not installed and apt-get could not install it"
    return unusable


def build_workload(workdir: Path) -> Path:
    binary = workdir / "workload"
    result = subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(WORKLOAD_SOURCE)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise BenchError(f"gcc could not build {WORKLOAD_SOURCE}:\n{result.stderr}")
    return binary


def agentwarden_tracepoints() -> list[tuple[str, str]]:
    """(category, event) of every tracepoint the BPF program attaches to, read
    from its source so the comparison monitors watch exactly the same set."""
    found = _TRACEPOINT.findall(BPF_SOURCE.read_text())
    if not found:
        raise BenchError(f"no TRACEPOINT_PROBE found in {BPF_SOURCE}")
    return found


def traced_syscalls(tracepoints: list[tuple[str, str]]) -> list[str]:
    """Syscall names behind the sys_enter_* tracepoints."""
    return [event[len("sys_enter_"):] for category, event in tracepoints
            if category == "syscalls" and event.startswith("sys_enter_")]


@dataclass(frozen=True)
class Workload:
    """The compiled C helper (bench/workload.c). Each call is one fresh process,
    so a monitor started in between sees it from its first syscall."""
    binary: Path

    def _run(self, *args) -> dict:
        result = subprocess.run([str(self.binary), *map(str, args)], capture_output=True,
                                text=True, timeout=600)
        if result.returncode != 0:
            raise BenchError(f"workload {' '.join(map(str, args))} failed: {result.stderr.strip()}")
        return json.loads(result.stdout)

    def ns_per_open(self, count: int, path: Path) -> float:
        out = self._run("open", count, path)
        return out["elapsed_ns"] / out["ops"]

    def ns_per_exec(self, count: int, program: str) -> float:
        out = self._run("exec", count, program)
        return out["elapsed_ns"] / out["ops"]

    def open_at_rate(self, rate: int, seconds: float, files_dir: Path, files: int,
                     cgroup_procs: Path | None = None) -> dict:
        """{"ops", "elapsed_ns", "late_ticks"}; joins the cgroup first if given."""
        args = ["rate", rate, seconds, files_dir, files]
        if cgroup_procs is not None:
            args.append(cgroup_procs)
        return self._run(*args)
