"""A real daemon process fed by a fake probe: batches of wire records pushed
over the daemon's real ZeroMQ ingest socket. For archive tests that restart,
kill or starve the daemon many times (loading the BPF program each time would
take seconds); the records follow the wire schema exactly."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import zmq

from agentwarden import control, wire
from conftest import stop_process
from agentwarden.errors import AgentwardenError
from agentwarden.settings import Settings

TASK_DEFAULTS = {"tid": 0, "ppid": 1, "uid": 0, "gid": 0, "comm": "agent"}


def task(kind: str, pid: int, cgroup_id: int, **fields) -> dict:
    record = {"kind": kind, "time": time.time_ns(), "pid": pid, **TASK_DEFAULTS, "tid": pid,
              "cgroup_id": cgroup_id, "agent_cgroup_id": cgroup_id}
    record.update(fields)
    return record


def exec_record(pid: int, cgroup_id: int, argv: list[str], path: str | None = None, **fields) -> dict:
    path = path or argv[0]
    return task("exec", pid, cgroup_id, syscall="execve", filename=path, exec_path=path, argv=argv,
                argv_truncated=False, dirfd=-100, at_flags=0, ret=0, error=None,
                died_before_return=False, filename_unreadable=False, filename_truncated=False,
                killed_in_kernel=False, kernel_rule=None, not_approved=False, comm=os.path.basename(path)[:15], **fields)


def open_record(pid: int, cgroup_id: int, path: str, flags: int = os.O_RDONLY, ret: int = 3,
                **fields) -> dict:
    return task("open", pid, cgroup_id, syscall="openat", path=path, dirfd=-100, flags=flags, mode=0,
                resolve=0, ret=ret, error=None, path_unreadable=False, path_truncated=False,
                killed_in_kernel=False, kernel_rule=None, **fields)


def tags_record(agents: dict[int, dict]) -> dict:
    return {"kind": "tags", "time": time.time_ns(),
            "agents": {str(k): {"level": 2, "watched": True, **v} for k, v in agents.items()}}


class Daemon:
    """`agentwarden daemon` alone, with its own directories and settings."""

    def __init__(self, tmp: Path, env: dict | None = None, state_dir: Path | None = None,
                 wrapper: list[str] | None = None):
        self.tmp = tmp
        self.wrapper = wrapper or []  # a command that execs its arguments (unshare ...)
        self.settings = Settings(run_dir=tmp / "run", state_dir=state_dir or tmp / "state",
                                 policy_dir=tmp / "policy")
        self.settings.policy_dir.mkdir(exist_ok=True)
        self.env = {**os.environ, "AGENTWARDEN_RUN_DIR": str(self.settings.run_dir),
                    "AGENTWARDEN_STATE_DIR": str(self.settings.state_dir),
                    "AGENTWARDEN_POLICY_DIR": str(self.settings.policy_dir), **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log_path = tmp / "daemon.log"

    def start(self, timeout: float = 15.0) -> "Daemon":
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen([*self.wrapper, sys.executable, "-m", "agentwarden", "daemon"], env=self.env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited {self.proc.returncode}:\n{self.output()}")
            try:
                self.status(timeout=0.5)
                return self
            except AgentwardenError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"the daemon did not answer:\n{self.output()}")
                time.sleep(0.02)

    def output(self) -> str:
        return self.log_path.read_text()

    def status(self, timeout: float = 2.0) -> dict:
        return control.request(self.settings, "status", timeout=timeout)["status"]

    def archive_state(self) -> dict:
        return self.status()["daemon"]["archive_state"]

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def stop(self) -> int:
        if not self.proc:
            return 0
        code = stop_process(self.proc)
        self.log.close()
        return code

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "agentwarden", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)


class FakeProbe:
    """Pushes batches to the daemon's ingest socket, as the probe does."""

    def __init__(self, settings: Settings):
        self.sock = zmq.Context.instance().socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100)
        self.sock.connect(settings.ingest_endpoint)
        self.seq = 0

    def send(self, records: list[dict], block: bool = True) -> bool:
        try:
            self.sock.send(wire.encode_batch("probe", self.seq, records), 0 if block else zmq.NOBLOCK)
        except zmq.Again:
            return False
        self.seq += 1
        return True

    def close(self) -> None:
        self.sock.close()
