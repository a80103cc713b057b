"""The CLI's contract (docs/cli.md), for every command: the tree is walked, so
a new command is covered by itself (and must be added to INVOCATIONS).

Each command runs for real (a subprocess, `python -m agentwarden`) with bad
input, with the daemon down, with the sockets a stopped daemon leaves behind,
and as a non-root user (setpriv to nobody when this runs as root; as itself
otherwise): one clean line on stderr, no traceback, the documented exit code.
No root, no kernel needed; the parts that need a daemon are in
test_kernel_cli_contract.py."""
from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import pytest
import typer
import typer.testing
import zmq

from agentwarden import wire
from agentwarden.cli import output
from agentwarden.cli.commands import app
from agentwarden.cli.manpage import commands, write_pages

ROOT = typer.main.get_command(app)
LEAVES = {path: cmd for path, cmd in commands(ROOT) if path and not isinstance(cmd, click.MultiCommand)}
GROUPS = {path: cmd for path, cmd in commands(ROOT) if isinstance(cmd, click.MultiCommand)}
IS_ROOT = os.geteuid() == 0
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if IS_ROOT else []

POLICY = ('[agent.coder]\nmode = "enforce"\non-violation = "kill"\n'
          '[agent.coder.exec]\nallow = ["/usr/bin/git"]\n')

# Commands that run for long or become another program print no result of their own.
NO_JSON = {("up",), ("probe",), ("daemon",), ("run",), ("log", "export"), ("fleet", "archive")}

# Codes: 1 problem, 2 usage, 3 daemon unreachable, 4 permission (docs/cli.md).
# Per command: a valid invocation, and its code as nobody, with the daemon down,
# with stale sockets (None: that situation does not concern the command, or
# would act on this host as root).
DAEMON = {"down": 3, "stale": 3}
INVOCATIONS: dict[tuple, tuple[list[str], dict]] = {
    ("up",): (["up"], {"nobody": 4}),
    ("probe",): (["probe"], {"nobody": 4}),
    ("daemon",): (["daemon"], {"nobody": 4}),
    ("tag",): (["tag", "aw-contract-none", "--agent", "a"], {"nobody": 4}),
    ("untag",): (["untag", "aw-contract-none"], {"nobody": 4}),
    ("agents",): (["agents"], {"nobody": 4}),
    ("freeze",): (["freeze", "--agent", "aw-contract-none"], {"nobody": 4}),
    ("thaw",): (["thaw", "--agent", "aw-contract-none"], {"nobody": 4}),
    ("kill",): (["kill", "--agent", "aw-contract-none"], {"nobody": 4}),
    ("run",): (["run", "--agent", "aw-contract-none", "--", "/bin/true"], {"nobody": 4}),
    ("status",): (["status"], {"nobody": 4, **DAEMON}),
    ("tail",): (["tail"], {"nobody": 4, **DAEMON}),
    ("holds", "show"): (["holds", "show", "h1-0000"], {"nobody": 4, **DAEMON}),
    ("approve",): (["approve", "h1-0000"], {"nobody": 4, **DAEMON}),
    ("deny",): (["deny", "h1-0000"], {"nobody": 4, **DAEMON}),
    ("policy", "reload"): (["policy", "reload"], {"nobody": 4, **DAEMON}),
    ("policy", "check"): (["policy", "check", "{policy}"], {"nobody": 0}),
    ("policy", "explain"): (["policy", "explain", "--agent", "coder", "--policy", "{policy}",
                             "--exec", "/usr/bin/git"], {"nobody": 0}),
    ("config",): (["config"], {"nobody": 0}),
    ("agent-config",): (["agent-config"], {"nobody": 1}),     # no definitions in an empty directory
    ("doctor",): (["doctor"], {"nobody": 1}),                 # not root: a required check fails
    ("log", "verify"): (["log", "verify"], {"nobody": 4}),
    ("log", "show"): (["log", "show"], {"nobody": 4}),
    ("log", "search"): (["log", "search", "--agent", "a"], {"nobody": 4}),
    ("log", "replay"): (["log", "replay", "s1"], {"nobody": 4}),
    ("log", "export"): (["log", "export"], {"nobody": 4}),
    ("drift", "show"): (["drift", "show", "c-0000000000"], {"nobody": 4}),
    ("drift", "revert"): (["drift", "revert", "c-0000000000"], {"nobody": 4, **DAEMON}),
    ("drift", "accept"): (["drift", "accept", "c-0000000000"], {"nobody": 4, **DAEMON}),
    ("drift", "baseline"): (["drift", "baseline", "/etc/hosts"], {"nobody": 4, **DAEMON}),
    # The fleet's commands talk to NATS, not to this host's daemon: without
    # fleet_url (or --url) they say so; keygen needs nothing.
    ("fleet", "keygen"): (["fleet", "keygen", "alice", "--out", "/nonexistent/alice.key"], {"nobody": 1}),
    ("fleet", "init"): (["fleet", "init"], {"nobody": 2}),
    ("fleet", "holds"): (["fleet", "holds"], {"nobody": 2}),
    ("fleet", "status"): (["fleet", "status"], {"nobody": 2}),
    ("fleet", "tail"): (["fleet", "tail"], {"nobody": 2}),
    ("fleet", "approve"): (["fleet", "approve", "h1-0000", "--key", "/nonexistent"], {"nobody": 1}),
    ("fleet", "deny"): (["fleet", "deny", "h1-0000", "--key", "/nonexistent"], {"nobody": 1}),
    ("fleet", "archive"): (["fleet", "archive"], {"nobody": 2}),
}
# `holds` is a group that runs by itself.
INVOCATIONS[("holds",)] = (["holds"], {"nobody": 4, **DAEMON})
INVOCATIONS[("drift",)] = (["drift"], {"nobody": 4})

