"""`agentwarden up`: the daemon and the probe as child processes, in the
foreground, until SIGTERM or SIGINT or a child's exit; then both are stopped,
the probe first."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Callable

from agentwarden import control, settings as settings_mod
from agentwarden.errors import AgentwardenError
from agentwarden.settings import Settings

PARTS = ("daemon", "probe")          # in the order they start
# Probe first, so its last records reach the daemon before it closes.
STOP_ORDER = ("probe", "daemon")
STOP_TIMEOUT = 15.0                  # seconds a part may take to exit on SIGTERM before it is killed
POLL_INTERVAL = 0.2                  # seconds between looks at the children


def run_probe_and_daemon(settings: Settings, ready_timeout: float, on_ready: Callable[[], None]) -> None:
    """Start both, call `on_ready` once the daemon reports the probe healthy
    (within `ready_timeout` seconds), and wait. Raises AgentwardenError when a
    part failed and no signal asked them to stop."""
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    flags = settings_mod.flag_args()
    # Under a Type=notify service, `up` is the one that talks to systemd.
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    children: dict[str, subprocess.Popen] = {}
    for part in PARTS:
        children[part] = subprocess.Popen([sys.executable, "-m", "agentwarden", *flags, part], env=env)
    try:
        deadline = time.monotonic() + ready_timeout
        while not stopping and time.monotonic() < deadline:
            if any(c.poll() is not None for c in children.values()):
                break
            try:
                if control.request(settings, "status", timeout=1)["status"]["probe"]["health"]:
                    on_ready()
                    break
            except AgentwardenError:
                pass
            time.sleep(POLL_INTERVAL)
        while not stopping and all(c.poll() is None for c in children.values()):
            time.sleep(POLL_INTERVAL)
    finally:
        for part in STOP_ORDER:
            child = children[part]
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    child.kill()
    failed = {p: c.returncode for p, c in children.items() if c.returncode not in (0, -signal.SIGTERM)}
    if failed and not stopping:
        raise AgentwardenError("stopped: " + ", ".join(f"{p} exited with {rc}" for p, rc in failed.items()))
