"""Agent definitions: /etc/agentwarden/agents/NAME.toml -> agent@NAME.service.

A definition says what to run, as whom, where, and the task defaults:

    command = ["/usr/local/bin/coder-agent", "--workspace", "/srv/coder"]  # required
    user = "coder"                  # required: the account the agent runs as
    group = "coder"                 # default: the user's primary group
    workdir = "/srv/coder"          # default: the user's home directory
    [environment]                   # extra environment variables
    LANG = "C.UTF-8"
    [task]                          # task defaults: who the work is for, which ticket...
    owner = "alice"

systemd cannot read TOML, so a systemd generator (`generate`, run by systemd at
boot and on `systemctl daemon-reload`) turns each definition into a drop-in for
agent@NAME.service: WorkingDirectory=, Environment=, and an ExecStart= that runs
the command as a held session, `agentwarden run --agent NAME --user USER ...`.
The unit is delegated (Delegate=yes), so it is not itself the agent: `run` starts
as root in the unit's own cgroup, makes the tagged session cgroup below it, and
starts the agent's command there as its child (born in it), as its user, once the
session's filter is registered; `run` stays in the unit's cgroup as its parent. Nothing of ours is
judged as the agent. This module imports only the standard library (generators
run early).
"""
from __future__ import annotations

import grp
import pwd
import re
import shlex
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .cgroups import AGENT_NAME
from .errors import AgentwardenError

DROPIN_NAME = "50-agentwarden.conf"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_ACCOUNT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\Z")
_KNOWN = {"command", "user", "group", "workdir", "environment", "task"}


class AgentDefError(AgentwardenError):
    pass


@dataclass(frozen=True)
class AgentDef:
    name: str
    source: Path
    command: list[str]
    user: str
    group: str | None = None
    workdir: str | None = None
    environment: dict[str, str] = field(default_factory=dict)
    task: dict[str, str] = field(default_factory=dict)

    def full_environment(self) -> dict[str, str]:
        """The configured environment plus the agent's name and task defaults."""
        env = dict(self.environment)
        env["AGENTWARDEN_AGENT"] = self.name
        for key, value in self.task.items():
            env[f"AGENTWARDEN_TASK_{key.upper()}"] = value
        return env


def _string_table(data: object, where: str) -> dict[str, str]:
    if not isinstance(data, dict):
        raise AgentDefError(f"{where} must be a table of KEY = \"value\"")
    for key, value in data.items():
        if not _ENV_NAME.match(key):
            raise AgentDefError(f"{where}: {key!r} is not a valid variable name")
        if not isinstance(value, str) or "\0" in value:
            raise AgentDefError(f"{where}.{key} must be a string")
    return dict(data)


def parse(name: str, text: str, source: Path) -> AgentDef:
    """Validate one definition; every error names the file."""
    def fail(message: str) -> AgentDefError:
        return AgentDefError(f"{source}: {message}")

    if not AGENT_NAME.match(name):
        raise fail(f"{name!r} is not a valid agent name (1-64 letters, digits, '_', '.', '@' "
                   "or '-', starting with a letter or digit)")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise fail(f"not valid TOML: {exc}") from None
    unknown = set(data) - _KNOWN
    if unknown:
        raise fail(f"unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_KNOWN))}")
    command = data.get("command")
    if isinstance(command, str):
        try:
            command = shlex.split(command)
        except ValueError as exc:
            raise fail(f"command: {exc}") from None
    if (not isinstance(command, list) or not command
            or not all(isinstance(a, str) and a and "\0" not in a for a in command)):
        raise fail('command is required: a list of strings, e.g. command = ["/usr/bin/agent", "--flag"]')
    if not command[0].startswith("/"):
        raise fail(f"command: {command[0]!r} must be an absolute path")
    user = data.get("user")
    if not isinstance(user, str) or not _ACCOUNT.match(user):
        raise fail('user is required: the account the agent runs as, e.g. user = "coder"')
    group = data.get("group")
    if group is not None and (not isinstance(group, str) or not _ACCOUNT.match(group)):
        raise fail('group must be a group name, e.g. group = "coder"')
    workdir = data.get("workdir")
    if workdir is not None and (not isinstance(workdir, str) or not workdir.startswith("/")
                                or any(ord(c) < 32 for c in workdir)):
        raise fail("workdir must be an absolute path")
    try:
        environment = _string_table(data.get("environment", {}), "environment")
        task = _string_table(data.get("task", {}), "task")
    except AgentDefError as exc:
        raise fail(str(exc)) from None
    return AgentDef(name, source, command, user, group, workdir, environment, task)