# Bad values for options (beyond the unknown option every command gets): usage, 2.
BAD_VALUES = [
    ["tail", "--kind", "nosuch"],
    ["tail", "--count", "many"],
    ["approve", "h1-0000", "--remember", "0"],
    ["approve", "h1-0000", "--remember", "inf"],
    ["policy", "explain", "--agent", "coder"],
    ["log", "search"],
    ["log", "show", "--since", "last tuesday"],
    ["log", "export", "--format", "cef"],
    ["freeze"],
    ["--set", "health_interval=soon", "config"],
    ["--set", "archive_retain_age=0.5x", "config"],
    ["--set", "archive_sync_interval=5m", "config"],
    ["--color", "purple", "config"],
    ["nosuch-command"],
]


@pytest.fixture(scope="module")
def dirs():
    """Directories nobody can reach where it should (0755) and cannot where it should not."""
    base = Path(tempfile.mkdtemp(prefix="aw-contract-"))
    base.chmod(0o755)
    made = {}
    for name in ("down", "stale", "closed", "state", "policy", "agents"):
        made[name] = base / name
        made[name].mkdir(mode=0o755)
        made[name].chmod(0o755)
    for name in ("control.sock", "events.sock", "ingest.sock", "sessions.sock"):
        for where in ("stale", "closed"):
            kind = socket.SOCK_SEQPACKET if name == "sessions.sock" else socket.SOCK_STREAM
            left = socket.socket(socket.AF_UNIX, kind)
            left.bind(str(made[where] / name))   # bound, never listening: what a killed daemon leaves
            left.close()
            os.chmod(made[where] / name, 0o777)
    made["closed"].chmod(0o700 if IS_ROOT else 0o000)   # the run dir of root's daemon
    (made["state"] / "archive").mkdir(mode=0o700)
    (made["state"] / "drift").mkdir(mode=0o700)   # root's alone, as the daemon makes it
    (made["state"] / "archive" / "lock").write_text("")
    if not IS_ROOT:
        (made["state"] / "archive").chmod(0o000)
        (made["state"] / "drift").chmod(0o000)
    (made["policy"] / "coder.toml").write_text(POLICY)
    os.chmod(made["policy"] / "coder.toml", 0o644)
    yield made
    for path in made.values():
        path.chmod(0o755)
    (made["state"] / "archive").chmod(0o755)
    (made["state"] / "drift").chmod(0o755)
    shutil.rmtree(base)


def cli(args: list[str], run_dir: Path, dirs: dict, as_nobody: bool = False, **kw) -> subprocess.CompletedProcess:
    flags = ["--set", f"run_dir={run_dir}", "--set", f"state_dir={dirs['state']}",
             "--set", f"policy_dir={dirs['policy']}", "--set", f"agents_dir={dirs['agents']}"]
    args = [a.replace("{policy}", str(dirs["policy"] / "coder.toml")) for a in args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWARDEN_")}
    env["AGENTWARDEN_CONFIG"] = os.devnull   # no host config file
    return subprocess.run([*(NOBODY if as_nobody else []), sys.executable, "-m", "agentwarden", *flags, *args],
                          capture_output=True, text=True, timeout=60, env=env, **kw)


def assert_clean(result: subprocess.CompletedProcess, code: int, what) -> None:
    """The documented code; no traceback; a failure ends with one error line
    (and a usage, daemon or permission failure is only that line)."""
    assert result.returncode == code, (what, result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr, (what, result.stderr)
    if code in (2, 3, 4):
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("agentwarden: error: "), (what, result.stderr)
        assert result.stdout == "", (what, result.stdout)
    elif code != 0 and result.stderr.strip():
        assert result.stderr.splitlines()[-1].startswith("agentwarden: error: "), (what, result.stderr)


def run_all(jobs):
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda job: (job[0], job[1](), job[2]), jobs))


