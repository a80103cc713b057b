"""Where things live and how often things happen: the one place for settings.

`load()` builds one validated `Settings` from these sources, later ones winning:

  1. embedded defaults (`KEYS` below, each with its documentation)
  2. the config file, /etc/agentwarden/config.toml (moved by AGENTWARDEN_CONFIG or --config)
  3. its drop-ins, config.d/*.toml next to it, in name order
  4. the environment, AGENTWARDEN_<KEY> (e.g. AGENTWARDEN_RUN_DIR=/tmp/aw/run)
  5. flags, `agentwarden --set KEY=VALUE`

Every key may appear in any of them; each `Settings` remembers where each value
came from (`origins`), which `agentwarden config` prints.
"""
from __future__ import annotations

import grp
import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .durations import DurationError, parse_duration
from .errors import AgentwardenError

DEFAULT_CONFIG = "/etc/agentwarden/config.toml"
DROPIN_DIR = "config.d"
ENV_PREFIX = "AGENTWARDEN_"
CONFIG_ENV = "AGENTWARDEN_CONFIG"
# Kept for importers of the old names.
DEFAULT_RUN_DIR = "/run/agentwarden"
DEFAULT_STATE_DIR = "/var/lib/agentwarden"
DEFAULT_POLICY_DIR = "/etc/agentwarden/policy.d"
DEFAULT_ARCHIVE_KEY_FILE = "/etc/agentwarden/archive.key"

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str, what: str) -> int:
    """'64M', '1G', '4096' -> bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not match:
        raise AgentwardenError(f"{what}: {text!r} is not a size (e.g. 64M, 1G, 4096)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


@dataclass(frozen=True)
class ArchiveSettings:
    """How the daemon writes the archive (see README, "The archive")."""
    sync_interval: float = 0.5          # s: a record is fsynced at most this long after it is written
    segment_bytes: int = 64 << 20       # rotate when the active segment would exceed this
    segment_age: float = 3600.0         # s: rotate a segment this old
    compress: str = "xz"                # sealed segments: xz, zlib or none
    retain_age: float = 0.0             # s: delete sealed segments older than this (0: never)
    retain_bytes: int = 0               # delete the oldest sealed segments above this total (0: never)
    key_file: Path = Path(DEFAULT_ARCHIVE_KEY_FILE)  # root-only secret for the hash chain, if present
    key_file_required: bool = False     # set when the key file was named explicitly: it must exist
    on_disk_full: str = "freeze"        # freeze | kill | continue

    COMPRESSORS = ("xz", "zlib", "none")
    DISK_FULL_POLICIES = ("freeze", "kill", "continue")

    def __post_init__(self):
        if not 0.01 <= self.sync_interval <= 60:
            raise AgentwardenError(f"archive sync interval {self.sync_interval:g}s is outside 0.01..60 s")
        if self.segment_bytes < 4096:
            raise AgentwardenError(f"archive segment size {self.segment_bytes} is below 4096 bytes")
        if self.segment_age < 1:
            raise AgentwardenError(f"archive segment age {self.segment_age:g}s is below 1 s")
        if self.compress not in self.COMPRESSORS:
            raise AgentwardenError(f"archive compression {self.compress!r}: use one of "
                                   + ", ".join(self.COMPRESSORS))
        if self.on_disk_full not in self.DISK_FULL_POLICIES:
            raise AgentwardenError(f"archive disk-full policy {self.on_disk_full!r}: use one of "
                                   + ", ".join(self.DISK_FULL_POLICIES))

    @classmethod
    def from_env(cls, env: dict | None = None) -> "ArchiveSettings":
        """AGENTWARDEN_ARCHIVE_* variables over the defaults; a bad value is an error."""
        env = os.environ if env is None else env
        values: dict = {}
        parsers = {"SYNC_INTERVAL": ("sync_interval", parse_duration),
                   "SEGMENT_BYTES": ("segment_bytes", parse_size),
                   "SEGMENT_AGE": ("segment_age", parse_duration),
                   "RETAIN_AGE": ("retain_age", parse_duration),
                   "RETAIN_BYTES": ("retain_bytes", parse_size)}
        for suffix, (name, parse) in parsers.items():
            var = f"AGENTWARDEN_ARCHIVE_{suffix}"
            if env.get(var):
                values[name] = parse(env[var], var)
        for suffix, name in (("COMPRESS", "compress"), ("ON_DISK_FULL", "on_disk_full")):
            if env.get(f"AGENTWARDEN_ARCHIVE_{suffix}"):
                values[name] = env[f"AGENTWARDEN_ARCHIVE_{suffix}"].strip().lower()
        if env.get("AGENTWARDEN_ARCHIVE_KEY_FILE"):
            values["key_file"] = Path(env["AGENTWARDEN_ARCHIVE_KEY_FILE"])
            values["key_file_required"] = True
        return cls(**values)



_GROUP_NAME = re.compile(r"^[a-z_][a-z0-9_-]*\$?\Z")
_SLICE_NAME = re.compile(r"^[A-Za-z0-9_.:]+(-[A-Za-z0-9_.:]+)*\.slice\Z")


class ConfigError(AgentwardenError):
    pass


# -- value parsers: (value from TOML or a string from env/flags) -> value ------

def _path(value: Any) -> Path:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError("must be an absolute path")
    return Path(os.path.normpath(value))


def _number_of_seconds(value: Any) -> float:
    if isinstance(value, str):
        try:
            value = parse_duration(value)
        except DurationError:
            raise ValueError("must be a number of seconds") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a number of seconds")
    return float(value)


def _seconds_between(low: float, high: float, message: str) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        value = _number_of_seconds(value)
        if not math.isfinite(value) or not low <= value <= high:
            raise ValueError(message)
        return value
    return parse


_seconds = _seconds_between(0.01, 3600, "must be between 0.01 and 3600 seconds")


def _group(value: Any) -> str:
    if not isinstance(value, str) or (value and not _GROUP_NAME.match(value)):
        raise ValueError('must be a group name, or "" for root only')
    return value


def _scope(value: Any) -> str:
    if not isinstance(value, str) or value.startswith("/") or ".." in value.split("/"):
        raise ValueError('must be a cgroup path relative to the cgroup v2 root, or "" for all')
    return value.strip("/")


_wakeup = _seconds_between(0, 1, "must be between 0 and 1 seconds (0: wake the probe for every record)")


def _flag(value: Any) -> bool:
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return value.strip().lower() in ("true", "yes", "on", "1")
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _slice(value: Any) -> str:
    if not isinstance(value, str) or (value and not _SLICE_NAME.match(value)):
        raise ValueError('must be a systemd slice name such as "agents.slice", or "" to turn '
                         "auto-tagging off")
    return value


def _notify_command(value: Any) -> str:
    """A command line run for each hold ("" is none). Whether its program
    exists is the daemon's concern (notify_program_problem): a hook removed
    later must not stop admins from answering holds."""
    if not isinstance(value, str):
        raise ValueError('must be a command line, or "" for none')
    import shlex   # here and below: `agentwarden run` loads settings on every start
    try:
        shlex.split(value)
    except ValueError as exc:
        raise ValueError(f"cannot be split into words: {exc}") from None
    return value.strip()


def notify_program_problem(command_line: str) -> str | None:
    """Why notify_command's program cannot be run now, or None."""
    import shlex
    import shutil
    argv = shlex.split(command_line)
    if not argv:
        return None
    program = argv[0]
    found = shutil.which(program) if "/" not in program else (
        program if os.path.isfile(program) and os.access(program, os.X_OK) else None)
    if found:
        return None
    where = "is not an executable file" if "/" in program else "is not found on PATH"
    return f"notify_command: the program {program!r} {where}"


