"""Shared fixtures. Kernel fixtures load the real BPF program, make real
cgroups and run real programs. Without root/BPF they skip, unless
AGENTWARDEN_REQUIRE_KERNEL=1, where such a skip is a failure."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from agentwarden import cgroups, control
from agentwarden.archive.segments import list_segments, segment_items
from agentwarden.errors import AgentwardenError
from agentwarden.settings import Settings

REQUIRE_KERNEL = os.environ.get("AGENTWARDEN_REQUIRE_KERNEL") == "1"
# One parent cgroup per test session: sessions running side by side (other
# developers' checkouts) never touch each other's agents.
TEST_CGROUP_PARENT = f"agentwarden-test-{uuid.uuid4().hex[:8]}"


def kernel_unavailable() -> str | None:
    """Why kernel tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "not root"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "python3-bpfcc not importable"
    try:
        cgroups.cgroup2_root()
    except AgentwardenError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="session")
def kernel():
    reason = kernel_unavailable()
    if reason:
        if REQUIRE_KERNEL:
            pytest.fail(f"kernel test cannot run ({reason}) and AGENTWARDEN_REQUIRE_KERNEL=1")
        pytest.skip(f"kernel test skipped: {reason}")
    return cgroups.cgroup2_root()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> int:
    """SIGTERM, then SIGKILL if it has not exited within timeout; its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class Warden:
    """A running `agentwarden up` with its own run and state directories."""

    def __init__(self, tmp: Path, run_dir: Path | None = None, env: dict | None = None,
                 wrapper: tuple[str, ...] = ()):
        """wrapper: a command line that runs `agentwarden up` (unshare ...)."""
        self.settings = Settings(run_dir=run_dir or tmp / "run", state_dir=tmp / "state",
                                 policy_dir=tmp / "policy")
        self.settings.policy_dir.mkdir()
        self.env = {**os.environ, "AGENTWARDEN_RUN_DIR": str(self.settings.run_dir),
                    "AGENTWARDEN_STATE_DIR": str(self.settings.state_dir),
                    "AGENTWARDEN_POLICY_DIR": str(self.settings.policy_dir),
                    # Watch only the tests' cgroups: other instances' agents stay theirs.
                    "AGENTWARDEN_CGROUP_SCOPE": TEST_CGROUP_PARENT, **(env or {})}
        self.log = open(tmp / "up.log", "w+")
        self._sealed: dict[Path, list[dict]] = {}   # records of sealed segments (records())
        (cgroups.cgroup2_root() / TEST_CGROUP_PARENT).mkdir(exist_ok=True)
        self.proc = subprocess.Popen([*wrapper, sys.executable, "-m", "agentwarden", "up"], env=self.env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_for(self._ready, timeout=90, what="agentwarden up to report a probe")
        except AssertionError:
            self.stop()
            raise AssertionError(f"agentwarden up did not start:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"agentwarden up exited {self.proc.returncode}:\n{self.output()}")
        try:
            return bool(self.status()["probe"]["health"])
        except AgentwardenError:
            return False

    def status(self) -> dict:
        return control.request(self.settings, "status", timeout=2)["status"]

    def cli(self, *args: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "agentwarden", *args], env=self.env,
                                capture_output=True, text=True, timeout=timeout, **kw)
        if check and result.returncode != 0:
            raise AssertionError(f"agentwarden {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def set_policy(self, name: str, toml: str) -> str:
        """Write one policy file, reload, and wait until the probe enforces its
        in-kernel rules; returns the policy hash."""
        (self.settings.policy_dir / f"{name}.toml").write_text(toml)
        reply = control.request(self.settings, "reload", timeout=10)
        wanted = reply["policy_hash"]
        wait_for(lambda: self.status()["probe"]["health"].get("kernel_rules_policy") == wanted,
                 what="the probe to load the in-kernel rules")
        return wanted

    def records(self) -> list[dict]:
        """Every archived record. A sealed segment (every one but the newest)
        never changes, so it is decoded once: the shared warden's archive grows
        past a million records (the flood test), and tests ask for it often."""
        segments = list_segments(self.settings.archive_dir)
        out: list[dict] = []
        for index, segment in enumerate(segments):
            cached = self._sealed.get(segment.base)
            if cached is None:
                cached = [item.record for item in segment_items(segment)]
                if index < len(segments) - 1:
                    self._sealed[segment.base] = cached
            out.extend(cached)
        return out

    def probe_records_sent(self) -> int:
        return self.status()["probe"]["health"].get("records_sent", 0)

    def settle(self, timeout: float = 15.0) -> None:
        """Wait until the daemon has archived everything the kernel emitted so far:
        two probe health reports in a row with nothing new decoded."""
        def quiet():
            first = self.status()
            time.sleep(self.settings.health_interval * 1.2)
            second = self.status()
            h1, h2 = first["probe"]["health"], second["probe"]["health"]
            emitted = sum(h2["kernel_emitted"].values())
            # Repeated opens folded in the kernel: their counts sent too.
            folded_sent = h2.get("folded_opens", 0) >= h2.get("kernel_folded_opens", 0)
            return (h1 == h2 or h1.get("decoded") == h2.get("decoded")) and \
                h2.get("decoded", 0) >= emitted and h2.get("backlog", 0) == 0 and folded_sent
        wait_for(quiet, timeout=timeout, interval=0, what="the pipeline to settle")

    def settle_after_flood(self) -> None:
        """settle(), patiently: after a flood the daemon answers between batches
        only, and the next tests share this pipeline."""
        def settled() -> bool:
            try:
                self.settle(timeout=30)
                return True
            except (control.DaemonUnavailable, AssertionError):
                return False
        wait_for(settled, timeout=300, interval=0, what="the pipeline to drain")

    def wait_for_violations(self, before: int, count: int, what: str) -> None:
        """Until the daemon has counted count violations more than before (under a
        flood it answers between batches only)."""
        def judged() -> bool:
            try:
                return self.status()["daemon"]["counters"].get("violations", 0) - before >= count
            except control.DaemonUnavailable:
                return False
        wait_for(judged, timeout=300, interval=1, what=what)

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


@pytest.fixture(scope="session")
def warden(kernel, tmp_path_factory):
    w = Warden(tmp_path_factory.mktemp("warden"))
    yield w
    w.stop()


class AgentCgroup:
    def __init__(self, root: Path, warden: Warden | None, name: str):
        self.root = root
        self.warden = warden
        self.agent = name
        self.path = root / TEST_CGROUP_PARENT / f"{name}-{uuid.uuid4().hex[:8]}"
        self.path.mkdir(parents=True)
        self.id = cgroups.cgroup_id(self.path)

    def tag(self) -> None:
        cgroups.tag(self.path, self.agent)
        if self.warden:
            wait_for(lambda: str(self.id) in self.warden.status()["probe"]["tags"],
                     what=f"the probe to watch {self.path}")

    def untag(self) -> None:
        cgroups.untag(self.path)
        if self.warden:
            wait_for(lambda: str(self.id) not in self.warden.status()["probe"]["tags"],
                     what=f"the probe to drop {self.path}")

    def child(self, name: str) -> Path:
        path = self.path / name
        path.mkdir()
        return path

    def run(self, argv, cgroup: Path | None = None, **kw) -> subprocess.CompletedProcess:
        """Run argv as a process that joins the cgroup before it execs."""
        procs = str((cgroup or self.path) / "cgroup.procs")

        def join():
            with open(procs, "w") as f:
                f.write("0")

        kw.setdefault("capture_output", True)
        kw.setdefault("timeout", 60)
        return subprocess.run(argv, preexec_fn=join, **kw)

    def remove(self) -> None:
        for dirpath, dirs, _ in os.walk(self.path, topdown=False):
            try:
                (Path(dirpath) / "cgroup.kill").write_text("1")
            except OSError as exc:
                # A session's own cgroup can go (its `run` removes it) while we walk:
                # ENOENT, or ENODEV when it is mid-removal.
                if exc.errno not in (errno.ENOENT, errno.ENODEV):
                    raise
                continue
            for _ in range(100):
                try:
                    os.rmdir(dirpath)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


@pytest.fixture
def agent_cgroup(kernel, warden, request):
    made: list[AgentCgroup] = []

    def make(name: str = "agent", tag: bool = True) -> AgentCgroup:
        cg = AgentCgroup(kernel, warden, name)
        made.append(cg)
        if tag:
            cg.tag()
        return cg

    yield make
    for cg in made:
        cg.remove()


def events_of(records: list[dict], cgroup_id: int, kind: str | None = None) -> list[dict]:
    return [r for r in records if r.get("agent_cgroup_id") == cgroup_id
            and (kind is None or r["kind"] == kind)]


@pytest.fixture(scope="session", autouse=True)
def _clean_test_cgroups():
    yield
    try:
        parent = cgroups.cgroup2_root() / TEST_CGROUP_PARENT
    except AgentwardenError:
        return
    if parent.is_dir():
        shutil.rmtree(parent, ignore_errors=True)  # rmdir-only fs: removes empty ones
        try:
            os.rmdir(parent)
        except OSError:
            pass
