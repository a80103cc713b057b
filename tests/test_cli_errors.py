"""Commands facing a daemon that is down answer with one line, never a traceback."""
from __future__ import annotations

import os
import socket
import subprocess
import sys


def agentwarden(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentwarden", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def test_holds_and_approve_on_a_stale_socket_say_the_daemon_is_down(tmp_path):
    # What a daemon stopped with Ctrl-C leaves: a socket file nobody listens on.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(tmp_path / "sessions.sock"))
    stale.close()
    for args in (["holds"], ["approve", "h1-0000"], ["deny", "h1-0000"]):
        result = agentwarden("--set", f"run_dir={tmp_path}", *args)
        assert result.returncode == 3, result   # daemon unreachable (docs/cli.md)
        assert "Traceback" not in result.stderr
        assert result.stderr.startswith("agentwarden: error: the daemon is not running"), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