def _notify_webhook(value: Any) -> str:
    """An http(s) URL that each hold is POSTed to ("" is none)."""
    if not isinstance(value, str):
        raise ValueError('must be an http:// or https:// URL, or "" for none')
    if not value:
        return ""
    import urllib.parse
    try:
        url = urllib.parse.urlsplit(value)
        url.port  # raises on a port that is not a number
    except ValueError as exc:
        raise ValueError(f"is not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.hostname or any(c.isspace() for c in value):
        raise ValueError('must be an http:// or https:// URL with a host, e.g. '
                         '"https://hooks.slack.com/services/T0/B0/XYZ"')
    return value


_notify_timeout = _seconds_between(0.1, 60, "must be between 0.1 and 60 seconds")


@dataclass(frozen=True)
class Key:
    name: str
    default: Any
    parse: Callable[[Any], Any]
    doc: str

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


KEYS: dict[str, Key] = {k.name: k for k in (
    Key("run_dir", Path(DEFAULT_RUN_DIR), _path,
        "sockets: ingest.sock (probe -> daemon), events.sock (tail), control.sock (CLI)"),
    Key("state_dir", Path(DEFAULT_STATE_DIR), _path, "the archive lives in its archive/ directory"),
    Key("policy_dir", Path(DEFAULT_POLICY_DIR), _path, "per-agent policies, *.toml in name order"),
    Key("agents_dir", Path("/etc/agentwarden/agents"), _path,
        "agent definitions NAME.toml for agent@NAME.service"),
    Key("admin_group", "agentwarden", _group,
        "members may use the sockets (status, tail) without sudo; \"\" or a missing group: root only"),
    Key("agents_slice", "agents.slice", _slice,
        "every unit below this slice is an agent named after the unit; \"\" turns that off"),
    Key("cgroup_scope", "", _scope,
        "only agent cgroups below this one (relative to the cgroup v2 root) are watched; \"\" "
        "is all (tests and benches use it to keep instances apart)"),
    Key("health_interval", 1.0, _seconds, "seconds between the probe's health records"),
    Key("tag_scan_interval", 0.5, _seconds, "seconds between rescans of agent cgroups"),
    Key("wakeup_interval", 0.01, _wakeup,
        "while records flow, the kernel wakes the probe at most once per this many seconds (a "
        "wake-up costs the agent's syscall about 10 us); 0 wakes it for every record, for the "
        "quickest after-the-fact kills"),
    Key("exec_fast_path", True, _flag,
        "sessions: an exec or write-open of an absolute path that the agent's allow rules allow "
        "(no deny or hold rule matching) is answered by the supervisor's compiled thread (about "
        "15 us a round trip) instead of Python; false decides every one in Python"),
    Key("remember_max", 86400.0, _seconds_between(1, 30 * 86400, "must be between 1 second and 30 days"),
        "the longest `approve --remember` an admin may give (seconds, or 15m, 8h, 1d)"),
    Key("notify_command", "", _notify_command,
        "run for each hold record (pending, approval, approved, denied, timed-out, abandoned) "
        "with the record as JSON on stdin, one at a time, never delaying a decision; \"\" is none"),
    Key("notify_webhook", "", _notify_webhook,
        "an http(s) URL each hold record is POSTed to as JSON with a Slack-style \"text\" "
        "field, retried 3 times with backoff; \"\" is none"),
    Key("notify_timeout", 5.0, _notify_timeout,
        "seconds a notify_command may run, and each notify_webhook attempt may take"),
    Key("hold_messages", True, _flag,
        "sessions: one line on the held process's stderr when a call is held (what, hold id, "
        "timeout) and when it is denied or times out (by whom, why); false says nothing"),
)}


@dataclass(frozen=True)
class Settings:
    run_dir: Path = KEYS["run_dir"].default
    state_dir: Path = KEYS["state_dir"].default
    health_interval: float = KEYS["health_interval"].default
    tag_scan_interval: float = KEYS["tag_scan_interval"].default
    wakeup_interval: float = KEYS["wakeup_interval"].default
    exec_fast_path: bool = KEYS["exec_fast_path"].default
    remember_max: float = KEYS["remember_max"].default
    hold_messages: bool = KEYS["hold_messages"].default
    policy_dir: Path = KEYS["policy_dir"].default
    agents_dir: Path = KEYS["agents_dir"].default
    admin_group: str = KEYS["admin_group"].default
    agents_slice: str = KEYS["agents_slice"].default
    cgroup_scope: str = KEYS["cgroup_scope"].default
    notify_command: str = KEYS["notify_command"].default
    notify_webhook: str = KEYS["notify_webhook"].default
    notify_timeout: float = KEYS["notify_timeout"].default
    archive: ArchiveSettings = field(default_factory=ArchiveSettings, compare=False)
    # key -> where its value came from ("default", a file, "environment AGENTWARDEN_X", "--set")
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def ingest_endpoint(self) -> str:
        """probe PUSH -> daemon PULL"""
        return f"ipc://{self.run_dir / 'ingest.sock'}"

    @property
    def events_endpoint(self) -> str:
        """daemon PUB -> tail SUB"""
        return f"ipc://{self.run_dir / 'events.sock'}"

    @property
    def control_endpoint(self) -> str:
        """CLI REQ -> daemon REP"""
        return f"ipc://{self.run_dir / 'control.sock'}"

    @property
    def archive_dir(self) -> Path:
        return self.state_dir / "archive"

    @property
    def sessions_socket(self) -> Path:
        """`agentwarden run` hands seccomp listeners here; admins approve holds here."""
        return self.run_dir / "sessions.sock"

    @property
    def probe_socket(self) -> Path:
        """`agentwarden run` asks the probe to watch its new session cgroup here (root only)."""
        return self.run_dir / "probe.sock"

    @property
    def instance(self) -> str:
        """Names this instance (probe + daemon); another run dir, another instance."""
        if str(self.run_dir) == DEFAULT_RUN_DIR:
            return "agentwarden"
        return f"agentwarden-{hashlib.sha1(bytes(self.run_dir)).hexdigest()[:10]}"

    @property
    def bpf_pin_dir(self) -> Path:
        """Maps the probe pins for the daemon."""
        return Path("/sys/fs/bpf") / self.instance

    @classmethod
    def from_env(cls) -> "Settings":
        """The settings in force: defaults, config file, drop-ins, environment,
        and the flags this process was given (`use_flags`)."""
        return load(_flags["config"], _flags["overrides"])

    def values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in KEYS}

    def admin_gid(self) -> int | None:
        """The admin group's id, or None (sockets stay root's alone)."""
        if not self.admin_group:
            return None
        try:
            return grp.getgrnam(self.admin_group).gr_gid
        except KeyError:
            return None

    def prepare_run_dir(self) -> None:
        """The socket directory is root's (and the admin group's) alone: agents must not reach it."""
        gid = self.admin_gid()
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _restrict(self.run_dir, gid, 0o700 if gid is None else 0o750)

    def restrict_socket(self, path: str | os.PathLike) -> None:
        """A socket file: root's alone (0600), or also the admin group's (0660)."""
        gid = self.admin_gid()
        _restrict(path, gid, 0o600 if gid is None else 0o660)


