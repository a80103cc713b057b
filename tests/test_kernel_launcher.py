"""The compiled session launcher (launcher/agentwarden.c), run as the real
binary the installed `agentwarden` is: a session through it end to end, every
other line handed to the Python CLI, and its own failure paths -- one line,
docs/cli.md's exit code, nothing made, nothing run."""
from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import msgpack
import pytest

from agentwarden import cgroups, session
from agentwarden import seccomp_notify as sn
from conftest import wait_for

pytestmark = pytest.mark.kernel

LAUNCHER = str(session.LAUNCHER)
SHELL = ["/usr/bin/sh", "/usr/bin/dash", "/bin/sh", "/bin/dash"]


@pytest.fixture(scope="module")
def launcher(kernel):
    if not session.LAUNCHER.exists():
        pytest.fail(f"{LAUNCHER} is missing: run `make setup`")
    return LAUNCHER


def launch(args, env, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([LAUNCHER, *args], env=env, capture_output=True, text=True, timeout=60, **kw)


def one_error_line(result: subprocess.CompletedProcess, code: int, message: str) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode == code and len(lines) == 1, (result.returncode, result.stderr)
    assert lines[0].startswith("agentwarden: error: ") and message in lines[0], lines


def sessions_below(path: Path) -> list[str]:
    return [p.name for p in path.iterdir() if p.is_dir() and p.name.startswith("s-")]


@pytest.fixture
def session_agent(warden, agent_cgroup):
    agent = f"l-{os.urandom(3).hex()}"
    cg = agent_cgroup(agent)
    warden.set_policy(agent, (
        f'[agent.{agent}]\nmode = "enforce"\non-violation = "kill"\n'
        f"[agent.{agent}.exec]\nallow = {SHELL + ['/usr/bin/cat', '/usr/bin/git']!r}\nhold = []\n"
        f'[agent.{agent}.files]\nread-allow = ["/**"]\nwrite-allow = ["/dev/null"]\n').replace("'", '"'))
    return agent, cg


def test_a_session_through_the_launcher_is_supervised_and_attributed(launcher, warden, session_agent):
    agent, cg = session_agent
    result = launch(["run", "--agent", agent, "--task=fix #12", "--on-behalf-of", "alice", "--",
                     "sh", "-c", 'echo "$AGENTWARDEN_SESSION"; cat /proc/self/cgroup; git --version; exit 7'],
                    warden.env)
    assert result.returncode == 7, result.stderr   # the command's own status
    lines = result.stdout.splitlines()
    session_id, git = lines[0], lines[-1]
    [cgroup_line] = [line for line in lines if line.startswith("0::")]
    assert session_id.startswith("s-") and cgroup_line.endswith(f"/{cg.path.name}/{session_id}")
    assert git.startswith("git version")
    # The supervisor took the session (its record names what the launcher set) and the
    # exec of a program outside the allow list is refused by it.
    started = wait_for(lambda: [r for r in warden.records() if r.get("kind") == "supervision"
                                and r.get("session") == session_id and r["state"] == "started"],
                       what="the session's supervision record")
    assert (started[0]["agent"], started[0]["task"], started[0]["on_behalf_of"]) == (agent, "fix #12", "alice")
    refused = launch(["run", "--agent", agent, "--", "sh", "-c", "/usr/bin/id; echo $?"], warden.env)
    assert "uid=" not in refused.stdout, refused


def test_every_other_line_goes_to_the_python_cli(launcher, warden):
    help_text = launch(["run", "--help"], warden.env)
    assert help_text.returncode == 0 and "Usage: agentwarden run" in help_text.stdout
    bad = launch(["run", "--agent", "a", "--verbose", "--", "ls"], warden.env)
    assert bad.returncode == 2 and "--verbose" in bad.stderr and "Traceback" not in bad.stderr
    status = launch(["status", "--json"], warden.env)
    assert status.returncode == 0 and '"probe"' in status.stdout


def test_failures_are_one_line_with_the_documented_exit_code(launcher, warden, session_agent, tmp_path):
    agent, cg = session_agent
    no_daemon = {**warden.env, "AGENTWARDEN_RUN_DIR": str(tmp_path / "nothing")}
    stale_dir = tmp_path / "stale"
    stale_dir.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(stale_dir / "sessions.sock"))   # a stopped daemon's socket: nothing listens
    marker = tmp_path / "ran"
    for args, env, code, message in (
            (["--agent", agent, "--", "touch", str(marker)], no_daemon, 3, "the daemon is not running (no socket at"),
            (["--agent", agent, "--", "touch", str(marker)], {**warden.env, "AGENTWARDEN_RUN_DIR": str(stale_dir)},
             3, "nothing listens on"),
            (["--agent", "no-such-agent", "--", "touch", str(marker)], warden.env, 1, "unknown agent 'no-such-agent'"),
            (["--agent", "../up", "--", "touch", str(marker)], warden.env, 1, "invalid agent name '../up'"),
            (["--agent", agent, "--", "/no/such/program"], warden.env, 1, "command not found: /no/such/program"),
            (["--agent", agent, "--", "no-such-program-here"], warden.env, 1, "command not found: no-such-program-here"),
            (["--agent", agent, "--user", "no-such-user-x", "--", "true"], warden.env, 1, "no such user: no-such-user-x"),
            (["--agent", agent, "--group", "root", "--", "true"], warden.env, 1, "--group needs --user")):
        one_error_line(launch(["run", *args], env), code, message)
    stale.close()
    nobody = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", LAUNCHER,
                             "run", "--agent", agent, "--", "touch", str(marker)],
                            env=warden.env, capture_output=True, text=True, timeout=30)
    one_error_line(nobody, 4, "agentwarden run needs root")
    assert not marker.exists() and sessions_below(cg.path) == []


