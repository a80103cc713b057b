"""`agentwarden up`: the daemon and the probe as child processes, in the
foreground, until SIGTERM or SIGINT; then both are stopped, the probe first.

A part that exits meanwhile is started again, as systemd's Restart= would do
for the services: a probe killed by an agent must not end the watch (the
daemon freezes the agents until the new probe watches). A part that keeps
failing — START_LIMIT_BURST exits within START_LIMIT_INTERVAL seconds — stops
`up` with an error, and agents the daemon froze stay frozen (fail closed).

`up` plays systemd's part of the fd-store protocol for the daemon (see
agentwarden/sdnotify.py): the daemon's NOTIFY_SOCKET is a socket `up` serves,
where the session supervisor stores each session's seccomp listener; a
restarted daemon gets them back as LISTEN_FDS, so sessions and their pending
holds outlive a daemon that dies. Only `up`'s own stop closes them: then
sessions fail closed.
"""
from __future__ import annotations

import collections
import ctypes
import os
import resource
import select
import signal
import subprocess
import sys
import time
from typing import Callable

from agentwarden import control, sdnotify, settings as settings_mod
from agentwarden.errors import AgentwardenError
from agentwarden.settings import Settings

PARTS = ("daemon", "probe")          # in the order they start
# Probe first, so its last records reach the daemon before it closes.
STOP_ORDER = ("probe", "daemon")
STOP_TIMEOUT = 15.0                  # seconds a part may take to exit on SIGTERM before it is killed
POLL_INTERVAL = 0.2                  # seconds between looks at the children
# The services' StartLimitBurst / StartLimitIntervalSec.
START_LIMIT_BURST = 5
START_LIMIT_INTERVAL = 60.0
PR_SET_PDEATHSIG = 1                 # prctl(2)


def run_probe_and_daemon(settings: Settings, ready_timeout: float, on_ready: Callable[[], None]) -> int:
    """Start both, call `on_ready` once the daemon reports the probe healthy
    (within `ready_timeout` seconds), restart a part that exits, and wait for
    a signal; return that signal's number. Raises AgentwardenError when a part
    failed to start or keeps failing."""
    stopping = 0

    def stop(signum, _frame):
        nonlocal stopping
        stopping = signum

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    flags = settings_mod.flag_args()
    # Under a Type=notify service, `up` is the one that talks to systemd.
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}

    _refuse_if_running(settings)
    settings.prepare_run_dir()
    # Room for every session's listener (the soft limit is often 1024).
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    store = sdnotify.FdStore(settings.run_dir / "up-notify.sock")

    die_with_up = _dies_with(os.getpid())

    def start(part: str) -> subprocess.Popen:
        argv = [sys.executable, "-m", "agentwarden", *flags, part]
        if part != "daemon":
            return subprocess.Popen(argv, env=env, preexec_fn=die_with_up)
        # The daemon talks to us as to systemd: readiness, and the fd store.
        daemon_env = {**env, "NOTIFY_SOCKET": store.path}
        listen_env, fds = store.handed_over()
        if not fds:
            return subprocess.Popen(argv, env=daemon_env, preexec_fn=die_with_up)
        full_env = {**daemon_env, **listen_env}

        def handed_over():
            die_with_up()
            sdnotify.place_fds_and_exec(argv, full_env, fds)
        return subprocess.Popen(argv, env=full_env, preexec_fn=handed_over)

    def trusted(pid: int) -> bool:
        """The daemon, or a child of it (its session supervisor)."""
        daemon = children.get("daemon")
        return daemon is not None and daemon.poll() is None and daemon.pid in (pid, _parent_of(pid))

    def wait(seconds: float) -> None:
        if select.select([store], [], [], seconds)[0]:
            store.receive(trusted)

    children: dict[str, subprocess.Popen] = {}
    for part in PARTS:
        children[part] = start(part)
    exits: dict[str, collections.deque] = {part: collections.deque() for part in PARTS}
    try:
        deadline = time.monotonic() + ready_timeout
        while not stopping and time.monotonic() < deadline:
            failed = {p: c.returncode for p, c in children.items() if c.poll() is not None}
            if failed:   # before it ever watched: a setup problem, restarting won't help
                raise AgentwardenError("could not start: " + _exits(failed))
            try:
                status = control.request(settings, "status", timeout=1)["status"]
                if status["daemon"]["pid"] == children["daemon"].pid and status["probe"]["health"]:
                    on_ready()
                    break
            except AgentwardenError:
                pass
            wait(POLL_INTERVAL)
        while not stopping:
            for part, child in children.items():
                if child.poll() is None or stopping:
                    continue
                now = time.monotonic()
                recent = exits[part]
                recent.append(now)
                while recent and recent[0] < now - START_LIMIT_INTERVAL:
                    recent.popleft()
                if len(recent) >= START_LIMIT_BURST:
                    raise AgentwardenError(
                        f"the {part} exited {len(recent)} times within {START_LIMIT_INTERVAL:g}s "
                        f"(last: {_exits({part: child.returncode})}); giving up. Agents the daemon "
                        "froze stay frozen: `agentwarden thaw --all` once the cause is fixed")
                print(f"agentwarden: the {part} exited ({_exits({part: child.returncode})}); "
                      f"starting it again", file=sys.stderr, flush=True)
                children[part] = start(part)
            wait(POLL_INTERVAL)
        return stopping
    finally:
        for part in STOP_ORDER:
            child = children[part]
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
        store.close()   # a real stop: the sessions' listeners close, their calls fail (ENOSYS)


def _refuse_if_running(settings: Settings) -> None:
    """Another daemon on these sockets (another `up`, a service, or the parts of
    an `up` that was killed): starting a second one would only fail on its lock."""
    try:
        pid = control.request(settings, "status", timeout=1)["status"]["daemon"]["pid"]
    except AgentwardenError:
        return   # nothing answers: the sockets, if any, are a stopped daemon's
    raise AgentwardenError(f"a daemon already runs on {settings.run_dir} (pid {pid}): stop it first "
                           f"(kill {pid}, or systemctl stop agentwarden-daemon agentwarden-probe), "
                           "or give this one another run_dir and state_dir")


def _dies_with(parent: int) -> Callable[[], None]:
    """For a child, before its exec: SIGTERM when `up` dies, even by SIGKILL
    (PR_SET_PDEATHSIG), so no probe or daemon outlives the `up` that started it."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:   # `up` died before the line above
            os._exit(1)
    return arm


def _exits(codes: dict[str, int]) -> str:
    return ", ".join(f"{part} exited with {code}" if code >= 0 else f"{part} killed by signal {-code}"
                     for part, code in codes.items())


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None