def test_every_command_has_an_invocation_here():
    assert set(INVOCATIONS) == set(LEAVES) | {("holds",), ("drift",)}, \
        "a new command: add it to INVOCATIONS with its codes (and to docs/cli.md)"


def test_every_printing_command_has_json():
    missing = [" ".join(path) for path, cmd in LEAVES.items()
               if path not in NO_JSON and not any("--json" in p.opts for p in cmd.params)]
    assert not missing and any("--json" in p.opts for p in GROUPS[("holds",)].params), missing


def test_help_short_and_long_on_every_command():
    for path in [*LEAVES, *GROUPS]:
        for flag in ("-h", "--help"):
            result = typer.testing.CliRunner().invoke(app, [*path, flag], prog_name="agentwarden")
            assert result.exit_code == 0, (path, flag, result.output)
            assert result.output.startswith(f"Usage: agentwarden {' '.join(path)}".rstrip()), result.output


def test_unknown_option_on_every_command_is_one_usage_line(dirs):
    jobs = [(path, (lambda path=path: cli([*path, "--no-such-option"], dirs["down"], dirs)), 2)
            for path in [*LEAVES, *GROUPS] if path]
    for path, result, code in run_all(jobs):
        assert_clean(result, code, path)
        assert "--no-such-option" in result.stderr and f"agentwarden {' '.join(path)} --help" in result.stderr


@pytest.mark.parametrize("args", BAD_VALUES, ids=" ".join)
def test_bad_values_are_usage_errors(dirs, args):
    assert_clean(cli(args, dirs["down"], dirs), 2, args)


def test_every_command_with_the_daemon_down_and_with_stale_sockets(dirs):
    jobs = [((path, where), (lambda args=args, where=where: cli(args, dirs[where], dirs)), codes[where])
            for path, (args, codes) in INVOCATIONS.items() for where in ("down", "stale") if where in codes]
    assert len(jobs) == 2 * 10   # the commands that talk to the daemon
    for (path, where), result, code in run_all(jobs):
        assert_clean(result, code, (path, where))
        said = "nothing listens on" if where == "stale" else "the daemon is not running"
        assert said in result.stderr and "agentwarden up" in result.stderr, (path, result.stderr)


def test_every_command_as_a_user_without_rights(dirs):
    jobs = [(path, (lambda args=args: cli(args, dirs["closed"], dirs, as_nobody=True)), codes["nobody"])
            for path, (args, codes) in INVOCATIONS.items()]
    for path, result, code in run_all(jobs):
        assert_clean(result, code, path)
        if code == 4:
            assert "root" in result.stderr, (path, result.stderr)
            assert "FAILED" not in result.stdout and "no agent" not in result.stdout


def test_json_output_parses(dirs):
    for args, check in (
            (["config", "--json"], lambda v: v["settings"]["archive_compress"] == "xz"),
            (["doctor", "--json"], lambda v: {c["name"] for c in v["checks"]} >= {"root", "bcc", "seccomp"}),
            (["policy", "check", "--json", "{policy}"], lambda v: v["ok"] and v["agents"] == ["coder"]),
            (["policy", "explain", "--json", "--agent", "coder", "--policy", "{policy}", "--exec", "/usr/bin/git"],
             lambda v: v["verdict"] == "allow" and "exec.allow" in v["rule"])):
        result = cli(args, dirs["down"], dirs)
        assert "Traceback" not in result.stderr, result.stderr
        assert check(json.loads(result.stdout)), result.stdout


def test_policy_explain_exits_by_verdict(dirs):
    base = ["policy", "explain", "--agent", "coder", "--policy", "{policy}"]
    assert cli([*base, "--exec", "/usr/bin/git"], dirs["down"], dirs).returncode == 0
    denied = cli([*base, "--exec", "/usr/bin/curl", "--json"], dirs["down"], dirs)
    assert denied.returncode == 1 and json.loads(denied.stdout)["verdict"] == "violation"


def test_config_prints_toml_with_the_archive_settings(dirs):
    import tomllib
    result = cli(["--set", "archive_retain_age=90d", "--set", "health_interval=1s", "config"], dirs["down"], dirs)
    shown = tomllib.loads(result.stdout)
    assert shown["exec_fast_path"] is True and shown["hold_messages"] is True
    assert shown["archive_retain_age"] == 90 * 86400 and shown["health_interval"] == 1.0
    assert shown["archive_segment_bytes"] == 64 << 20


