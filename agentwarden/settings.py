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

from .durations import EXAMPLES, DurationError, parse_duration
from .errors import AgentwardenError, UsageProblem

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
        """The archive_* settings from AGENTWARDEN_ARCHIVE_* variables alone (the
        defaults for the others); a bad value is an error."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        origins: dict[str, str] = {}
        for name, key in KEYS.items():
            if name.startswith("archive_") and key.env in env:
                _apply(values, origins, name, env[key.env], f"environment {key.env}")
        return Settings(**values, origins=origins).archive


_GROUP_NAME = re.compile(r"^[a-z_][a-z0-9_-]*\$?\Z")
_SLICE_NAME = re.compile(r"^[A-Za-z0-9_.:]+(-[A-Za-z0-9_.:]+)*\.slice\Z")


class ConfigError(UsageProblem):
    """A setting that cannot be (exit 2, like a bad option)."""


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


def _store_max(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit():
        raise ValueError("must be a whole number of bytes (0 keeps only hashes)")
    return int(value)


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


def _duration(value: Any) -> float:
    """Seconds: a number, or a duration string of the one syntax (durations.py),
    which refuses what is endless or negative; so is a number here."""
    if isinstance(value, str):
        return parse_duration(value, "duration")
    seconds = _number_of_seconds(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"must be a finite duration of at least 0 seconds ({EXAMPLES})")
    return seconds


def _size(value: Any) -> int:
    if isinstance(value, str):
        try:
            return parse_size(value, "size")
        except AgentwardenError as exc:
            raise ValueError(str(exc)) from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("must be a size in bytes (or 64M, 1G)")
    return value


def _one_of(choices: Sequence[str]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or value.strip().lower() not in choices:
            raise ValueError(f"use one of {', '.join(choices)}")
        return value.strip().lower()
    return parse
def parse_listen(value: Any) -> tuple[str, int] | None:
    """metrics_listen: "HOST:PORT" ("[::1]:9464" for IPv6) -> (host, port); "" -> None."""
    if not isinstance(value, str):
        raise ValueError('must be "HOST:PORT", e.g. "127.0.0.1:9464", or "" for off')
    if not value.strip():
        return None
    match = re.fullmatch(r"\s*(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.-]+)):(\d{1,5})\s*", value)
    if not match or not 0 < int(match.group(3)) < 65536:
        raise ValueError('must be "HOST:PORT" with a port from 1 to 65535, e.g. "127.0.0.1:9464" '
                         'or "[::1]:9464", or "" for off')
    return match.group(1) or match.group(2), int(match.group(3))


def _listen(value: Any) -> str:
    parse_listen(value)
    return value.strip()


def _fleet_url(value: Any) -> str:
    """NATS servers, comma-separated ("" turns the fleet off)."""
    import urllib.parse   # here: `agentwarden run` should start fast
    if not isinstance(value, str):
        raise ValueError('must be nats://HOST:PORT[,nats://HOST:PORT...], or "" for no fleet')
    for url in filter(None, (u.strip() for u in value.split(","))):
        parts = urllib.parse.urlsplit(url)
        try:
            parts.port
        except ValueError as exc:
            raise ValueError(f"{url!r} is not a URL: {exc}") from None
        if parts.scheme not in ("nats", "tls") or not parts.hostname:
            raise ValueError(f"{url!r}: must be nats://HOST:PORT, e.g. nats://nats1.example:4222")
    return value.strip()


def _optional_path(value: Any) -> Path | None:
    if value == "" or value is None:
        return None
    return _path(value)


def _host_name(value: Any) -> str:
    if not isinstance(value, str) or any(c.isspace() for c in value) or len(value) > 200:
        raise ValueError('must be a host name without spaces, or "" for this host\'s name')
    return value


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
    Key("fold_interval", 1.0, _seconds_between(0, 10, "must be between 0 and 10 seconds (0: no folding)"),
        "repeated opens (same thread, absolute path, flags, result and file) are counted in the "
        "kernel and sent as one record with their count at most this many seconds later, at once "
        "when they stop; a file's first open always goes out as it happens. 0 sends every open"),
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
    Key("archive_sync_interval", ArchiveSettings.sync_interval, _duration,
        "a record is fsynced at most this long after it is written (0.01..60 s)"),
    Key("archive_segment_bytes", ArchiveSettings.segment_bytes, _size,
        "rotate the active segment before it exceeds this size (64M, 1G; at least 4096)"),
    Key("archive_segment_age", ArchiveSettings.segment_age, _duration, "rotate a segment this old (1h)"),
    Key("archive_compress", ArchiveSettings.compress, _one_of(ArchiveSettings.COMPRESSORS),
        "sealed segments: xz, zlib or none"),
    Key("archive_retain_age", ArchiveSettings.retain_age, _duration,
        "delete sealed segments older than this (90d; 0: never)"),
    Key("archive_retain_bytes", ArchiveSettings.retain_bytes, _size,
        "delete the oldest sealed segments above this total (10G; 0: never)"),
    Key("archive_key_file", ArchiveSettings.key_file, _path,
        "root-only secret for the archive's hash chain; used when present, required when set"),
    Key("archive_on_disk_full", ArchiveSettings.on_disk_full, _one_of(ArchiveSettings.DISK_FULL_POLICIES),
        "when the archive cannot be written: freeze, kill or continue the agents"),
    Key("metrics_listen", "", _listen,
        "the daemon serves Prometheus metrics at http://HOST:PORT/metrics (e.g. "
        "\"127.0.0.1:9464\"; no authentication: keep it on localhost); \"\" is off"),
    Key("drift_store_max", 1 << 20, _store_max,
        "drift: a tracked file's content before and after a change is kept in the state "
        "directory's drift/ store up to this many bytes; a larger one only by its hash"),
    Key("fleet_url", "", _fleet_url,
        "NATS servers (nats://HOST:PORT, comma-separated) the daemon ships records and holds to; "
        "\"\" is no fleet (docs/fleet.md)"),
    Key("fleet_credentials", None, _optional_path,
        "a root-only TOML file with user and password of this machine's NATS account"),
    Key("fleet_host", "", _host_name, "this host's name in the fleet; \"\" is the host name"),
    Key("fleet_admin_keys", None, _optional_path,
        "admins whose signed fleet decisions this host accepts: lines `NAME ed25519:KEY` "
        "(from `agentwarden fleet keygen`); none: fleet decisions are refused"),
    Key("fleet_archive_dir", Path("/var/lib/agentwarden/fleet"), _path,
        "`agentwarden fleet archive` writes each host's archive to HOST/ below it"),
    Key("perform_file_changes", True, _flag,
        "sessions: an allowed or approved write-open, rename, unlink or truncate is done by the "
        "supervisor for the task (its credentials, cwd, root) and the result handed back, so what "
        "was checked is what happens; false lets the task's own call continue after the check, "
        "which a racing thread can redirect (for measurement only)"),
)}


@dataclass(frozen=True)
class Settings:
    run_dir: Path = KEYS["run_dir"].default
    state_dir: Path = KEYS["state_dir"].default
    health_interval: float = KEYS["health_interval"].default
    tag_scan_interval: float = KEYS["tag_scan_interval"].default
    wakeup_interval: float = KEYS["wakeup_interval"].default
    fold_interval: float = KEYS["fold_interval"].default
    exec_fast_path: bool = KEYS["exec_fast_path"].default
    remember_max: float = KEYS["remember_max"].default
    hold_messages: bool = KEYS["hold_messages"].default
    perform_file_changes: bool = KEYS["perform_file_changes"].default
    policy_dir: Path = KEYS["policy_dir"].default
    agents_dir: Path = KEYS["agents_dir"].default
    admin_group: str = KEYS["admin_group"].default
    agents_slice: str = KEYS["agents_slice"].default
    cgroup_scope: str = KEYS["cgroup_scope"].default
    notify_command: str = KEYS["notify_command"].default
    notify_webhook: str = KEYS["notify_webhook"].default
    notify_timeout: float = KEYS["notify_timeout"].default
    archive_sync_interval: float = KEYS["archive_sync_interval"].default
    archive_segment_bytes: int = KEYS["archive_segment_bytes"].default
    archive_segment_age: float = KEYS["archive_segment_age"].default
    archive_compress: str = KEYS["archive_compress"].default
    archive_retain_age: float = KEYS["archive_retain_age"].default
    archive_retain_bytes: int = KEYS["archive_retain_bytes"].default
    archive_key_file: Path = KEYS["archive_key_file"].default
    archive_on_disk_full: str = KEYS["archive_on_disk_full"].default
    metrics_listen: str = KEYS["metrics_listen"].default
    drift_store_max: int = KEYS["drift_store_max"].default
    fleet_url: str = KEYS["fleet_url"].default
    fleet_credentials: Path | None = KEYS["fleet_credentials"].default
    fleet_host: str = KEYS["fleet_host"].default
    fleet_admin_keys: Path | None = KEYS["fleet_admin_keys"].default
    fleet_archive_dir: Path = KEYS["fleet_archive_dir"].default
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
    def priority_endpoint(self) -> str:
        """probe PUSH -> daemon PULL: the priority lane (copies of exec records, ahead of ingest)"""
        return f"ipc://{self.run_dir / 'priority.sock'}"

    @property
    def archive(self) -> ArchiveSettings:
        """The archive_* settings as the daemon's archive takes them (validated there)."""
        return ArchiveSettings(
            sync_interval=self.archive_sync_interval, segment_bytes=self.archive_segment_bytes,
            segment_age=self.archive_segment_age, compress=self.archive_compress,
            retain_age=self.archive_retain_age, retain_bytes=self.archive_retain_bytes,
            key_file=self.archive_key_file, on_disk_full=self.archive_on_disk_full,
            # A key file someone named must exist; the default one is used when present.
            key_file_required=self.origins.get("archive_key_file", "default") != "default")

    @property
    def drift_dir(self) -> Path:
        """drift's store and index (agentwarden.drift), root's alone."""
        return self.state_dir / "drift"

    @property
    def archive_dir(self) -> Path:
        return self.state_dir / "archive"

    @property
    def sessions_socket(self) -> Path:
        """`agentwarden run` hands seccomp listeners here; admins approve holds here."""
        return self.run_dir / "sessions.sock"

    @property
    def fleet_name(self) -> str:
        """This host's name in the fleet."""
        import socket
        return self.fleet_host or socket.gethostname()

    @property
    def fleet_state_file(self) -> Path:
        """The last sequence the fleet acknowledged (the shipper resumes after it)."""
        return self.state_dir / "fleet-acked.json"

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
    settings = Settings(**values, origins=origins)
    try:
        settings.archive  # noqa: B018  the archive's own checks (ranges), at load time
    except ConfigError:
        raise
    except AgentwardenError as exc:
        raise ConfigError(f"{exc} (archive_* settings)") from None
    return settings
