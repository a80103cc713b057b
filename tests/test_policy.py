"""Policy files, the decision, and `agentwarden policy`. Pure: no kernel, no root."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agentwarden.errors import AgentwardenError
from agentwarden.policy import PolicyError, decide, load_policy
from agentwarden.cli.policy import policy_app

POLICY = """\
# Rules for the test agents.
[agent.coder]
mode = "enforce"
on-violation = "kill"

[agent.coder.exec]
allow = [
    "/usr/bin/git",
    "/usr/bin/python3*",
    "/opt/tools/**",
    "/lib64/ld-linux-x86-64.so.2 /usr/bin/true",
]
hold = ["/usr/bin/git * push *"]
deny = ["/usr/bin/git * push --force *", "/opt/tools/secret/**"]

[agent.coder.files]
read-allow = ["/usr/**", "/etc/*.conf", "/home/coder/**"]
write-allow = ["/home/coder/work/**", "/tmp/*"]
deny = ["/home/coder/.ssh/**"]

[agent.lenient]
mode = "enforce"
on-violation = "kill-agent"
exec.allow = ["/**"]
files.write-allow = ["/**"]

[agent.fdrunner]
mode = "monitor"
on-violation = "freeze"
exec.allow = ["/dev/fd/*", "/proc/self/fd/*"]
exec.hold = ["/memfd:*"]
"""


def line_of(text: str, needle: str) -> int:
    """The number of the first line of `text` that contains `needle`."""
    return next(n for n, line in enumerate(text.splitlines(), 1) if needle in line)


def write(directory: Path, text: str, name: str = "agents.toml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


@pytest.fixture
def policy_file(tmp_path) -> Path:
    return write(tmp_path, POLICY)


@pytest.fixture
def loaded(policy_file):
    return load_policy([policy_file])


def exec_event(path: str, *args: str, agent: str = "coder", **fields) -> dict:
    """An exec record as the daemon hands it on: what was asked for and what ran."""
    event = {"kind": "exec", "agent": agent, "filename": path, "exec_path": path,
             "resolved_filename": path, "resolved_exec_path": path,
             "argv": [path.rsplit("/", 1)[-1], *args], "argv_truncated": False, "ret": 0, "error": None}
    event.update(fields)
    return event


def open_event(path: str, flags: int = os.O_RDONLY, agent: str = "coder", **fields) -> dict:
    event = {"kind": "open", "agent": agent, "path": path, "resolved_path": path,
             "flags": flags, "ret": 3, "error": None}
    event.update(fields)
    return event


def rule_text(policy_file: Path, kind: str, pattern: str) -> str:
    """How a verdict names a rule of POLICY, with the file:line it is written on."""
    return f"{kind} {json.dumps(pattern)} at {policy_file}:{line_of(POLICY, json.dumps(pattern))}"


# ---- precedence -------------------------------------------------------------------

@pytest.mark.parametrize("argv, decision, kind, pattern", [
    (["/usr/bin/git", "status"], "allow", "exec.allow", "/usr/bin/git"),
    (["/usr/bin/git", "push"], "hold", "exec.hold", "/usr/bin/git * push *"),
    (["/usr/bin/git", "-C", "repo", "push", "origin"], "hold", "exec.hold", "/usr/bin/git * push *"),
    # deny beats hold
    (["/usr/bin/git", "push", "--force", "origin"], "deny", "exec.deny", "/usr/bin/git * push --force *"),
    # argv words match whole arguments
    (["/usr/bin/git", "pushy"], "allow", "exec.allow", "/usr/bin/git"),
    (["/usr/bin/python3.11", "-c", "pass"], "allow", "exec.allow", "/usr/bin/python3*"),
    (["/opt/tools/bin/deep/lint"], "allow", "exec.allow", "/opt/tools/**"),
    # deny beats allow
    (["/opt/tools/secret/run"], "deny", "exec.deny", "/opt/tools/secret/**"),
    # whitelist: what no rule allows is a violation
    (["/usr/bin/curl", "https://example.com"], "violation", None, None),
    (["/usr/bin/gitk"], "violation", None, None),
])
def test_exec_precedence(loaded, policy_file, argv, decision, kind, pattern):
    verdict = decide(exec_event(argv[0], *argv[1:]), loaded)
    assert verdict.decision == decision
    assert verdict.rule == (rule_text(policy_file, kind, pattern) if pattern else None)
    assert verdict.action == ("kill" if decision == "violation" else None)
    assert (verdict.mode, verdict.policy_hash) == ("enforce", loaded.hash)


@pytest.mark.parametrize("path, flags, decision, kind, pattern", [
    ("/usr", os.O_RDONLY, "allow", "files.read-allow", "/usr/**"),  # `**` is zero or more components
    ("/usr/lib/x86_64-linux-gnu/libc.so.6", os.O_RDONLY, "allow", "files.read-allow", "/usr/**"),
    ("/etc/app.conf", os.O_RDONLY, "allow", "files.read-allow", "/etc/*.conf"),
    ("/etc/app/app.conf", os.O_RDONLY, "violation", None, None),  # `*` does not cross '/'
    ("/tmp/x", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "allow", "files.write-allow", "/tmp/*"),
    ("/tmp/x/y", os.O_WRONLY, "violation", None, None),
    ("/tmp/x", os.O_RDONLY, "allow", "files.write-allow", "/tmp/*"),  # write-allow also allows reading
    ("/home/coder/notes", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, "allow", "files.read-allow",
     "/home/coder/**"),
    # writes: write access, create, truncate or append; read-allow does not cover them
    ("/home/coder/notes", os.O_RDWR, "violation", None, None),
    ("/home/coder/notes", os.O_RDONLY | os.O_CREAT, "violation", None, None),
    ("/home/coder/notes", os.O_RDONLY | os.O_TRUNC, "violation", None, None),
    ("/home/coder/notes", os.O_RDONLY | os.O_APPEND, "violation", None, None),
    ("/home/coder/work/src/main.py", os.O_WRONLY | os.O_CREAT, "allow", "files.write-allow",
     "/home/coder/work/**"),
    # deny beats allow, for reads and writes
    ("/home/coder/.ssh/id_ed25519", os.O_RDONLY, "deny", "files.deny", "/home/coder/.ssh/**"),
    ("/home/coder/.ssh/authorized_keys", os.O_WRONLY | os.O_APPEND, "deny", "files.deny", "/home/coder/.ssh/**"),
    # /.ssh/** is a directory, not a prefix
    ("/home/coder/.sshrc", os.O_RDONLY, "allow", "files.read-allow", "/home/coder/**"),
])
def test_open_precedence(loaded, policy_file, path, flags, decision, kind, pattern):
    verdict = decide(open_event(path, flags), loaded)
    assert verdict.decision == decision
    assert verdict.rule == (rule_text(policy_file, kind, pattern) if pattern else None)
    assert verdict.action == ("kill" if decision == "violation" else None)


# ---- globs and argv patterns ---------------------------------------------------------

def one_rule_policy(tmp_path: Path, section: str, key: str, rule: str):
    return load_policy([write(tmp_path, f'[agent.a]\nmode = "enforce"\non-violation = "alert"\n'
                                        f'[agent.a.{section}]\n{key} = [{json.dumps(rule)}]\n')])


@pytest.mark.parametrize("glob, path, matches", [
    ("/src/**/*.py", "/src/a.py", True),
    ("/src/**/*.py", "/src/a/b/c.py", True),
    ("/src/**/*.py", "/src/a/b/c.pyc", False),
    ("/src/**/test/*", "/src/test/x", True),
    ("/src/**/test/*", "/src/a/b/test/x", True),
    ("/src/**", "/src", True),
    ("/src/**", "/src/a/b", True),
    ("/src/**", "/srcx", False),
    ("/src/*", "/src/a", True),
    ("/src/*", "/src/a/b", False),
    ("/src/*", "/src", False),
    ("/v?r/log", "/var/log", True),
    ("/v?r/log", "/v/r/log", False),  # `?` does not match '/'
    ("/dev/tty[0-9]", "/dev/tty3", True),
    ("/dev/tty[!0-9]", "/dev/ttyS", True),
    ("/dev/tty[!0-9]", "/dev/tty3", False),
    ("/a(b)+c.d", "/a(b)+c.d", True),  # regex characters are plain characters
    ("/a(b)+c.d", "/abbc_d", False),
    ("/**", "/", True),
    ("/", "/", True),
    ("/", "/etc", False),
])
def test_path_globs(tmp_path, glob, path, matches):
    verdict = decide(open_event(path, agent="a"), one_rule_policy(tmp_path, "files", "read-allow", glob))
    assert verdict.decision == ("allow" if matches else "violation")


@pytest.mark.parametrize("rule, args, matches", [
    ("/usr/bin/git push *", ["push"], True),  # a lone `*` also stands for no arguments
    ("/usr/bin/git push *", ["push", "origin", "main"], True),
    ("/usr/bin/git push *", ["pull"], False),
    ("/usr/bin/git push *", ["-C", "repo", "push"], False),  # positional
    ("/usr/bin/git * push *", ["-C", "repo", "push"], True),
    ("/usr/bin/git push", ["push"], True),
    ("/usr/bin/git push", ["push", "origin"], False),  # without `*`: exactly these arguments
    ("/usr/bin/git", [], True),  # no argv pattern: any arguments
    ("/usr/bin/git", ["anything", "at", "all"], True),
    ("/usr/bin/cp * /etc/*", ["-r", "a", "/etc/ssl/x"], True),  # `*` in a word crosses '/'
    ("/usr/bin/cp * /etc/*", ["a", "/tmp/x"], False),
    ("/usr/bin/git commit -m ?*", ["commit", "-m", "msg"], True),
    ("/usr/bin/git commit -m ?*", ["commit", "-m", ""], False),
    ("'/opt/my tools/run' --fast", ["--fast"], True),  # quoted like a shell line
])
def test_argv_patterns(tmp_path, rule, args, matches):
    policy = one_rule_policy(tmp_path, "exec", "hold", rule)
    path = "/opt/my tools/run" if rule.startswith("'") else rule.split()[0]
    assert decide(exec_event(path, *args, agent="a"), policy).decision == ("hold" if matches else "violation")


def test_argv_zero_is_not_matched(loaded):
    """argv[0] is whatever the caller chose: rules see argv[1:] only."""
    event = exec_event("/usr/bin/git", "push")
    event["argv"][0] = "status"
    assert decide(event, loaded).decision == "hold"


def test_truncated_argv(loaded, policy_file):
    # deny and hold rules with an argv pattern match on the executable alone...
    verdict = decide(exec_event("/usr/bin/git", "status", argv_truncated=True), loaded)
    assert verdict.decision == "deny"
    assert verdict.rule == rule_text(policy_file, "exec.deny", "/usr/bin/git * push --force *")
    assert "argv was cut short" in verdict.reason
    # ...allow rules with one do not match...
    loader = exec_event("/lib64/ld-linux-x86-64.so.2", "/usr/bin/true", argv_truncated=True)
    assert decide(loader, loaded).decision == "violation"
    # ...and rules without argv patterns are unaffected.
    assert decide(exec_event("/usr/bin/python3", argv_truncated=True), loaded).decision == "allow"


# ---- which path: what ran, unresolvable paths, failed calls --------------------------

def test_exec_is_judged_by_what_ran(loaded):
    event = exec_event("/tmp/evil", resolved_filename="/usr/bin/git", filename="/usr/bin/git")
    verdict = decide(event, loaded)
    assert verdict.decision == "violation"
    assert "exec of /tmp/evil" in verdict.reason


def test_failed_exec_falls_back_to_the_path_asked_for(loaded, policy_file):
    """A failed exec never reaches sched_process_exec: the kernel reports nothing that ran."""
    failed = exec_event("/usr/bin/curl", "x", exec_path="", resolved_exec_path=None, ret=-2, error="ENOENT")
    verdict = decide(failed, loaded)
    assert verdict.decision == "violation"
    assert "judged by the path asked for" in verdict.reason
    assert "the call failed (ENOENT)" in verdict.reason
    allowed = exec_event("/usr/bin/git", "status", exec_path="", resolved_exec_path=None, ret=-13, error="EACCES")
    verdict = decide(allowed, loaded)
    assert verdict.decision == "allow"
    assert verdict.rule == rule_text(policy_file, "exec.allow", "/usr/bin/git")


@pytest.mark.parametrize("event", [
    open_event("../../x", agent="lenient", resolved_path=None),
    open_event("x", os.O_WRONLY, agent="lenient", resolved_path=None),
    # the kernel reported what ran, but it could not be resolved: no fallback
    exec_event("./tool", agent="lenient", resolved_exec_path=None, resolved_filename="/usr/bin/ls"),
    exec_event("tool", agent="lenient", exec_path="", resolved_exec_path=None, resolved_filename=None),
])
def test_unresolvable_paths_never_match_an_allow_rule(loaded, event):
    verdict = decide(event, loaded)  # lenient allows "/**"
    assert (verdict.decision, verdict.action, verdict.rule) == ("violation", "kill-agent", None)
    assert "could not be resolved" in verdict.reason


def test_failed_open_is_decided_like_a_success(loaded, policy_file):
    verdict = decide(open_event("/home/coder/.ssh/id_ed25519", ret=-13, error="EACCES"), loaded)
    assert verdict.decision == "deny"
    assert verdict.rule == rule_text(policy_file, "files.deny", "/home/coder/.ssh/**")
    assert "the call failed (EACCES)" in verdict.reason


def test_paths_are_lexical_symlinks_are_the_resolvers_job(tmp_path):
    """decide never touches the file system: it judges the path the resolver put
    in the event. A link in an allowed directory to a denied file is allowed
    under the link's path and denied under the target's."""
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "key").write_text("k")
    (tmp_path / "open").mkdir()
    link = tmp_path / "open" / "link"
    link.symlink_to(tmp_path / "secret" / "key")
    policy_dir = tmp_path / "policy"
    policy_dir.mkdir()
    policy = load_policy([write(policy_dir, f'[agent.a]\nmode = "enforce"\non-violation = "kill"\n'
                                            f'files.read-allow = ["{tmp_path}/**"]\n'
                                            f'files.deny = ["{tmp_path}/secret/**"]\n')])
    assert decide(open_event(str(link), agent="a"), policy).decision == "allow"
    assert decide(open_event(os.path.realpath(link), agent="a"), policy).decision == "deny"


# ---- indirect routes: the dynamic loader, memfd, /proc/self/fd -----------------------

@pytest.mark.parametrize("event", [
    exec_event("/lib64/ld-linux-x86-64.so.2", "/usr/bin/curl", agent="lenient"),
    exec_event("/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", "/usr/bin/curl", agent="lenient"),
    exec_event("/lib/ld-linux-aarch64.so.1", "/usr/bin/curl", agent="lenient"),
    exec_event("/lib/ld-musl-x86_64.so.1", "/usr/bin/curl", agent="lenient"),
    exec_event("/dev/fd/3", agent="lenient"),  # execveat(fd, "", AT_EMPTY_PATH)
    exec_event("/proc/self/fd/3", agent="lenient"),
    exec_event("/proc/4242/fd/3", agent="lenient"),
    exec_event("/memfd:payload (deleted)", agent="lenient", exec_path="", resolved_exec_path=None),
])
def test_indirect_routes_need_a_rule_that_names_them(loaded, event):
    verdict = decide(event, loaded)  # lenient allows "/**", which names no route
    assert (verdict.decision, verdict.action) == ("violation", "kill-agent")
    assert "only an allow rule that names such a path allows it" in verdict.reason


@pytest.mark.parametrize("path", ["/usr/bin/ld", "/usr/lib/x86_64-linux-gnu/libc.so.6", "/dev/fdisk"])
def test_lookalikes_are_not_indirect_routes(loaded, path):
    assert decide(exec_event(path, agent="lenient"), loaded).decision == "allow"


def test_rules_that_name_a_route_allow_it(loaded, policy_file):
    verdict = decide(exec_event("/lib64/ld-linux-x86-64.so.2", "/usr/bin/true"), loaded)
    assert verdict.rule == rule_text(policy_file, "exec.allow", "/lib64/ld-linux-x86-64.so.2 /usr/bin/true")
    assert decide(exec_event("/lib64/ld-linux-x86-64.so.2", "/usr/bin/curl"), loaded).decision == "violation"
    assert decide(exec_event("/dev/fd/3", agent="fdrunner"), loaded).decision == "allow"
    assert decide(exec_event("/proc/self/fd/7", agent="fdrunner"), loaded).decision == "allow"
    memfd = exec_event("/memfd:job (deleted)", agent="fdrunner", exec_path="", resolved_exec_path=None)
    assert decide(memfd, loaded).rule == rule_text(policy_file, "exec.hold", "/memfd:*")


# ---- modes, unknown agents, hashes ---------------------------------------------------

def test_monitor_mode_decides_the_same_and_says_so(tmp_path, loaded):
    monitored = load_policy([write(tmp_path, POLICY.replace('mode = "enforce"\non-violation = "kill"',
                                                            'mode = "monitor"\non-violation = "kill"'),
                                   name="monitor.toml")])
    events = [exec_event("/usr/bin/git", "push"), exec_event("/usr/bin/curl"), exec_event("/opt/tools/secret/x"),
              open_event("/tmp/x", os.O_WRONLY), open_event("/etc/shadow")]
    for event in events:
        enforced, recorded = decide(event, loaded), decide(event, monitored)
        assert (enforced.mode, recorded.mode) == ("enforce", "monitor")
        assert (recorded.decision, recorded.action, recorded.reason) == \
               (enforced.decision, enforced.action, enforced.reason)
        assert recorded.policy_hash == monitored.hash != loaded.hash


def test_agent_without_policy_is_recorded_only(loaded):
    verdict = decide(exec_event("/usr/bin/git", agent="stranger"), loaded)
    assert (verdict.decision, verdict.action, verdict.mode, verdict.rule) == ("violation", "alert", "monitor", None)
    assert "no policy for agent 'stranger'" in verdict.reason


def test_decide_takes_exec_and_open_only(loaded):
    with pytest.raises(ValueError, match="chdir"):
        decide({"kind": "chdir", "agent": "coder", "resolved_path": "/tmp"}, loaded)


REFORMATTED = """\
[agent.fdrunner]
on-violation = "freeze"
mode = "monitor"
exec = { hold = ["/memfd:*"], allow = ["/proc/self/fd/*", "/dev/fd/*"] }
"""
REFORMATTED_REST = """\
[agent.lenient]
files.write-allow = ['/**']
exec.allow = ['/**']
on-violation = 'kill-agent'
mode = 'enforce'
hold-timeout = 300.0