def test_version_and_color(dirs):
    version = cli(["--version"], dirs["down"], dirs)
    assert version.returncode == 0 and version.stdout.startswith("agentwarden ")
    for extra_env, flags, coloured in (({}, ["--color", "always"], True), ({"NO_COLOR": "1"}, [], False),
                                       ({}, ["--color", "never"], False), ({}, [], False)):   # piped: auto is off
        result = subprocess.run([sys.executable, "-m", "agentwarden", *flags, "doctor"], capture_output=True,
                                text=True, timeout=60, env={**os.environ, **extra_env})
        assert ("\x1b[" in result.stdout) == coloured, (flags, extra_env, result.stdout)


def test_completion_with_debians_typer(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "SHELL": "/bin/bash"}
    installed = subprocess.run([sys.executable, "-m", "agentwarden", "--install-completion"],
                               capture_output=True, text=True, timeout=60, env=env)
    assert installed.returncode == 0, installed.stderr
    scripts = list(home.rglob("agentwarden*"))
    assert scripts and "_AGENTWARDEN_COMPLETE=complete_bash" in scripts[0].read_text()
    words = subprocess.run([sys.executable, "-m", "agentwarden"], capture_output=True, text=True, timeout=60,
                           env={**env, "_AGENTWARDEN_COMPLETE": "complete_bash",
                                "COMP_WORDS": "agentwarden policy ex", "COMP_CWORD": "2"})
    assert words.stdout.split() == ["explain"]


def test_man_pages_one_per_command(tmp_path):
    pages = write_pages(app, tmp_path)
    names = {p.name for p in pages}
    assert names == {"-".join(("agentwarden", *path)) + ".1.gz" for path, _ in commands(ROOT)}
    if shutil.which("man"):
        shown = subprocess.run(["man", "--warnings", "-l", str(tmp_path / "agentwarden-policy-explain.1.gz")],
                               capture_output=True, text=True, timeout=60, env={**os.environ, "MANWIDTH": "100"})
        assert shown.returncode == 0 and "EXIT STATUS" in shown.stdout and "--exec" in shown.stdout
        assert shown.stderr == "", shown.stderr


# -- Ctrl-C and a daemon that goes away, against real sockets --------------------

@pytest.fixture
def feed(tmp_path):
    """A real ZeroMQ publisher where the daemon's event feed is."""
    pub = zmq.Context.instance().socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(f"ipc://{tmp_path / 'events.sock'}")
    yield pub
    pub.close()


def start(args, run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "agentwarden", "--set", f"run_dir={run_dir}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_tail_interrupted_exits_130_quietly(tmp_path, feed):
    tail = start(["tail"], tmp_path)
    assert feed.poll(30_000), "tail never subscribed"
    feed.recv()
    tail.send_signal(signal.SIGINT)
    out, err = tail.communicate(timeout=30)
    assert tail.returncode == 130 and "Traceback" not in err and "Abort" not in err and err.strip() == "", err


def test_tail_says_when_the_daemon_goes_away(tmp_path, feed):
    tail = start(["tail", "--kind", "exec", "--kind", "gap"], tmp_path)
    assert feed.poll(30_000), "tail never subscribed"
    feed.recv()
    feed.send_multipart([wire.TOPIC_EVENTS, wire.encode_batch(
        "daemon", 1, [{"kind": "gap", "time": time.time_ns(), "count": 2, "stage": "ring", "detail": None}])])
    time.sleep(0.2)   # let the record reach tail before the socket closes (this test's only order)
    feed.close()
    out, err = tail.communicate(timeout=30)
    assert tail.returncode == 3, (out, err)
    assert "LOST 2 records" in out
    assert err.splitlines() == [err.strip()] and "the daemon went away" in err


def test_holds_watch_interrupted_exits_130_quietly(tmp_path):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(str(tmp_path / "sessions.sock"))
    server.listen(8)
    answered = threading.Semaphore(0)

    def answer():
        # The supervisor's answer to `holds`, over a real socket.
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.send(wire.pack({"ok": True, "holds": []}))
                answered.release()

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    watch = start(["holds", "--watch"], tmp_path)
    # Asked twice: it has printed the first answer and is watching.
    assert answered.acquire(timeout=30) and answered.acquire(timeout=30)
    watch.send_signal(signal.SIGINT)
    out, err = watch.communicate(timeout=30)
    server.close()
    assert watch.returncode == 130 and "Aborted" not in err and "Traceback" not in err, err
    assert "no pending holds" in out


def test_a_reader_that_goes_away_ends_it_quietly(dirs):
    """`agentwarden config | head -1`: exit 0, nothing on stderr (click alone would exit 1)."""
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-m", "agentwarden", "config"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env={**os.environ, "AGENTWARDEN_CONFIG": os.devnull})
        assert proc.stdout.readline().startswith(b"# files read")
        proc.stdout.close()
        assert (proc.wait(timeout=60), proc.stderr.read()) == (0, b"")
        proc.stderr.close()
