"""Where things live. Embedded defaults, overridable by environment for tests
and packaging; the config file of a later release slots in between."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_RUN_DIR = "/run/agentwarden"
DEFAULT_STATE_DIR = "/var/lib/agentwarden"
DEFAULT_POLICY_DIR = "/etc/agentwarden/policy.d"


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
        )

    def prepare_run_dir(self) -> None:
        """The socket directory is root's (0700), or 0710 to the admin group
        (the daemon sets that): agents must not reach it. Anything looser is
        tightened."""
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if os.stat(self.run_dir).st_mode & 0o067:
            os.chmod(self.run_dir, 0o700)
