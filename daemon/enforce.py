"""Acting on a verdict: kill a process (whole cgroups: `agentwarden.cgroups`).

Each action returns a short text of what was done (it goes into the
violation record); failures say why instead of raising, because a failed
action must still be recorded.
"""
from __future__ import annotations

import os
import signal


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