class FakeSupervisor:
    """A real seqpacket server on a run dir's sessions.sock answering `launch`
    with `answer` (bytes), and counting what it was sent."""

    def __init__(self, run_dir: Path, answer: bytes):
        run_dir.mkdir()
        self.requests: list[dict] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.server.bind(str(run_dir / "sessions.sock"))
        self.server.listen(4)
        self.answer = answer
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                data = conn.recv(65536)
                if data:
                    self.requests.append(msgpack.unpackb(data))
                    conn.send(self.answer)

    def close(self):
        self.server.close()


def test_a_supervisor_that_answers_wrong_or_a_missing_probe_stops_it_before_anything_is_made(
        launcher, warden, session_agent, tmp_path):
    agent, cg = session_agent
    marker = tmp_path / "ran"
    good_filter = sn.build_filter()
    for number, (answer, code, message) in enumerate((
            (b"\xc1", 1, "the daemon sent a malformed answer"),
            (msgpack.packb({"ok": False, "error": "not today"}), 1, "the daemon refused the session: not today"),
            (msgpack.packb({"ok": True, "filter": b"\0" * 7, "instance": "x"}), 1, "no session filter"),
            # the filter is fine, but no probe listens in that run dir
            (msgpack.packb({"ok": True, "filter": good_filter, "instance": "x"}), 3, "the probe is not running"))):
        run_dir = tmp_path / f"run{number}"
        fake = FakeSupervisor(run_dir, answer)
        try:
            result = launch(["run", "--agent", agent, "--", "touch", str(marker)],
                            {**warden.env, "AGENTWARDEN_RUN_DIR": str(run_dir)})
        finally:
            fake.close()
        one_error_line(result, code, message)
        assert fake.requests == [{"cmd": "launch"}]
    assert not marker.exists() and sessions_below(cg.path) == []


