"""Acting on a verdict: kill a process (whole cgroups: `agentwarden.cgroups`).

Each action returns a short text of what was done (it goes into the
violation record); failures say why instead of raising, because a failed
action must still be recorded. A text says "killed" only when the kill ended
the process: a violation is often judged after the process has exited on its
own (a short-lived tool), and a signal to a zombie "succeeds" all the same.
"""
from __future__ import annotations

import fcntl
import os
import select
import signal
import struct
import time

# How long a SIGKILL may take to start ending the process before the record
# says it had not yet (uninterruptible sleep; the daemon waits this long at most).
KILL_WAIT = 0.1   # seconds
EXIT_POLL = 0.001   # seconds between looks for PF_EXITING while waiting
PF_EXITING = 0x4    # include/linux/sched.h: the task is in do_exit

# include/uapi/linux/pidfd.h: ioctl(pidfd, PIDFD_GET_INFO, struct pidfd_info),
# whose first published size (PIDFD_INFO_SIZE_VER0, 64 bytes) ends with
# `__s32 exit_code` (Linux 6.15+: set once the process has been reaped, with
# PIDFD_INFO_EXIT in mask). The kernel takes the struct size from the ioctl
# number, so the 64-byte version works on kernels with a larger struct.
PIDFD_INFO_SIZE_VER0 = 64
PIDFD_INFO_EXIT = 1 << 3
PIDFD_INFO_EXIT_CODE_OFFSET = 60
PIDFD_GET_INFO = (3 << 30) | (PIDFD_INFO_SIZE_VER0 << 16) | (0xFF << 8) | 11  # _IOWR(0xFF, 11, ...)


def kill_process(pid: int) -> str:
    """SIGKILL through a pidfd, so a recycled pid is never hit; says whether
    the kill ended the process or the process had ended before it."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return f"process {pid} had already exited"
    except OSError as exc:
        return f"could not open process {pid}: {exc.strerror}"
    try:
        if _ended(pidfd, 0):   # a zombie (or reaped since pidfd_open)
            return f"process {pid} had already exited ({_how(_exit_status(pidfd, pid))})"
        if exiting(pid):
            return f"process {pid} was already exiting"
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            return f"process {pid} had already exited ({_how(_exit_status(pidfd, pid))})"
        except OSError as exc:  # refused (no CAP_KILL): recorded, not fatal
            return f"could not kill process {pid}: {exc.strerror}"
        if not _dying(pidfd, pid, KILL_WAIT):
            return f"sent SIGKILL to process {pid}, which had not ended {KILL_WAIT:g} s later"
        if not _ended(pidfd, 0):
            # In do_exit since our SIGKILL, not before: tearing down (a large
            # address space, BPF programs) can take long after that.
            return f"killed process {pid}"
        status = _exit_status(pidfd, pid)
        if status is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            return f"killed process {pid}"
        if status is None:
            return f"sent SIGKILL to process {pid}, which ended (how is unknown)"
        return f"process {pid} exited before the kill took effect ({_how(status)})"
    finally:
        os.close(pidfd)


def exiting(pid: int) -> bool:
    """Whether the process is in do_exit (PF_EXITING): dying, though its pidfd
    is readable only once it is done."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return bool(int(f.read().rsplit(b")", 1)[1].split()[6]) & PF_EXITING)
    except (OSError, IndexError, ValueError):
        return False


def _dying(pidfd: int, pid: int, timeout: float) -> bool:
    """Whether the process ends or starts exiting within timeout."""
    deadline = time.monotonic() + timeout
    while True:
        if _ended(pidfd, EXIT_POLL) or exiting(pid):
            return True
        if time.monotonic() >= deadline:
            return False


def _ended(pidfd: int, timeout: float) -> bool:
    """Whether the process has exited (its pidfd is readable), waiting up to timeout."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def _exit_status(pidfd: int, pid: int) -> int | None:
    """The wait status of an exited process: from the pidfd once it is reaped,
    from /proc while it is a zombie; None when neither tells."""
    status = _pidfd_exit_status(pidfd)
    if status is None:
        status = _zombie_exit_status(pidfd, pid)
    if status is None:
        status = _pidfd_exit_status(pidfd)   # reaped between the two looks
    return status


def _pidfd_exit_status(pidfd: int) -> int | None:
    info = bytearray(PIDFD_INFO_SIZE_VER0)
    struct.pack_into("<Q", info, 0, PIDFD_INFO_EXIT)
    try:
        fcntl.ioctl(pidfd, PIDFD_GET_INFO, info)
    except OSError:   # before 6.13 (ENOTTY, EINVAL), or another pid namespace's process
        return None
    if not struct.unpack_from("<Q", info, 0)[0] & PIDFD_INFO_EXIT:
        return None   # not reaped yet, or before 6.15
    return struct.unpack_from("<i", info, PIDFD_INFO_EXIT_CODE_OFFSET)[0]


def _zombie_exit_status(pidfd: int, pid: int) -> int | None:
    """exit_code, the last field of /proc/PID/stat, of a zombie. Trusted only
    if the pidfd's process is still unreaped after the read: then the pid was
    not reused in between, and the stat was that process's."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] not in (b"Z", b"X"):
        return None
    try:
        signal.pidfd_send_signal(pidfd, 0)   # fails with ESRCH once reaped
    except OSError:
        return None
    return int(fields[-1])


def _how(status: int | None) -> str:
    if status is None:
        return "how is unknown"
    if os.WIFEXITED(status):
        return f"exit status {os.WEXITSTATUS(status)}"
    try:
        name = signal.Signals(os.WTERMSIG(status)).name
    except ValueError:
        name = f"signal {os.WTERMSIG(status)}"
    return f"ended by {name}"