[agent.coder]
on-violation = "kill"
mode = "enforce"
files = { deny = ["/home/coder/.ssh/**"], write-allow = ["/tmp/*", "/home/coder/work/**"], read-allow = ["/home/coder/**", "/etc/*.conf", "/usr/**"] }
[agent.coder.exec]
deny = ["/opt/tools/secret/**", "/usr/bin/git * push --force *"]
hold = ["/usr/bin/git * push *"]
allow = ["/lib64/ld-linux-x86-64.so.2 /usr/bin/true", "/opt/tools/**", "/usr/bin/python3*", "/usr/bin/git"]
"""


def test_hash_is_of_content_not_layout(tmp_path, policy_file, loaded):
    assert load_policy([policy_file]).hash == loaded.hash
    assert loaded.hash.startswith("sha256:") and len(loaded.hash) == len("sha256:") + 64
    split = tmp_path / "split"
    split.mkdir()
    write(split, REFORMATTED, "10-fdrunner.toml")
    write(split, REFORMATTED_REST, "20-rest.toml")
    assert load_policy([split]).hash == loaded.hash
    # Any change in content changes it.
    for old, new in [('"/tmp/*"', '"/tmp/**"'), ('on-violation = "freeze"', 'on-violation = "kill"'),
                     ('mode = "monitor"', 'mode = "enforce"'), ("[agent.fdrunner]", "[agent.fdrunner2]"),
                     ('on-violation = "freeze"', 'on-violation = "freeze"\nhold-timeout = 60')]:
        changed = write(tmp_path, POLICY.replace(old, new, 1), "changed.toml")
        assert load_policy([changed]).hash != loaded.hash, (old, new)
    assert decide(exec_event("/usr/bin/git"), loaded).policy_hash == loaded.hash


# ---- broken files: every problem with its file and line ------------------------------

AGENT = 'mode = "enforce"\non-violation = "kill"\n'


@pytest.mark.parametrize("text, line, message", [
    # bad TOML
    ('[agent.coder]\nmode = enforce\n', 2, "bad TOML: Invalid value (column 8)"),
    ('[agent.coder]\n' + AGENT + '[agent.coder.exec]\nallow = ["/usr/bin/git",\n', 5,
     "bad TOML: Invalid value (at end of document)"),
    ('[agent.coder]\n' + AGENT + 'exec.allow = ["/usr/bin/git"]\n[agent.coder]\n', 5, "bad TOML"),
    # unknown keys, at every level
    ('[agnet.coder]\nmode = "enforce"\n', 1, "unknown key 'agnet'"),
    ('[agent.coder]\n' + AGENT + 'modes = "enforce"\nexec.allow = ["/usr/bin/git"]\n', 4,
     "unknown key 'modes' in [agent.coder]: expected mode, on-violation, hold-timeout, hold-approvers, exec, files, "
     "syscalls"),
    # side doors: known names only, each with its line
    ('[agent.coder]\n' + AGENT + 'exec.allow = ["/usr/bin/git"]\n[agent.coder.syscalls]\nallow = [\n  "unshare",\n'
     '  "io-uring",\n]\n', 8, "syscalls.allow holds \"io-uring\", which is no side door; known: io_uring, "
     "open_by_handle, unshare, setns, mount, chroot, pivot_root"),
    ('[agent.coder]\n' + AGENT + 'exec.allow = ["/usr/bin/git"]\nsyscalls.deny = ["mount"]\n', 5,
     "unknown key 'deny' in [agent.coder.syscalls]: expected allow"),
    ('[agent.coder]\n' + AGENT + 'exec.allow = ["/usr/bin/git"]\nsyscalls = "all"\n', 5,
     "syscalls must be a table"),
    ('[agent.coder]\n' + AGENT + '[agent.coder.exec]\nallow = ["/usr/bin/git"]\nalow = ["/usr/bin/ls"]\n', 6,
     "unknown key 'alow' in [agent.coder.exec]: expected allow, hold, deny"),
    ('[agent.coder]\n' + AGENT + 'exec.allow = ["/usr/bin/git"]\nfiles.read = ["/etc/**"]\n', 5,
     "unknown key 'read' in [agent.coder.files]: expected read-allow, write-allow, deny"),
    ('[agent]\ncoder = { mode = "enforce", on-violation = "kill", exec = { allow = ["/x"], nope = 1 } }\n', 2,
     "unknown key 'nope' in [agent.coder.exec]"),
    # unknown actions and modes, missing ones
    ('[agent.coder]\nmode = "enforce"\non-violation = "stop"\nexec.allow = ["/usr/bin/git"]\n', 3,
     'on-violation = "stop" in [agent.coder]: use one of alert, kill, kill-agent, freeze, hold'),
    ('[agent.coder]\nmode = "enforcing"\non-violation = "kill"\nexec.allow = ["/usr/bin/git"]\n', 2,
     'mode = "enforcing" in [agent.coder]: use one of monitor, enforce'),
    ('\n[agent.coder]\non-violation = "kill"\nexec.allow = ["/usr/bin/git"]\n', 2,
     "no mode in [agent.coder]: use one of monitor, enforce"),
    ('[agent.coder]\n' + AGENT + 'hold-timeout = 0\nexec.allow = ["/usr/bin/git"]\n', 4,
     "hold-timeout must be a positive number of seconds, not 0"),
    # empty agents
    ('# nothing\n[agent.coder]\n' + AGENT, 2, "agent 'coder' has no rules"),
    ('[agent.coder]\n' + AGENT + '[agent.coder.exec]\nallow = []\n', 1, "agent 'coder' has no rules"),
    ('[agent]\n', 1, "defines no agents: add an [agent.NAME] table"),
    ('# empty\n', 1, "defines no agents"),
    # wrong types and names
    ('[agent.coder]\n' + AGENT + 'exec.allow = "/usr/bin/git"\n', 4,
     'exec.allow must be a list of strings, not "/usr/bin/git"'),
    # (a value that is not a string gets the line of its key)
    ('[agent.coder]\n' + AGENT + 'exec.allow = [\n  "/usr/bin/git",\n  7,\n]\n', 4,
     "exec.allow holds 7: rules are strings"),
    ('[agent."bad name"]\n' + AGENT + 'exec.allow = ["/usr/bin/git"]\n', 1, "invalid agent name 'bad name'"),
])
def test_broken_file(tmp_path, text, line, message):
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as caught:
        load_policy([path])
    shown = [str(problem) for problem in caught.value.problems]
    assert any(s.startswith(f"{path}:{line}: ") and message in s for s in shown), shown


BAD_GLOBS = """\
[agent.coder]
mode = "enforce"
on-violation = "kill"
[agent.coder.files]
read-allow = [
    "/usr/**",
    "etc/passwd",
    "/src/**.py",
    "/dev/tty[0-9",
    "/a//b",
    "/a/../b",
    "/x/[z-a]",
]
[agent.coder.exec]
allow = ["/usr/bin/git 'push", "", "/usr/bin/ok"]
"""


def test_bad_globs_are_all_reported_with_their_lines(tmp_path):
    path = write(tmp_path, BAD_GLOBS)
    with pytest.raises(PolicyError) as caught:
        load_policy([path])
    assert [str(p) for p in caught.value.problems] == [
        f'{path}:7: bad rule in files.read-allow: "etc/passwd" is not an absolute path (it must start with \'/\')',
        f'{path}:8: bad rule in files.read-allow: "/src/**.py" \'**\' must be a whole path component '
        f"(as in /src/**/*.py), not '**.py'",
        f'{path}:9: bad rule in files.read-allow: "/dev/tty[0-9" \'[\' at character 4 is never closed',
        f'{path}:10: bad rule in files.read-allow: "/a//b" has an empty, \'.\' or \'..\' component; '
        "paths are normalised before matching, so it would never match",
        f'{path}:11: bad rule in files.read-allow: "/a/../b" has an empty, \'.\' or \'..\' component; '
        "paths are normalised before matching, so it would never match",
        f'{path}:12: bad rule in files.read-allow: "/x/[z-a]" bad character class \'[z-a]\': '
        "bad character range z-a at position 1",
        f'{path}:15: bad rule in exec.allow: "/usr/bin/git \'push" cannot be split into words: No closing quotation',
        f'{path}:15: bad rule in exec.allow: "" is empty',
    ]
    assert str(caught.value) == f"{caught.value.problems[0]} (and 7 more; `agentwarden policy check` lists them all)"


def test_duplicate_agents_across_files(tmp_path):
    first = write(tmp_path, '[agent.coder]\n' + AGENT + 'exec.allow = ["/usr/bin/git"]\n', "10-a.toml")
    second = write(tmp_path, '[agent.other]\n' + AGENT + 'exec.allow = ["/usr/bin/ls"]\n\n'
                             '[agent.coder]\n' + AGENT + 'exec.allow = ["/usr/bin/ls"]\n', "20-b.toml")
    with pytest.raises(PolicyError) as caught:
        load_policy([tmp_path])
    assert [str(p) for p in caught.value.problems] == [
        f"{second}:6: agent 'coder' is already defined at {first}:1"]


def test_missing_files_and_empty_directories(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PolicyError) as caught:
        load_policy([tmp_path / "nope.toml", tmp_path / "empty"])
    assert [str(p) for p in caught.value.problems] == [
        f"{tmp_path / 'nope.toml'}: no such file or directory",
        f"{tmp_path / 'empty'}: holds no *.toml policy files"]


def test_a_directory_is_read_in_name_order(tmp_path):
    directory = tmp_path / "policy.d"
    directory.mkdir()
    write(directory, REFORMATTED_REST, "20-rest.toml")
    write(directory, REFORMATTED, "10-fdrunner.toml")
    write(directory, "not a policy", "README")
    policy = load_policy([directory])
    assert policy.files == (directory / "10-fdrunner.toml", directory / "20-rest.toml")
    assert policy.agents["coder"].source == f"{directory / '20-rest.toml'}:8"


# ---- `agentwarden policy` -------------------------------------------------------------

runner = CliRunner()


def test_check_ok_prints_the_hash(policy_file, loaded):
    result = runner.invoke(policy_app, ["check", str(policy_file)])
    assert result.exit_code == 0, result.output
    assert result.output == f"OK: 1 file, agents coder, fdrunner, lenient; policy {loaded.hash}\n"


def test_check_reads_the_policy_directory_by_default(tmp_path, monkeypatch, loaded):
    monkeypatch.setenv("AGENTWARDEN_POLICY_DIR", str(tmp_path))
    write(tmp_path, POLICY)
    result = runner.invoke(policy_app, ["check"])
    assert result.exit_code == 0, result.output
    assert loaded.hash in result.output


def test_check_lists_every_problem_and_fails(tmp_path):
    path = write(tmp_path, BAD_GLOBS)
    result = runner.invoke(policy_app, ["check", str(path)])
    assert result.exit_code == 1
    assert isinstance(result.exception, AgentwardenError)
    assert str(result.exception) == "the policy has 8 problems; nothing was loaded"
    lines = result.output.splitlines()
    assert len(lines) == 8 and all(line.startswith(f"{path}:") for line in lines)
    assert f"{path}:12: " in result.output


def test_explain_exec(policy_file, loaded):
    result = runner.invoke(policy_app, ["explain", "--agent", "coder", "--policy", str(policy_file),
                                        "--exec", "/usr/bin/git", "--", "-C", "repo", "push"])
    assert result.exit_code == 5, result.output   # explain exits by verdict: 5 hold
    assert result.output.splitlines() == [
        "verdict: hold",
        f"rule:    {rule_text(policy_file, 'exec.hold', '/usr/bin/git * push *')}",
        "reason:  exec of /usr/bin/git -C repo push matches exec.hold and no exec.deny rule",
        "mode:    enforce",
        f"policy:  {loaded.hash}",
    ]


def test_explain_open_normalises_the_path(policy_file):
    result = runner.invoke(policy_app, ["explain", "--agent", "coder", "--policy", str(policy_file),
                                        "--open", "/home/coder//work/../notes", "--write"])
    assert result.exit_code == 1, result.output   # 1: a violation
    assert "verdict: violation (on-violation kill)" in result.output
    assert "rule:    none matched" in result.output
    assert "write of /home/coder/notes matches no allow rule" in result.output


def test_explain_change_needs_both_sides_of_a_rename(policy_file):
    result = runner.invoke(policy_app, ["explain", "--agent", "coder", "--policy", str(policy_file),
                                        "--change", "rename", "/home/coder/work/a", "/home/coder/a"])
    assert result.exit_code == 1, result.output
    assert "verdict: violation (on-violation kill)" in result.output
    assert "reason:  rename to /home/coder/a matches no allow rule" in result.output


def test_explain_side_door(policy_file, tmp_path):
    result = runner.invoke(policy_app, ["explain", "--agent", "coder", "--policy", str(policy_file),
                                        "--syscall", "io_uring"])
    assert "verdict: violation (on-violation kill)" in result.output
    assert "io_uring is the side door 'io_uring', which [agent.coder.syscalls] allow does not name" \
        in result.output
    allowing = write(tmp_path, POLICY + '[agent.coder.syscalls]\nallow = ["io_uring"]\n', "allowing.toml")
    result = runner.invoke(policy_app, ["explain", "--agent", "coder", "--policy", str(allowing),
                                        "--syscall", "io_uring"])
    assert "verdict: allow" in result.output
    assert f'rule:    syscalls.allow "io_uring" at {allowing}:{len(POLICY.splitlines()) + 2}' in result.output


def change_event(syscall: str, path: str | None, path2: str | None = None, **fields) -> dict:
    event = {"kind": "change", "agent": "coder", "syscall": syscall, "path": path or "", "resolved_path": path,
             "path2": path2 or "", "resolved_path2": path2, "at_flags": 0, "ret": 0, "error": None}
    event.update(fields)
    return event


@pytest.mark.parametrize("event, decision, reason", [
    (change_event("unlink", "/tmp/x"), "allow", "unlink of /tmp/x matches files.write-allow"),
    (change_event("mkdirat", "/home/coder/work/new"), "allow", "mkdirat of /home/coder/work/new matches"),
    # read-allow is not enough: a change is a write
    (change_event("chmod", "/home/coder/notes"), "violation", "chmod of /home/coder/notes matches no allow rule"),
    (change_event("unlink", "/home/coder/.ssh/id_rsa"), "deny", "unlink of /home/coder/.ssh/id_rsa matches files.deny"),
    # both sides of a rename or link; the more severe stands
    (change_event("renameat2", "/tmp/a", "/home/coder/notes"), "violation", "renameat2 to /home/coder/notes"),
    (change_event("link", "/home/coder/.ssh/id_rsa", "/tmp/key"), "deny", "link from /home/coder/.ssh/id_rsa"),
    # a symlink changes its link, not its target
    (change_event("symlink", "/home/coder/.ssh/id_rsa", "/tmp/key"), "allow", "symlink to /tmp/key matches"),
    # an fd call judged by the fd's path; unresolved never allowed
    (change_event("ftruncate", None, dirfd=3), "violation", "ftruncate of '' : the path could not be resolved"),
    # an fd opened for writing was judged at its open; one opened read-only is judged now
    (change_event("fchmod", "/home/coder/notes", fd_opened_for_writing=True), "allow",
     "fchmod through a descriptor opened for writing: its open was judged as a write of /home/coder/notes"),
    (change_event("fchown", "/home/coder/notes", fd_opened_for_writing=False), "violation",
     "fchown of /home/coder/notes matches no allow rule"),
])
def test_changes_are_judged_as_writes_of_each_path(loaded, event, decision, reason):
    verdict = decide(event, loaded)
    assert verdict.decision == decision
    assert reason.replace(" :", ":") in verdict.reason


def test_canonical_hash_is_unchanged_without_syscalls_and_changes_with_them(tmp_path, loaded):
    allowing = load_policy([write(tmp_path, POLICY + '[agent.coder.syscalls]\nallow = ["mount"]\n')])
    assert allowing.hash != loaded.hash
    empty = load_policy([write(tmp_path, POLICY + '[agent.coder.syscalls]\nallow = []\n', "b.toml")])
    assert empty.hash == loaded.hash


def test_in_the_kernel_only_killing_enforcers_get_side_door_masks(tmp_path):
    from agentwarden.policy import kernel_sidedoors
    loaded = load_policy([write(tmp_path, POLICY + '[agent.coder.syscalls]\nallow = ["unshare", "mount"]\n')])
    assert kernel_sidedoors(loaded) == {"coder": ["mount", "unshare"], "lenient": []}


def test_explain_in_monitor_mode(policy_file):
    result = runner.invoke(policy_app, ["explain", "--agent", "fdrunner", "--policy", str(policy_file),
                                        "--exec", "/usr/bin/sh"])
    assert "verdict: violation (on-violation freeze)" in result.output
    assert "mode:    monitor: decided and recorded, never acted on" in result.output


@pytest.mark.parametrize("args, message", [
    (["--agent", "nobody", "--exec", "/usr/bin/git"], "no policy for agent 'nobody'; the policy has coder, "),
    (["--agent", "coder"], "give exactly one of --exec PATH [ARG...], --open PATH [--write], "
                           "--change SYSCALL PATH [PATH] or --syscall NAME"),
    (["--agent", "coder", "--exec", "/usr/bin/git", "--open", "/tmp/x"], "give exactly one of"),
    (["--agent", "coder", "--exec", "git"], "'git' is not absolute"),
    (["--agent", "coder", "--exec", "/usr/bin/git", "--write"], "--write goes with --open"),
    (["--agent", "coder", "--open", "/tmp/x", "extra"], "arguments go with --exec or --change"),
    (["--agent", "coder", "--change", "rename", "/tmp/x"], "--change rename takes two paths"),
    (["--agent", "coder", "--change", "remove", "/tmp/x"], "--change 'remove': use one of unlink, "),
    (["--agent", "coder", "--change", "unlink", "x"], "'x' is not absolute"),
    (["--agent", "coder", "--syscall", "uring"], "--syscall 'uring': use one of io_uring, "),
])
def test_explain_errors_are_one_line(policy_file, args, message):
    result = runner.invoke(policy_app, ["explain", "--policy", str(policy_file), *args])
    assert isinstance(result.exception, AgentwardenError)
    assert result.exception.exit_code == 2   # usage (docs/cli.md)
    assert message in str(result.exception) and "\n" not in str(result.exception)


def test_explain_with_a_broken_policy_is_one_line(tmp_path):
    path = write(tmp_path, BAD_GLOBS)
    result = runner.invoke(policy_app, ["explain", "--policy", str(path), "--agent", "coder", "--open", "/x"])
    assert isinstance(result.exception, PolicyError)
    assert str(result.exception).startswith(f"{path}:7: ")


# ---- leaving the agent's cgroups -----------------------------------------------------

def move_event(left: bool, agent: str = "coder") -> dict:
    return {"kind": "move", "agent": agent, "moved_pid": 42, "dst_path": "/escape", "left": left}


def test_leaving_the_agents_cgroups_is_a_violation_whatever_the_rules(loaded):
    for agent, action in (("coder", "kill"), ("lenient", "kill-agent"), ("fdrunner", "freeze")):
        verdict = decide(move_event(True, agent), loaded)
        assert (verdict.decision, verdict.action, verdict.rule) == ("violation", action, None)
        assert "out of the agent's cgroups" in verdict.reason
    assert decide(move_event(False), loaded).decision == "allow"


def test_the_kernel_kills_leavers_of_enforcing_agents_whose_violations_kill(loaded):
    from agentwarden.policy import kernel_kill_agents
    assert kernel_kill_agents(loaded) == ["coder", "lenient"]   # fdrunner: monitor mode
