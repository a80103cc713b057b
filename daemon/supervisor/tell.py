"""One line on a held task's own stderr (setting hold_messages): that its
call is held, denied or timed out.

The supervisor is root, so it never writes where the agent could not:
it writes only when the task's fd 2 is open for writing (its fdinfo flags),
to that very file (the O_PATH handle taken through /proc/PID/fd/2 must be the
inode fdinfo named, on the same mount), and only to a regular file, a pipe
or FIFO, or a terminal -- opening any other device could act on it. The
write never blocks (O_NONBLOCK: a full pipe loses the line) and never takes
a controlling terminal (O_NOCTTY); one write of at most PIPE_BUF bytes, so a
reader sees it whole.
"""
from __future__ import annotations

import os
import select
import stat

TERMINAL_MAJORS = {4, 5, *range(136, 144)}   # tty, console/ptmx, pts (Documentation/admin-guide/devices.txt)


def _fdinfo(path: str) -> dict[str, str]:
    with open(path) as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def _writable_target(pid: int) -> int | None:
    """An O_PATH fd of the file the task's fd 2 writes to, or None."""
    info = _fdinfo(f"/proc/{pid}/fdinfo/2")
    if int(info["flags"], 8) & os.O_ACCMODE not in (os.O_WRONLY, os.O_RDWR):
        return None
    handle = os.open(f"/proc/{pid}/fd/2", os.O_PATH | os.O_CLOEXEC)
    try:
        mine = _fdinfo(f"/proc/self/fdinfo/{handle}")
        st = os.fstat(handle)
    except OSError:
        os.close(handle)
        raise
    same = info.get("ino") and (mine.get("mnt_id"), mine.get("ino")) == (info.get("mnt_id"), info.get("ino"))
    kind_ok = (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)
               or (stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) in TERMINAL_MAJORS))
    if same and kind_ok:
        return handle
    os.close(handle)
    return None


def tell(pid: int, line: str) -> bool:
    """Write line (a newline added) to task pid's stderr; False when it was not written."""
    data = ("agentwarden: " + line).encode("utf-8", "replace")[: select.PIPE_BUF - 1] + b"\n"
    try:
        handle = _writable_target(pid)
    except (OSError, KeyError, ValueError):
        return False
    if handle is None:
        return False
    try:
        fd = os.open(f"/proc/self/fd/{handle}",
                     os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_APPEND | os.O_CLOEXEC)
    except OSError:
        return False   # e.g. a FIFO with no reader left (ENXIO)
    finally:
        os.close(handle)
    try:
        return os.write(fd, data) == len(data)
    except OSError:
        return False   # a full pipe (EAGAIN), a hung-up terminal
    finally:
        os.close(fd)