def load(agents_dir: Path, name: str) -> AgentDef:
    source = agents_dir / f"{name}.toml"
    if not AGENT_NAME.match(name):
        raise AgentDefError(f"{name!r} is not a valid agent name")
    try:
        text = source.read_text()
    except FileNotFoundError:
        raise AgentDefError(f"no definition for agent {name!r}: create {source} "
                            "(command, user) and run `systemctl daemon-reload`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AgentDefError(f"cannot read {source}: {getattr(exc, 'strerror', None) or exc}") from None
    return parse(name, text, source)


def names(agents_dir: Path) -> list[str]:
    try:
        return sorted(p.stem for p in agents_dir.glob("*.toml") if p.is_file())
    except OSError:
        return []


def check_accounts(agent: AgentDef, admin_group: str) -> list[str]:
    """Problems with the accounts, as far as this host's databases tell."""
    problems = []
    try:
        pw = pwd.getpwnam(agent.user)
    except KeyError:
        return [f"{agent.source}: user {agent.user!r} does not exist"]
    if agent.group:
        try:
            grp.getgrnam(agent.group)
        except KeyError:
            problems.append(f"{agent.source}: group {agent.group!r} does not exist")
    if admin_group:
        try:
            admins = grp.getgrnam(admin_group)
        except KeyError:
            admins = None
        if admins and (agent.user in admins.gr_mem or pw.pw_gid == admins.gr_gid
                       or agent.group == admin_group):
            problems.append(f"{agent.source}: user {agent.user!r} is in the admin group "
                            f"{admin_group!r}: the agent could reach agentwarden's sockets; "
                            "run agents under accounts outside that group")
    return problems


# -- systemd drop-in ------------------------------------------------------------

def _quote(value: str, expand_dollar: bool) -> str:
    """One word for a unit file: double-quoted with C escapes, specifiers (%)
    escaped; `$` doubled where systemd would expand variables (ExecStart=)."""
    escaped = "".join({"\\": "\\\\", '"': '\\"', "%": "%%"}.get(c) or
                      (f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else c) for c in value)
    if expand_dollar:
        escaped = escaped.replace("$", "$$")
    return f'"{escaped}"'


AGENTWARDEN = "/usr/bin/agentwarden"


def exec_start(agent: AgentDef) -> str:
    """The agent's command as a held session, as its user and group, with the
    task defaults as its attribution (owner: whom it acts for)."""
    argv = [AGENTWARDEN, "run", "--agent", agent.name, "--user", agent.user]
    if agent.group:
        argv += ["--group", agent.group]
    task = "; ".join(f"{k}={v}" for k, v in sorted(agent.task.items()) if k != "owner")
    if task:
        argv += ["--task", task]
    if agent.task.get("owner"):
        argv += ["--on-behalf-of", agent.task["owner"]]
    argv += ["--", *agent.command]
    return " ".join(_quote(a, expand_dollar=True) for a in argv)


def workdir(agent: AgentDef) -> str:
    """The definition's workdir, else the user's home (the unit runs as root
    until `run` switches to the user, so systemd's `~` would be root's)."""
    if agent.workdir:
        return agent.workdir
    try:
        return pwd.getpwnam(agent.user).pw_dir
    except KeyError:
        return "/"   # no such user: `run` refuses it and says so


def dropin(agent: AgentDef) -> str:
    lines = [f"# Generated by agentwarden from {agent.source}; edit that file and run",
             "# `systemctl daemon-reload`, do not edit this one.",
             "[Service]",
             f"WorkingDirectory={workdir(agent).replace('%', '%%')}"]
    for key, value in sorted(agent.full_environment().items()):
        lines.append(f"Environment={_quote(f'{key}={value}', expand_dollar=False)}")
    lines += ["ExecStart=", f"ExecStart={exec_start(agent)}", ""]
    return "\n".join(lines)


def generate(agents_dir: Path, output_dir: Path) -> list[str]:
    """Write one drop-in per valid definition; returns the problems of the others
    (their agent@NAME.service keeps the template's command, which explains them)."""
    problems = []
    for name in names(agents_dir):
        try:
            agent = load(agents_dir, name)
        except AgentDefError as exc:
            problems.append(str(exc))
            continue
        unit_dir = output_dir / f"agent@{name}.service.d"
        unit_dir.mkdir(parents=True, exist_ok=True)
        (unit_dir / DROPIN_NAME).write_text(dropin(agent))
    return problems


def generator_main(argv: list[str]) -> int:
    """systemd generator entry: argv = [prog, normal_dir, early_dir, late_dir]."""
    if len(argv) < 2:
        print("agentwarden generator: expected the output directory (run by systemd)", file=sys.stderr)
        return 1
    from .settings import KEYS, load as load_settings
    try:
        agents_dir = load_settings().agents_dir
    except AgentwardenError as exc:
        agents_dir = KEYS["agents_dir"].default
        print(f"agentwarden generator: {exc}; using {agents_dir}", file=sys.stderr)
    for problem in generate(agents_dir, Path(argv[1])):
        print(f"agentwarden generator: {problem}", file=sys.stderr)
    return 0
