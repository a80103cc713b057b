"""Structured logging on the real kernel: a real `agentwarden daemon` in a mount
namespace whose /run/systemd/journal/socket is ours, its stderr named by
JOURNAL_STREAM as systemd does. Its log lines and a violation arrive as
libsystemd's own datagrams with their fields; without JOURNAL_STREAM its log
lines stay on stderr. (`make systemd-test` shows the same with a real journald:
`journalctl -o json`.)"""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys

import pytest

from agentwarden import journal
from conftest import wait_for
from fakeprobe import Daemon, FakeProbe, exec_record, tags_record
from test_kernel_sessions import SHELL, _policy

pytestmark = pytest.mark.kernel


def entries(sock: socket.socket) -> list[dict[str, str]]:
    """The journal's native protocol: KEY=VALUE lines, or KEY, newline, a
    little-endian 64-bit size and the value (values with newlines)."""
    out = []
    sock.setblocking(False)
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        fields, i = {}, 0
        while i < len(data):
            end = data.index(b"\n", i)
            line = data[i:end]
            if b"=" in line:
                key, value = line.split(b"=", 1)
                i = end + 1
            else:
                size = struct.unpack("<Q", data[end + 1:end + 9])[0]
                key, value = line, data[end + 9:end + 9 + size]
                i = end + 9 + size + 1
            fields[key.decode()] = value.decode(errors="replace")
        out.append(fields)


@pytest.fixture
def journal_socket(kernel, tmp_path):
    directory = tmp_path / "journal"
    directory.mkdir()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(directory / "socket"))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    yield directory, sock
    sock.close()


def daemon_with_journal(tmp_path, directory, env: dict) -> Daemon:
    return Daemon(tmp_path, env=env, wrapper=[
        "unshare", "--mount", "--propagation", "private", "sh", "-c",
        f"mount -t tmpfs none /run && mkdir /run/systemd && ln -s {directory} /run/systemd/journal"
        ' && exec "$@"', "sh"])


def test_under_systemd_log_lines_and_violations_reach_the_journal_with_fields(journal_socket, tmp_path):
    directory, sock = journal_socket
    agent, cgroup_id = "coder", 4242
    daemon = daemon_with_journal(tmp_path, directory, {})
    (daemon.settings.policy_dir / "coder.toml").write_text(
        _policy(agent, on_violation="alert", exec_allow=SHELL + ["/usr/bin/true"]))
    # stderr is the daemon's log file: JOURNAL_STREAM names it, as systemd would.
    daemon.log_path.touch()
    st = os.stat(daemon.log_path)
    daemon.env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    daemon.start()
    probe = FakeProbe(daemon.settings)
    try:
        running = wait_for(lambda: [e for e in entries(sock) if e.get("MESSAGE", "").startswith("daemon running")],
                           what="the daemon's log line in the journal")[0]
        assert (running["SYSLOG_IDENTIFIER"], running["PRIORITY"]) == ("agentwarden-daemon", "6")
        assert "daemon running" not in daemon.output()   # not on stderr as well

        probe.send([tags_record({cgroup_id: {"agent": agent, "path": "/sys/fs/cgroup/x"}}),
                    exec_record(4243, cgroup_id, ["/usr/bin/id", "-u"])])
        [entry] = wait_for(lambda: [e for e in entries(sock) if e.get("AGENTWARDEN_RECORD") == "violation"],
                           what="the violation's journal entry")
        assert entry["MESSAGE"].startswith("violation: agent coder exec /usr/bin/id -u")
        assert (entry["SYSLOG_IDENTIFIER"], entry["PRIORITY"], entry["AGENTWARDEN_AGENT"],
                entry["AGENTWARDEN_VERDICT"], entry["AGENTWARDEN_PID"], entry["AGENTWARDEN_ACTION_TAKEN"]) == (
                    "agentwarden", "4", "coder", "violation", "4243", "none (alert)")
        assert entry["AGENTWARDEN_SESSION"].startswith("coder-") and entry["AGENTWARDEN_EVENT"] == "exec"
        violations = daemon.status()["notify"]["violations"]
        assert (violations["sent"], violations["dropped"], violations["unavailable"]) == (1, 0, 0)
    finally:
        probe.close()
        daemon.stop()


def test_without_journal_stream_log_lines_stay_on_stderr(journal_socket, tmp_path):
    directory, sock = journal_socket
    daemon = daemon_with_journal(tmp_path, directory, {"JOURNAL_STREAM": "1:1"})  # another stream
    daemon.start()
    try:
        wait_for(lambda: "agentwarden-daemon: daemon running" in daemon.output(), what="the line on stderr")
        assert not [e for e in entries(sock) if e.get("SYSLOG_IDENTIFIER") == "agentwarden-daemon"]
    finally:
        daemon.stop()


def test_fields_and_stderr_detection(tmp_path):
    assert journal.fields(agent="coder", session=None, verdict="deny", approvers=["root", "alice"], seq=0) == {
        "AGENTWARDEN_AGENT": "coder", "AGENTWARDEN_VERDICT": "deny", "AGENTWARDEN_APPROVERS": "root,alice",
        "AGENTWARDEN_SEQ": "0"}
    err = tmp_path / "err"
    err.touch()
    st = os.stat(err)
    code = "from agentwarden import journal; print(journal.stderr_is_journal())"
    for stream, expected in ((f"{st.st_dev}:{st.st_ino}", "True"), (f"{st.st_dev}:{st.st_ino + 1}", "False"),
                             ("nonsense", "False")):
        with open(err, "w") as f:
            out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "JOURNAL_STREAM": stream},
                                 stderr=f, capture_output=False, stdout=subprocess.PIPE, text=True)
        assert out.stdout.strip() == expected, stream
