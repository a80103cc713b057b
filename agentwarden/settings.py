"""Where things live. Embedded defaults, overridable by environment for tests
and packaging; the config file of a later release slots in between."""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AgentwardenError

DEFAULT_RUN_DIR = "/run/agentwarden"
DEFAULT_STATE_DIR = "/var/lib/agentwarden"
DEFAULT_POLICY_DIR = "/etc/agentwarden/policy.d"
DEFAULT_ARCHIVE_KEY_FILE = "/etc/agentwarden/archive.key"

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_TIME_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_size(text: str, what: str) -> int:
    """'64M', '1G', '4096' -> bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not match:
        raise AgentwardenError(f"{what}: {text!r} is not a size (e.g. 64M, 1G, 4096)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def parse_duration(text: str, what: str) -> float:
    """'0.5', '30s', '1h', '90d' -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise AgentwardenError(f"{what}: {text!r} is not a duration (e.g. 0.5s, 30m, 1h, 90d)")
    return float(match.group(1)) * _TIME_UNITS[match.group(2)]


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


@dataclass(frozen=True)
class Settings:
    run_dir: Path
    state_dir: Path
    # Only tagged cgroups below this one (relative to the cgroup v2 root) are
    # watched; "" is the whole hierarchy. Keeps test and bench instances apart.
    cgroup_scope: str = ""
    health_interval: float = 1.0   # seconds between health records
    tag_scan_interval: float = 0.5  # seconds between cgroup tag rescans
    policy_dir: Path = Path(DEFAULT_POLICY_DIR)  # *.toml policy files, read in name order
    archive: ArchiveSettings = field(default_factory=ArchiveSettings)

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
    def sessions_socket(self) -> Path:
        """`agentwarden run` hands seccomp listeners here; admins approve holds here."""
        return self.run_dir / "sessions.sock"

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

    @property
    def archive_dir(self) -> Path:
        return self.state_dir / "archive"

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            run_dir=Path(os.environ.get("AGENTWARDEN_RUN_DIR", DEFAULT_RUN_DIR)),
            state_dir=Path(os.environ.get("AGENTWARDEN_STATE_DIR", DEFAULT_STATE_DIR)),
            policy_dir=Path(os.environ.get("AGENTWARDEN_POLICY_DIR", DEFAULT_POLICY_DIR)),
            cgroup_scope=os.environ.get("AGENTWARDEN_CGROUP_SCOPE", ""),
            archive=ArchiveSettings.from_env(),
        )

    def prepare_run_dir(self) -> None:
        """The socket directory is root's (0700), or 0710 to the admin group
        (the daemon sets that): agents must not reach it. Anything looser is
        tightened."""
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if os.stat(self.run_dir).st_mode & 0o067:
            os.chmod(self.run_dir, 0o700)
