"""Acting on a verdict: kill a process, kill or freeze an agent's cgroup.

Each action returns a short text of what was done (it goes into the
violation record); failures say why instead of raising, because a failed
action must still be recorded.
"""
from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path


def kill_process(pid: int) -> str:
    """SIGKILL through a pidfd, so a recycled pid is never hit."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return f"process {pid} already gone"
    except OSError as exc:
        return f"could not open process {pid}: {exc.strerror}"
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return f"killed process {pid}"
    except ProcessLookupError:
        return f"process {pid} already gone"
    except OSError as exc:  # refused (no CAP_KILL): recorded, not fatal
        return f"could not kill process {pid}: {exc.strerror}"
    finally:
        os.close(pidfd)


def kill_cgroup(path: Path) -> str:
    """cgroup.kill: every process in the cgroup and below it, atomically."""
    try:
        (path / "cgroup.kill").write_text("1")
    except OSError as exc:
        return f"could not kill cgroup {path}: {exc.strerror}"
    return f"killed every process in {path}"


def set_frozen(path: Path, frozen: bool) -> str:
    word = "froze" if frozen else "thawed"
    try:
        (path / "cgroup.freeze").write_text("1" if frozen else "0")
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return f"could not freeze {path}: no cgroup.freeze (cgroup v2 freezer needs kernel 5.2)"
        return f"could not {word[:-1]}e {path}: {exc.strerror}"
    return f"{word} {path}"


def is_frozen(path: Path) -> bool:
    try:
        return "frozen 1" in (path / "cgroup.events").read_text()
    except OSError:
        return False


def wait_frozen(path: Path, timeout: float = 2.0) -> bool:
    """Freezing is asynchronous; cgroup.events says when it is complete."""
    deadline = time.monotonic() + timeout
    while not is_frozen(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True
