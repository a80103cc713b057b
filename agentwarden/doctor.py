"""Checks every prerequisite and says how to fix what is missing."""
from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from . import cgroups

TRACEFS = Path("/sys/kernel/tracing")
SYS_BPF = 321  # x86_64
# Inode numbers of the initial namespaces (include/linux/proc_ns.h).
PROC_PID_INIT_INO = 0xEFFFFFFC
PROC_CGROUP_INIT_INO = 0xEFFFFFFB
BPF_MAP_CREATE = 0
BPF_MAP_TYPE_ARRAY = 2


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def _root() -> Check:
    ok = os.geteuid() == 0
    return Check("root", ok, "running as root" if ok else f"running as uid {os.geteuid()}",
                 "run agentwarden as root (sudo)")


def _bcc() -> Check:
    try:
        import bcc  # noqa: F401
    except ImportError:
        return Check("bcc", False, "python module bcc not importable",
                     "apt-get install python3-bpfcc; use a venv made with --system-site-packages")
    return Check("bcc", True, f"bcc from {os.path.dirname(bcc.__file__)}")


def _bpf_syscall() -> Check:
    if platform.machine() != "x86_64":
        return Check("bpf", True, "not checked on this architecture", required=False)
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 30)()
    attr[0], attr[1], attr[2], attr[3] = BPF_MAP_TYPE_ARRAY, 4, 4, 1
    fd = libc.syscall(SYS_BPF, BPF_MAP_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        return Check("bpf", False, f"bpf() failed: {os.strerror(err)}",
                     "run as root with CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN); in a "
                     "container, allow the bpf() syscall (e.g. --system-call-filter=bpf)")
    os.close(fd)
    return Check("bpf", True, "bpf() creates maps")


def _btf() -> Check:
    ok = Path("/sys/kernel/btf/vmlinux").exists()
    return Check("btf", ok, "/sys/kernel/btf/vmlinux present" if ok else "no kernel BTF",
                 "not needed by the tracepoint-only program; later backends want "
                 "CONFIG_DEBUG_INFO_BTF=y", required=False)


def _tracefs() -> Check:
    not_open = Check("tracefs", False, f"{TRACEFS} is not open to this user",
                     "run `agentwarden doctor` as root (sudo) to check tracefs")
    try:
        if not os.access(TRACEFS, os.X_OK) and TRACEFS.exists():
            return not_open
        mounted = (TRACEFS / "events").is_dir()
    except PermissionError:    # Path.is_dir raises EACCES (only ENOENT and the like are False)
        return not_open
    if mounted:
        ok = (TRACEFS / "events/syscalls/sys_enter_openat").is_dir()
        return Check("tracefs", ok,
                     f"mounted at {TRACEFS}" if ok else "mounted, but no syscall tracepoints",
                     "the kernel needs CONFIG_FTRACE_SYSCALLS=y")
    return Check("tracefs", False, f"not mounted at {TRACEFS}; the probe mounts it at start",
                 f"mount -t tracefs tracefs {TRACEFS}", required=False)


def _headers() -> Check:
    build = Path("/lib/modules") / platform.release() / "build"
    ok = build.exists()
    target = os.path.realpath(build) if ok else ""
    return Check("kernel headers", ok, f"{build} -> {target}" if ok else f"missing: {build}",
                 f"apt-get install linux-headers-{platform.release()}; when Debian has none for "
                 f"this kernel: apt-get install linux-headers-{_debian_arch()} (the .deb links "
                 "them; from a source tree, scripts/setup.sh does) - the program reads only "
                 "tracepoint arguments, so headers of another version compile it")


def _debian_arch() -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def _cgroup2() -> Check:
    try:
        root = cgroups.cgroup2_root()
    except cgroups.CgroupError as exc:
        return Check("cgroup v2", False, str(exc), "mount -t cgroup2 none /sys/fs/cgroup/unified")
    freeze = (root / "cgroup.freeze").exists() or any(root.glob("*/cgroup.freeze"))
    return Check("cgroup v2", True, f"mounted at {root}" + ("" if freeze else " (no cgroup.freeze)"))


def _seccomp() -> Check:
    try:
        actions = Path("/proc/sys/kernel/seccomp/actions_avail").read_text().split()
    except OSError:
        return Check("seccomp", False, "seccomp not available", "a kernel with CONFIG_SECCOMP_FILTER=y")
    if "user_notif" not in actions:
        return Check("seccomp", False, "no seccomp user notification", "kernel 5.0 or newer")
    if importlib.util.find_spec("seccomp") is None:   # Debian's python3-seccomp
        return Check("seccomp", False, "user_notif available, python module seccomp missing",
                     "apt-get install python3-seccomp")
    return Check("seccomp", True, "user_notif available, libseccomp bindings present")


def _namespace_inode(kind: str) -> int | None:
    try:
        return os.stat(f"/proc/self/ns/{kind}").st_ino
    except OSError:
        return None


def _cgroup_namespace() -> Check:
    ino = _namespace_inode("cgroup")
    if ino in (None, PROC_CGROUP_INIT_INO):
        return Check("cgroup namespace", True, "the host's")
    return Check("cgroup namespace", False,
                 "inside a cgroup namespace: BPF numbers cgroup depths from the host's root, "
                 "which cannot be seen from here, so no agent would be seen",
                 "run agentwarden in the host's cgroup namespace (systemd-nspawn: "
                 "SYSTEMD_NSPAWN_USE_CGNS=0; docker: --cgroupns=host)")


def _pid_namespace() -> Check:
    ino = _namespace_inode("pid")
    if ino in (None, PROC_PID_INIT_INO):
        return Check("pid namespace", True, "the host's", required=False)
    return Check("pid namespace", False,
                 "inside a PID namespace: BPF reports the host's process ids, so killing one "
                 "process and reading an agent's /proc do not work here (kill-agent, freeze "
                 "and everything else do)",
                 "run agentwarden in the host's PID namespace (on the host itself, or docker "
                 "--pid=host)", required=False)


def _cgroup_migration(mountinfo: str = "/proc/self/mountinfo") -> Check:
    """Whether joining a cgroup waits for an RCU grace period: writing
    cgroup.procs takes the kernel's threadgroup rwsem for writing, which
    waits for one unless the hierarchy favours dynamic changes. Each
    `agentwarden run` joins its session cgroup so (sessions.md, Start-up)."""
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.readlines()
    except OSError as exc:
        return Check("cgroup joins", False, f"cannot read {mountinfo}: {exc.strerror}", required=False)
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields = right.split()
        if sep and fields[0] == "cgroup2" and len(fields) >= 3:
            point = cgroups.unescape_mount_field(left.split()[4])
            if "favordynmods" in fields[2].split(","):
                return Check("cgroup joins", True, f"{point} favours dynamic changes (favordynmods)",
                             required=False)
            return Check("cgroup joins", False,
                         f"{point} is mounted without favordynmods: each `agentwarden run` waits "
                         "for an RCU grace period (about 10 ms) to join its session cgroup",
                         f"mount -o remount,favordynmods {point} (forks and exits get a little "
                         "slower; a kernel built with CONFIG_CGROUP_FAVOR_DYNMODS=y does it by default)",
                         required=False)
    return Check("cgroup joins", False, "cgroup v2 is not mounted", required=False)


CHECKS = (_root, _bcc, _bpf_syscall, _btf, _tracefs, _headers, _cgroup2, _cgroup_migration,
          _cgroup_namespace, _pid_namespace, _seccomp)


def run_checks() -> list[Check]:
    return [_guarded(check) for check in CHECKS]


def _guarded(check) -> Check:
    """A check that could not look (permission, a file gone) says so instead of failing doctor."""
    try:
        return check()
    except OSError as exc:
        name = check.__name__.strip("_").replace("_", " ")
        where = f" {exc.filename}" if exc.filename else ""
        return Check(name, False, f"could not check:{where} {exc.strerror or exc}",
                     "run `agentwarden doctor` as root (sudo)")