def _restrict(path: str | os.PathLike, gid: int | None, mode: int) -> None:
    """Owner root, group gid (None: leave it), mode; changing the group needs CAP_CHOWN."""
    st = os.stat(path)
    try:
        if gid is not None and (st.st_uid, st.st_gid) != (0, gid):
            os.chown(path, 0, gid)
        os.chmod(path, mode)
    except PermissionError as exc:
        raise AgentwardenError(f"cannot give {path} to root:{gid} mode {mode:o}: {exc.strerror} "
                               "(needs root with CAP_CHOWN)") from None


# -- loading --------------------------------------------------------------------

_flags: dict[str, Any] = {"config": None, "overrides": ()}


def use_flags(config: str | os.PathLike | None, overrides: Sequence[str]) -> None:
    """The command line's --config and --set, for every later `Settings.from_env()`."""
    _flags["config"] = config
    _flags["overrides"] = tuple(overrides)


def files_in_force() -> list[Path]:
    """The config files `Settings.from_env()` reads, in order."""
    return config_files(_flags["config"])


def flag_args() -> list[str]:
    """The flags again, for a child `agentwarden` process."""
    args = ["--config", str(_flags["config"])] if _flags["config"] is not None else []
    for item in _flags["overrides"]:
        args += ["--set", item]
    return args

