"""The supervisor process, started by the daemon (daemon/main.py) as
`python -m agentwarden.daemon.supervisor [--config F] [--set K=V] [--release-fd N]`."""
from __future__ import annotations

import argparse
import ctypes
import os
import signal

from agentwarden import journal, settings as settings_mod
from agentwarden.settings import Settings

from .loop import Supervisor

PR_SET_PDEATHSIG = 1


def main(settings: Settings, release_fd: int | None = None) -> None:
    """The supervisor process: dies with the daemon that started it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        return  # the daemon is already gone
    journal.setup_logging("supervisor")
    supervisor = Supervisor(settings, release_fd)
    signal.signal(signal.SIGTERM, lambda *_: supervisor.stop())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when to stop
    supervisor.run()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="agentwarden-supervisor")
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--release-fd", type=int, help="the daemon's pair for release records")
    flags = parser.parse_args()
    settings_mod.use_flags(flags.config, flags.set)
    main(Settings.from_env(), flags.release_fd)
