"""The supervisor process, started by the daemon (daemon/main.py) as
`python -m agentwarden.daemon.supervisor [--config F] [--set K=V] [--release-fd N]
[--listener SESSION=FD ...]` (listeners the service manager kept across a restart)."""
from __future__ import annotations

import argparse
import ctypes
import os
import signal

from agentwarden import journal, settings as settings_mod
from agentwarden.settings import Settings

from .loop import Supervisor

PR_SET_PDEATHSIG = 1


def main(settings: Settings, release_fd: int | None = None,
         inherited: list[tuple[str, int]] | None = None) -> None:
    """The supervisor process: dies with the daemon that started it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        return  # the daemon is already gone
    journal.setup_logging("supervisor")
    supervisor = Supervisor(settings, release_fd, inherited or [])
    signal.signal(signal.SIGTERM, lambda *_: supervisor.stop())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when to stop
    supervisor.run()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="agentwarden-supervisor")
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--release-fd", type=int, help="the daemon's pair for release records")
    parser.add_argument("--listener", action="append", default=[],
                        help="SESSION=FD: a session's listener kept across a restart")
    flags = parser.parse_args()
    settings_mod.use_flags(flags.config, flags.set)
    kept = [(name, int(fd)) for name, fd in (item.rsplit("=", 1) for item in flags.listener)]
    main(Settings.from_env(), flags.release_fd, kept)