def test_run_dir_from_the_config_file_and_what_the_launcher_cannot_read_goes_to_python(launcher, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWARDEN_")}
    plain = tmp_path / "plain.toml"
    plain.write_text(f'# a comment\nhealth_interval = 2\nrun_dir = "{tmp_path}/a/../cfg"   # moved\n')
    one_error_line(launch(["run", "--agent", "a", "--", "true"], {**env, "AGENTWARDEN_CONFIG": str(plain)}),
                   3, f"no socket at {tmp_path}/cfg/sessions.sock")
    # A drop-in wins over the file; the environment over both.
    (tmp_path / "config.d").mkdir()
    (tmp_path / "config.d" / "50-run.toml").write_text(f"run_dir = '{tmp_path}/dropin'\n")
    one_error_line(launch(["run", "--agent", "a", "--", "true"], {**env, "AGENTWARDEN_CONFIG": str(plain)}),
                   3, f"no socket at {tmp_path}/dropin/sessions.sock")
    one_error_line(launch(["run", "--agent", "a", "--", "true"],
                          {**env, "AGENTWARDEN_CONFIG": str(plain), "AGENTWARDEN_RUN_DIR": f"{tmp_path}/env"}),
                   3, f"no socket at {tmp_path}/env/sessions.sock")
    (tmp_path / "config.d" / "50-run.toml").unlink()
    # An escape in the value: Python reads it, and starts the launcher with what it read.
    escaped = tmp_path / "escaped.toml"
    escaped.write_text(f'run_dir = "{tmp_path}/\\u0065sc"\n')
    one_error_line(launch(["run", "--agent", "a", "--", "true"], {**env, "AGENTWARDEN_CONFIG": str(escaped)}),
                   3, f"no socket at {tmp_path}/esc/sessions.sock")
    # Global options are the Python CLI's: it resolves them and starts the launcher.
    one_error_line(launch(["--set", f"run_dir={tmp_path}/flag", "run", "--agent", "a", "--", "true"],
                          {**env, "AGENTWARDEN_CONFIG": str(plain)}),
                   3, f"no socket at {tmp_path}/flag/sessions.sock")
    # What Python refuses, it says (a usage problem, 2).
    broken = tmp_path / "broken.toml"
    broken.write_text("run_dir = [[[\n")
    one_error_line(launch(["run", "--agent", "a", "--", "true"], {**env, "AGENTWARDEN_CONFIG": str(broken)}),
                   2, "not valid TOML")
    one_error_line(launch(["run", "--agent", "a", "--", "true"], {**env, "AGENTWARDEN_RUN_DIR": "relative"}),
                   2, "AGENTWARDEN_RUN_DIR")
    one_error_line(launch(["run", "--agent", "a", "--", "true"],
                          {**env, "AGENTWARDEN_CONFIG": str(tmp_path / "missing.toml")}), 2, "does not exist")


# ---- the launcher as the command's parent (clone3 CLONE_INTO_CGROUP) ----------------

PY = "/usr/bin/python3"


@pytest.fixture
def tool_agent(warden, agent_cgroup):
    """An agent whose sessions may run what a coding agent runs (python3, sh, kill)."""
    agent = f"g-{os.urandom(3).hex()}"
    cg = agent_cgroup(agent)
    warden.set_policy(agent, (
        f'[agent.{agent}]\nmode = "enforce"\non-violation = "alert"\n'
        f'[agent.{agent}.exec]\nallow = ["/usr/**", "/bin/**"]\n'
        f'[agent.{agent}.files]\nread-allow = ["/**"]\nwrite-allow = ["/dev/null", "/dev/tty", "/dev/pts/**"]\n'))
    return agent, cg


def cgroup_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text().split("0::", 1)[1].strip()


TRAPS_TERM = ("import os, signal, sys, time\n"
              "def term(sig, frame):\n"
              "    print('got TERM', flush=True)\n"
              "    sys.exit(3)\n"
              "signal.signal(signal.SIGTERM, term)\n"
              "print(os.getpid(), flush=True)\n"
              "time.sleep(60)\n")


def test_the_command_is_born_in_the_session_and_gets_the_signals_sent_to_run(launcher, warden, tool_agent):
    agent, cg = tool_agent
    proc = subprocess.Popen([LAUNCHER, "run", "--agent", agent, "--", PY, "-c", TRAPS_TERM], env=warden.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        child = int(proc.stdout.readline())
        # The command is the launcher's child, in the session cgroup; the launcher stays outside it.
        [session_id] = sessions_below(cg.path)
        assert child != proc.pid and psutil_ppid(child) == proc.pid
        assert cgroup_of(child).endswith(f"/{cg.path.name}/{session_id}")
        assert not cgroup_of(proc.pid).startswith(cgroup_of(child))
        assert (cg.path / session_id / "cgroup.procs").read_text().split() == [str(child)]
        proc.send_signal(signal.SIGTERM)   # as systemd, or a harness's terminate(), sends it
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out.strip() == "got TERM" and proc.returncode == 3, (out, err)


def psutil_ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_run_ends_as_its_command_ended(launcher, warden, tool_agent):
    agent, _ = tool_agent
    run = [LAUNCHER, "run", "--agent", agent, "--"]
    # An exit code is run's; a command killed by a signal kills run with it (no core
    # dump of the launcher), so a shell sees 128+N, as for the command itself.
    assert subprocess.run([*run, "sh", "-c", "exit 42"], env=warden.env, timeout=60).returncode == 42
    killed = subprocess.run([*run, "sh", "-c", "kill -KILL $$"], env=warden.env, timeout=60)
    assert killed.returncode == -signal.SIGKILL
    for sig in (signal.SIGTERM, signal.SIGSEGV, signal.SIGINT):
        shell = subprocess.run(["sh", "-c", f'"$@" sh -c "kill -{sig.name[3:]} \\$\\$"; echo status=$?', "sh", *run],
                               env=warden.env, capture_output=True, text=True, timeout=60)
        assert shell.stdout.strip() == f"status={128 + sig}", (sig, shell)
    # Killing run (a harness's timeout: SIGKILL, which cannot be passed on) kills its command.
    proc = subprocess.Popen([*run, PY, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(60)"],
                            env=warden.env, stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    proc.kill()
    proc.wait()
    wait_for(lambda: not Path(f"/proc/{child}").exists() or
             Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
             what="the command to die with its launcher")


# A small job-control shell: session leader on a new terminal, it runs argv in
# a process group of its own in the foreground, reports a stop and continues
# the job (fg), and prints the job's status.
JOB_SHELL = r"""
import os, signal, sys
signal.signal(signal.SIGTTOU, signal.SIG_IGN)
pid = os.fork()
if pid == 0:
    os.setpgid(0, 0)
    os.tcsetpgrp(0, os.getpgrp())
    os.execv(sys.argv[1], sys.argv[1:])
try:
    os.setpgid(pid, pid)   # as shells do, both sides; the child may already have exec'd (EACCES)
except PermissionError:
    pass
os.tcsetpgrp(0, pid)
while True:
    _, status = os.waitpid(pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):
        break
    print("job stopped by", signal.Signals(os.WSTOPSIG(status)).name, flush=True)
    os.tcsetpgrp(0, pid)
    os.killpg(pid, signal.SIGCONT)
print("job status", os.waitstatus_to_exitcode(status), flush=True)
"""

COUNTS_SIGNALS = ("import signal, sys, time\n"
                  "seen = []\n"
                  "signal.signal(signal.SIGINT, lambda s, f: seen.append('INT'))\n"
                  "print('ready', flush=True)\n"
                  "deadline = time.monotonic() + 3\n"
                  "while time.monotonic() < deadline:\n"
                  "    time.sleep(0.05)\n"
                  "print('seen', seen, flush=True)\n"
                  "sys.exit(5)\n")


def on_a_terminal(argv: list[str], key: bytes, env: dict) -> str:
    """What the job shell and argv print on a new pseudo-terminal, typing key
    (as a user does, on the terminal's side) once the command says ready."""
    import fcntl
    import pty
    import termios
    master, slave = pty.openpty()

    def controlling_terminal():
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([PY, "-c", JOB_SHELL, *argv], stdin=slave, stdout=slave, stderr=slave, env=env,
                            start_new_session=True, preexec_fn=controlling_terminal)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 30
    try:
        while True:
            if not select.select([master], [], [], max(0.0, deadline - time.monotonic()))[0]:
                os.killpg(proc.pid, signal.SIGKILL)   # stuck (a job stopped for good): what it printed fails
                break
            try:
                data = os.read(master, 4096)
            except OSError:   # EIO: every end of the slave is closed
                break
            if not data:
                break
            out += data
            if b"ready" in out and key:
                time.sleep(0.5)   # in its sleep by now
                os.write(master, key)
                key = b""
    finally:
        proc.wait(timeout=60)
        os.close(master)
    return out.decode(errors="replace").replace("\r", "")


def test_ctrl_c_and_ctrl_z_on_a_terminal_reach_the_command_once(launcher, warden, tool_agent):
    agent, _ = tool_agent
    run = [LAUNCHER, "run", "--agent", agent, "--"]
    # Ctrl-C: the terminal signals the foreground group, the command once (run does not add a second).
    out = on_a_terminal([*run, PY, "-c", COUNTS_SIGNALS], b"\x03", warden.env)
    assert "seen ['INT']" in out and "job status 5" in out, out
    # Ctrl-C to a command that does not catch it: run dies of SIGINT too (a shell's loop stops).
    sleeper = "import time; print('ready', flush=True); time.sleep(30)"
    out = on_a_terminal([*run, PY, "-c", sleeper], b"\x03", warden.env)
    assert "job status -2" in out, out
    # Ctrl-Z stops the job (the command, then run as it), fg continues it, it ends normally.
    stops = "import time; print('ready', flush=True); time.sleep(2.5); print('done', flush=True)"
    out = on_a_terminal([*run, PY, "-c", stops], b"\x1a", warden.env)
    assert "job stopped by SIGTSTP" in out and "done" in out and "job status 0" in out, out
