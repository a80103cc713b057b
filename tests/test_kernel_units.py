"""The capability bounding sets of the systemd units, tried for real: probe and
daemon each run under exactly the set its unit file gives it (setpriv), and an
agent running as another user is watched, judged through a symlink in a
directory only that user may enter, and killed."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from agentwarden import cgroups, control
from agentwarden.daemon.archive import read_records
from agentwarden.errors import AgentwardenError
from agentwarden.settings import Settings
from conftest import AgentCgroup, stop_process, wait_for

pytestmark = pytest.mark.kernel

UNITS = Path(__file__).parent.parent / "systemd"
NOBODY = 65534


def bounding_set(unit: str) -> list[str]:
    text = (UNITS / unit).read_text()
    [line] = re.findall(r"^CapabilityBoundingSet=(.+)$", text, re.M)
    return line.split()


def test_unit_files_name_real_capabilities():
    for unit in ("agentwarden-daemon.service", "agentwarden-probe.service"):
        for cap in bounding_set(unit):
            assert re.fullmatch(r"CAP_[A-Z_]+", cap), (unit, cap)


def _setpriv(unit: str) -> list[str]:
    caps = ",".join("+" + c[len("CAP_"):].lower() for c in bounding_set(unit))
    return ["setpriv", f"--bounding-set=-all,{caps}", "--inh-caps=-all", "--"]


class UnitWarden:
    """probe and daemon started separately, each with its unit's bounding set."""

    def __init__(self, tmp: Path):
        self.settings = Settings(run_dir=tmp / "run", state_dir=tmp / "state",
                                 policy_dir=tmp / "policy", admin_group="")
        self.settings.policy_dir.mkdir()
        self.env = {**os.environ, "AGENTWARDEN_RUN_DIR": str(self.settings.run_dir),
                    "AGENTWARDEN_STATE_DIR": str(self.settings.state_dir),
                    "AGENTWARDEN_POLICY_DIR": str(self.settings.policy_dir),
                    "AGENTWARDEN_ADMIN_GROUP": ""}
        self.logs = {}
        self.procs = {}
        for part in ("daemon", "probe"):
            self.logs[part] = open(tmp / f"{part}.log", "w+")
            self.procs[part] = subprocess.Popen(
                [*_setpriv(f"agentwarden-{part}.service"), sys.executable, "-m", "agentwarden", part],
                env=self.env, stdout=self.logs[part], stderr=subprocess.STDOUT)
        wait_for(self._ready, timeout=90, what="probe and daemon under their units' capabilities")

    def output(self) -> str:
        text = ""
        for part, log in self.logs.items():
            log.flush()
            log.seek(0)
            text += f"--- {part}\n{log.read()}"
        return text

    def _ready(self) -> bool:
        for part, proc in self.procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"{part} exited {proc.returncode}:\n{self.output()}")
        try:
            return bool(self.status()["probe"]["health"])
        except AgentwardenError:
            return False

    def status(self) -> dict:
        return control.request(self.settings, "status", timeout=2)["status"]

    def stop(self) -> None:
        for part in ("probe", "daemon"):
            stop_process(self.procs[part])
            self.logs[part].close()


@pytest.fixture
def unit_warden(kernel, tmp_path):
    w = UnitWarden(tmp_path)
    yield w
    w.stop()


@pytest.fixture
def open_dir():
    """A directory every user may traverse (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="agentwarden-caps-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_units_capabilities_suffice_for_another_users_agent(kernel, unit_warden, open_dir):
    agent = f"caps-{uuid.uuid4().hex[:6]}"
    tmp_path = open_dir
    # A secret the policy denies, and a link to it in a directory only the agent's user may enter.
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    (secret_dir / "key").write_text("s3cret")
    private = tmp_path / "home"
    private.mkdir()
    os.symlink(secret_dir / "key", private / "innocent")
    os.chown(private, NOBODY, NOBODY)
    os.chown(private / "innocent", NOBODY, NOBODY, follow_symlinks=False)
    os.chmod(private, 0o700)
    (unit_warden.settings.policy_dir / f"{agent}.toml").write_text(
        f'[agent.{agent}]\nmode = "enforce"\non-violation = "kill"\n'
        f'[agent.{agent}.exec]\nallow = ["/**"]\n'
        f'[agent.{agent}.files]\nread-allow = ["/**"]\nwrite-allow = ["/dev/null"]\n'
        f'deny = ["{secret_dir}/**"]\n')
    control.request(unit_warden.settings, "reload", timeout=10)
    cg = AgentCgroup(kernel, None, agent)
    try:
        cg.tag()
        wait_for(lambda: str(cg.id) in unit_warden.status()["probe"]["tags"],
                 what="the probe (CAP_SYS_ADMIN for trusted.* tags) to watch the agent")
        script = f"import time\nf = open('innocent')\ntime.sleep(30)\n"
        result = cg.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                         sys.executable, "-S", "-c", script], cwd=private, timeout=60)
        assert result.returncode == -9, (result, unit_warden.output())
        # (Only the open of "innocent" counts here: earlier opens that returned the
        # same fd number can be judged by the file the fd holds later.)
        [violation] = wait_for(lambda: [r for r in read_records(unit_warden.settings.archive_dir)
                                        if r["kind"] == "violation" and r["agent"] == agent
                                        and r["attempted"].endswith("/home/innocent")],
                               what="the violation of opening the link in the archive")
        # Seen through the link (CAP_SYS_PTRACE for /proc/PID/fd of another user, or
        # CAP_DAC_READ_SEARCH to resolve it in a directory only that user may enter) ...
        assert "through a symlink" in violation["reason"], violation
        # ... and killed although it belongs to another user (CAP_KILL).
        assert violation["action_taken"].startswith("killed process"), violation
    finally:
        cg.remove()