def _read_toml(path: Path) -> dict[str, Any]:
    import tomllib   # here: most hosts' `agentwarden run` reads no config file
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _apply(values: dict, origins: dict, name: str, raw: Any, origin: str) -> None:
    key = KEYS.get(name)
    if key is None:
        raise ConfigError(f"{origin}: unknown key {name!r}; known keys: {', '.join(KEYS)}")
    try:
        values[name] = key.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{origin}: {name} = {raw!r}: {exc}") from None
    origins[name] = origin


def config_files(config: str | os.PathLike | None = None,
                 environ: Mapping[str, str] | None = None) -> list[Path]:
    """The config file (when it exists or was named) and its drop-ins, in the order read."""
    environ = os.environ if environ is None else environ
    named = config if config is not None else (environ.get(CONFIG_ENV) or None)
    path = Path(named if named is not None else DEFAULT_CONFIG)
    files = [path] if named is not None or path.exists() else []
    dropins = path.parent / DROPIN_DIR
    try:
        files.extend(sorted(p for p in dropins.glob("*.toml") if p.is_file()))
    except OSError:
        pass
    return files


def load(config: str | os.PathLike | None = None, overrides: Sequence[str] = (),
         environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from defaults < config file < drop-ins < environment < overrides.

    `config` names the file (else $AGENTWARDEN_CONFIG, else /etc/agentwarden/config.toml;
    only a named file must exist); `overrides` are "key=value" strings (--set)."""
    environ = os.environ if environ is None else environ
    values = {name: key.default for name, key in KEYS.items()}
    origins = {name: "default" for name in KEYS}
    for path in config_files(config, environ):
        data = _read_toml(path)
        for name, raw in data.items():
            if isinstance(raw, dict):
                raise ConfigError(f"{path}: [{name}]: tables are not used; set keys at the top")
            _apply(values, origins, name, raw, str(path))
    for name, key in KEYS.items():
        if key.env in environ:
            _apply(values, origins, name, environ[key.env], f"environment {key.env}")
    for item in overrides:
        name, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set run_dir=/tmp/aw")
        _apply(values, origins, name.strip(), raw, "--set")
    return Settings(**values, origins=origins, archive=ArchiveSettings.from_env(dict(environ)))
