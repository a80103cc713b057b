"""Kernel prerequisites and loading the BPF program with BCC."""
from __future__ import annotations

import logging
import os
import platform
import subprocess
import time
from pathlib import Path

from agentwarden.doctor import PROC_PID_INIT_INO
from agentwarden.errors import AgentwardenError, NeedsRoot
from agentwarden.headers import bpf_dir
from agentwarden.settings import KEYS

log = logging.getLogger("agentwarden.probe")

TRACEFS = Path("/sys/kernel/tracing")
PROGRAM = "agentwarden.bpf.c"
EXIT_FORMAT = "events/sched/sched_process_exit/format"
# Syscalls newer than the oldest kernel the program loads on (5.8, the ring
# buffer): their tracepoints are attached where the kernel has them
# (AW_HAVE_SYS_<NAME>); elsewhere the calls do not exist to be made.
OPTIONAL_SYSCALLS = ("fchmodat2", "mount_setattr")


def kernel_headers_dir() -> Path:
    return Path("/lib/modules") / platform.release() / "build"


def ensure_tracefs() -> Path:
    """Syscall tracepoints need tracefs; mount it when it is missing."""
    if (TRACEFS / "events").is_dir():
        return TRACEFS
    fix = f"fix: mount -t tracefs tracefs {TRACEFS} (the kernel needs CONFIG_FTRACE)"
    try:
        TRACEFS.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AgentwardenError(f"tracefs is not mounted and {TRACEFS} cannot be created "
                               f"({exc.strerror}); {fix}") from None
    result = subprocess.run(["mount", "-t", "tracefs", "tracefs", str(TRACEFS)],
                            capture_output=True, text=True)
    if result.returncode != 0 or not (TRACEFS / "events").is_dir():
        raise AgentwardenError(
            f"tracefs is not mounted at {TRACEFS} and mounting it failed "
            f"({result.stderr.strip() or 'no events directory'}); {fix}")
    return TRACEFS


def check_kernel_headers() -> Path:
    build = kernel_headers_dir()
    if not (build / "include").is_dir() and not (build / "Makefile").exists():
        raise AgentwardenError(
            f"no kernel headers at {build}: BCC needs them to compile the BPF program; "
            f"fix: apt-get install linux-headers-{platform.release()}, or when Debian has none "
            "for this kernel its generic headers linked there (the .deb does that when "
            "linux-headers-<arch> is installed; from a source tree, scripts/setup.sh does)")
    return build


def load_bcc():
    try:
        import bcc  # Debian's python3-bpfcc
    except ImportError:
        raise AgentwardenError(
            "the BCC Python module is missing; fix: apt-get install python3-bpfcc "
            "(and use a venv made with --system-site-packages)") from None
    return bcc


def compile_and_attach(wakeup_interval: float = KEYS["wakeup_interval"].default):
    """Compile, load and attach the program; returns the bcc.BPF object.
    wakeup_interval: seconds, the `wakeup_interval` setting. Says so on the
    log before and after: compiling takes seconds, and nothing else is said meanwhile."""
    started = time.monotonic()
    bpf = _compile_and_attach(wakeup_interval)
    log.info("BPF program loaded and attached in %.1f s", time.monotonic() - started)
    return bpf


def _compile_and_attach(wakeup_interval: float):
    if os.geteuid() != 0:
        raise NeedsRoot("loading the BPF program")
    tracefs = ensure_tracefs()
    check_kernel_headers()
    bcc = load_bcc()
    cflags = [f"-I{bpf_dir()}", f"-DAW_WAKEUP_INTERVAL_NS={round(wakeup_interval * 1e9)}ULL",
              *pid_namespace_cflags()]
    # sched_process_exit says whether the whole process ends (newer kernels).
    if "group_dead" in (tracefs / EXIT_FORMAT).read_text():
        cflags.append("-DAW_HAVE_GROUP_DEAD=1")
    cflags += [f"-DAW_HAVE_SYS_{name.upper()}=1" for name in OPTIONAL_SYSCALLS
               if (tracefs / f"events/syscalls/sys_enter_{name}").is_dir()]
    log.info("compiling the BPF program (BCC, against the headers in %s)…", kernel_headers_dir())
    if exec_stash_supported():
        try:
            return bcc.BPF(src_file=str(bpf_dir() / PROGRAM).encode(), cflags=cflags + ["-DAW_EXEC_STASH=1"])
        except Exception as exc:  # BCC raises bare Exception; its details went to stderr
            log.warning("loading without the exec stash (session execs' filenames are read by the "
                        "supervisor, a few microseconds slower): %s", exc)
    try:
        return bcc.BPF(src_file=str(bpf_dir() / PROGRAM).encode(), cflags=cflags)
    except Exception as exc:  # BCC raises bare Exception; its details went to stderr
        raise AgentwardenError(f"failed to load BPF program: {exc} (see the compiler or "
                               "verifier output above; `agentwarden doctor` checks "
                               "the prerequisites)") from None




def pid_namespace_cflags() -> list[str]:
    """In a pid namespace (a container), session approvals name threads by
    their ids there, as the supervisor's notifications do: the BPF program
    translates with bpf_get_ns_current_pid_tgid (the probe and the daemon,
    hence its supervisor, share this namespace)."""
    ns = os.stat("/proc/self/ns/pid")
    if ns.st_ino == PROC_PID_INIT_INO:
        return []
    return [f"-DAW_PIDNS_DEV={ns.st_dev}ULL", f"-DAW_PIDNS_INO={ns.st_ino}ULL"]


def exec_stash_supported() -> bool:
    """The sched_switch program reads a waiting thread's syscall registers at
    x86-64's ptrace-ABI offsets, through helpers that need the kernel's BTF."""
    return platform.machine() == "x86_64" and Path("/sys/kernel/btf/vmlinux").exists()
