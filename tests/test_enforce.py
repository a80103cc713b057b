"""kill_process on real processes: the text says "killed" only when the kill
ended the process."""
from __future__ import annotations

import os
import platform
import subprocess

import pytest

from agentwarden.daemon import enforce


def _zombie(argv: list[str]) -> subprocess.Popen:
    """A child that has exited and is not yet reaped."""
    proc = subprocess.Popen(argv)
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    return proc


def test_a_running_process_is_killed():
    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert enforce.kill_process(proc.pid) == f"killed process {proc.pid}"
    finally:
        proc.kill()
    assert proc.wait(timeout=10) == -9


@pytest.mark.parametrize("argv,how", [
    (["sh", "-c", "exit 3"], "exit status 3"),
    (["sh", "-c", "kill -TERM $$"], "ended by SIGTERM"),
])
def test_a_zombie_had_already_exited(argv, how):
    proc = _zombie(argv)
    assert enforce.kill_process(proc.pid) == f"process {proc.pid} had already exited ({how})"
    proc.wait()


def test_a_reaped_process_had_already_exited():
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert enforce.kill_process(proc.pid) == f"process {proc.pid} had already exited"


def test_the_exit_status_of_a_reaped_process_comes_from_its_pidfd():
    proc = subprocess.Popen(["sh", "-c", "exit 5"])
    pidfd = os.pidfd_open(proc.pid)
    try:
        proc.wait()
        status = enforce._exit_status(pidfd, proc.pid)
    finally:
        os.close(pidfd)
    # PIDFD_INFO_EXIT came with Linux 6.15; before it a reaped process's status is unknown.
    newer = tuple(int(p) for p in platform.release().split(".")[:2]) >= (6, 15)
    assert status == (5 << 8 if newer else None)


@pytest.mark.parametrize("status,how", [(None, "how is unknown"), (0, "exit status 0"),
                                        (9, "ended by SIGKILL"), (40, "ended by signal 40")])
def test_how(status, how):
    assert enforce._how(status).endswith(how)
