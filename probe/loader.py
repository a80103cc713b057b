"""Kernel prerequisites and loading the BPF program with BCC."""
from __future__ import annotations

import ctypes
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
from .btf import fd_file_cflags

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
    released = release_compiler_memory()
    log.info("BPF program loaded and attached in %.1f s (%.0f MB of the compiler's memory released)",
             time.monotonic() - started, released / 2**20)
    return bpf


# The compiler's libraries (BCC compiles with clang and LLVM in this process):
# once the program is loaded, nothing runs their code until the next compile.
COMPILER_LIBRARIES = ("libLLVM", "libclang")
MADV_DONTNEED = 4


def release_compiler_memory(smaps: Path = Path("/proc/self/smaps")) -> int:
    """Give back what compiling left resident; returns the bytes unmapped.
    The heap's free pages go back to the kernel (malloc_trim), and the
    compiler libraries' pages are dropped from this process (MADV_DONTNEED):
    only read-only private mappings with no page of their own (nothing
    written, no copy-on-write copy), which read back from the file the same
    if they are ever touched again. About 90 of the probe's 150 MB after a
    compile."""
    libc = ctypes.CDLL(None, use_errno=True)
    if hasattr(libc, "malloc_trim"):   # glibc's
        libc.malloc_trim(0)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    released = 0
    for start, end, resident in _clean_compiler_mappings(smaps.read_text()):
        if libc.madvise(start, end - start, MADV_DONTNEED) == 0:
            released += resident
    return released


def _clean_compiler_mappings(text: str) -> list[tuple[int, int, int]]:
    """(start, end, resident bytes) of the compiler libraries' read-only
    private mappings that hold no anonymous page, from smaps' text."""
    found, current = [], None
    for line in text.splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:   # a mapping's header
            path = fields[5] if len(fields) > 5 else ""
            perms = fields[1]
            wanted = (any(name in path for name in COMPILER_LIBRARIES) and "w" not in perms
                      and perms.endswith("p"))
            low, high = (int(x, 16) for x in fields[0].split("-"))
            current = {"range": (low, high), "rss": 0, "anon": 0} if wanted else None
            if current:
                found.append(current)
        elif current is not None and fields[:1] == ["Rss:"]:
            current["rss"] = int(fields[1]) * 1024
        elif current is not None and fields[:1] == ["Anonymous:"]:
            current["anon"] = int(fields[1])
    return [(*m["range"], m["rss"]) for m in found if m["rss"] and not m["anon"]]


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
    fd_cflags, why_not = fd_file_cflags()
    if why_not:
        log.warning("recording every descriptor change (no offsets of the file behind an fd: %s)", why_not)
    cflags += fd_cflags
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
