"""The CLI on bad input and missing prerequisites: one clear line, no traceback."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import TEST_CGROUP_PARENT

pytestmark = pytest.mark.kernel

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def cli(*args, env=None, prefix=(), check_clean=True):
    result = subprocess.run([*prefix, sys.executable, "-m", "agentwarden", *args],
                            capture_output=True, text=True, timeout=60, env=env)
    if check_clean:
        assert "Traceback" not in result.stderr + result.stdout, result.stderr
    return result


def test_tag_rejects_what_is_not_a_cgroup(kernel, tmp_path):
    result = cli("tag", str(tmp_path), "--agent", "x")
    assert result.returncode == 1
    assert "is not a cgroup" in result.stderr and "outside the cgroup v2 mount" in result.stderr

    result = cli("tag", f"{TEST_CGROUP_PARENT}/does-not-exist", "--agent", "x")
    assert result.returncode == 1
    assert "no such directory" in result.stderr

    result = cli("tag", TEST_CGROUP_PARENT, "--agent", "bad name!", "--create")
    assert result.returncode == 2
    assert "invalid agent name" in result.stderr


def test_commands_without_root_say_so(kernel, tmp_path):
    env = {**os.environ, "AGENTWARDEN_RUN_DIR": str(tmp_path / "run"),
           "AGENTWARDEN_STATE_DIR": str(tmp_path / "state")}
    for args in (["probe"], ["daemon"], ["up"], ["tag", "x", "--agent", "x"]):
        result = cli(*args, env=env, prefix=NOBODY)
        assert result.returncode == 4, args
        assert "needs root" in result.stderr and "sudo" in result.stderr, (args, result.stderr)


def test_status_and_tail_without_a_daemon(kernel, tmp_path):
    env = {**os.environ, "AGENTWARDEN_RUN_DIR": str(tmp_path / "run"),
           "AGENTWARDEN_STATE_DIR": str(tmp_path / "state")}
    for args in (["status"], ["tail"]):
        result = cli(*args, env=env)
        assert result.returncode == 3
        assert "the daemon is not running" in result.stderr


def _in_private_mount_namespace(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=60)


def test_missing_tracefs_is_mounted_by_the_probe_or_explained(kernel):
    py = sys.executable
    # Unmounted: doctor says so, and the probe's set-up mounts it again.
    result = _in_private_mount_namespace(
        f"while umount /sys/kernel/tracing 2>/dev/null; do :; done; {py} -m agentwarden doctor; "
        f"{py} -c 'from agentwarden.probe.loader import ensure_tracefs; print(\"mounted\", ensure_tracefs())'")
    assert "[warn] tracefs: not mounted at /sys/kernel/tracing; the probe mounts it" in result.stdout
    assert "mounted /sys/kernel/tracing" in result.stdout, result.stderr
    # Cannot be mounted (read-only /sys/kernel): a clear error with the fix.
    result = _in_private_mount_namespace(
        f"while umount /sys/kernel/tracing 2>/dev/null; do :; done; mount -t tmpfs -o ro none /sys/kernel && "
        f"{py} -m agentwarden probe")
    assert result.returncode == 1
    assert "tracefs is not mounted" in result.stderr
    assert "fix: mount -t tracefs tracefs /sys/kernel/tracing" in result.stderr
    assert "Traceback" not in result.stderr


def test_doctor_passes_here(kernel):
    result = cli("doctor")
    assert result.returncode == 0, result.stdout
    for name in ("root", "bcc", "bpf", "kernel headers", "cgroup v2", "seccomp", "tracefs"):
        assert f"] {name}:" in result.stdout
    assert "FAIL" not in result.stdout
