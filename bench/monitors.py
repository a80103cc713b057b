"""The monitors the bench compares, each started and stopped the same way,
and the tagged cgroup they all filter on."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable

import psutil

from agentwarden import cgroups, control
from agentwarden.errors import AgentwardenError
from agentwarden.settings import Settings

BENCH_AGENT = "bench"
# Audit has no cgroup filter: its rules are scoped to the uid an agent would
# run as. No bench process has this uid, like no bench process is tagged.
AGENT_UID = 61234
AUDIT_KEY = "agentwarden-bench"


class MonitorUnavailable(RuntimeError):
    """This monitor cannot run here; the bench goes on without it."""


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05):
    """The predicate's first truthy value, or None after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


# BPF program types that run on syscall or scheduler paths (kprobe, tracepoint,
# perf_event, raw_tracepoint, raw_tracepoint_writable, tracing, lsm): the ones
# another tool can add to every configuration's cost. Cgroup device or socket
# programs (systemd's, say) cannot.
TRACING_PROG_TYPES = {2, 5, 7, 17, 24, 26, 29}


def _holds_tracing_program(pid: int) -> bool:
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd) != "anon_inode:bpf-prog":
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
        except OSError:
            continue
        for line in info.splitlines():
            key, _, value = line.partition(":")
            if key == "prog_type" and int(value) in TRACING_PROG_TYPES:
                return True
    return False


def other_bpf_users(ours: Iterable[psutil.Process]) -> list[str]:
    """"name (pid)" of the processes, other than ours, that hold tracing BPF
    programs: tracers or other agentwarden probes. Theirs run on the same
    tracepoints whatever the configuration, which blurs the comparison."""
    own = {proc.pid for proc in ours} | {os.getpid()}
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.pid not in own and _holds_tracing_program(proc.pid):
            argv = proc.info["cmdline"] or [proc.info["name"]]
            found.append(" ".join([os.path.basename(argv[0]), *(a[:40] for a in argv[1:4])]) +
                         f" ({proc.pid})")
    return found


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def _stop_process(proc: subprocess.Popen | None, sig: int, timeout: float,
                  children: Iterable[psutil.Process] = ()) -> None:
    """Ask a process we started to stop, kill it after timeout seconds, then
    kill any of its children that outlived it (psutil makes sure they are the
    same processes, not new ones with a recycled pid)."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass


class BenchCgroup:
    """The agent cgroup of the bench: tagged, so every monitor's in-kernel
    filter has a real entry to check, and empty unless a workload joins it."""

    def __init__(self, root: Path):
        self.path = root / f"agentwarden-bench-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        try:
            cgroups.tag(self.path, BENCH_AGENT)
        except AgentwardenError:
            self.path.rmdir()
            raise
        self.id = cgroups.cgroup_id(self.path)
        self.procs = self.path / "cgroup.procs"

    def remove(self) -> None:
        if not self.path.exists():
            return
        if cgroups.processes(self.path):
            # Only workloads of this bench join it: one interrupted mid-run.
            (self.path / "cgroup.kill").write_text("1")
        # rmdir fails while killed processes are still exiting; sessions of
        # `agentwarden run` below it go first.
        for child in sorted((p for p in self.path.rglob("*") if p.is_dir()), reverse=True):
            wait_until(lambda: _removed(child), timeout=5)
        wait_until(lambda: _removed(self.path), timeout=5)


def _removed(path: Path) -> bool:
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


class Monitor:
    name = ""
    label = ""

    def __init__(self):
        self.note = ""

    def prepare(self) -> None:
        """Once per bench, before any measurement."""

    def start(self) -> None:
        """Running and watching when this returns; MonitorUnavailable if it cannot."""

    def stop(self) -> None:
        """Idempotent: also the clean-up path after failures."""

    def cleanup(self) -> None:
        """Once per bench, at the very end, even after failures."""

    def processes(self) -> dict[str, psutil.Process]:
        return {}

    def rss_bytes(self) -> dict[str, int]:
        rss = {}
        for part, proc in self.processes().items():
            try:
                rss[part] = proc.memory_info().rss
            except psutil.Error:
                pass
        return rss


class NoMonitor(Monitor):
    name = "none"
    label = "no monitor"


class Agentwarden(Monitor):
    """`agentwarden up` (probe + daemon) with its own run and state directories."""
    name = "agentwarden"
    label = "agentwarden"

    def __init__(self, workdir: Path, cgroup: BenchCgroup, policy: str | None = None,
                 baseline: Path | None = None, env: dict[str, str] | None = None):
        """env: settings for its processes (AGENTWARDEN_*), over the environment's."""
        super().__init__()
        workdir.mkdir(parents=True, exist_ok=True)
        # Before/after in one run: baseline is another tree of the project
        # (`git archive REF | tar -x -C DIR`, its fast path built there with
        # scripts/build-fastpath.sh), whose `up` runs from that tree instead.
        self.baseline = baseline
        if baseline is not None:
            self.name = "agentwarden-baseline"
            self.label = f"agentwarden, baseline {baseline.name}"
        self.cgroup = cgroup
        # Its own policy directory keeps the host's policies out of the figures
        # (empty, the daemon archives events without deciding them); its cgroup
        # scope keeps other instances' agents out of its pipeline.
        self.settings = Settings(run_dir=workdir / "run", state_dir=workdir / "state",
                                 policy_dir=workdir / "policy.d", cgroup_scope=cgroup.path.name)
        self.settings.policy_dir.mkdir(exist_ok=True)
        if policy is not None:
            (self.settings.policy_dir / "bench.toml").write_text(policy)
        self.env = {**os.environ, "AGENTWARDEN_RUN_DIR": str(self.settings.run_dir),
                    "AGENTWARDEN_STATE_DIR": str(self.settings.state_dir),
                    "AGENTWARDEN_POLICY_DIR": str(self.settings.policy_dir),
                    "AGENTWARDEN_CGROUP_SCOPE": self.settings.cgroup_scope, **(env or {})}
        # `-m agentwarden` looks in the current directory first: the baseline's
        # processes (up, its probe and daemon, run) start in its tree.
        self.cwd = importable(baseline) if baseline is not None else None
        if self.cwd is not None:
            self.env["PYTHONPATH"] = str(self.cwd)
        self.log_path = workdir / "up.log"
        self.proc: subprocess.Popen | None = None
        self.children: list[psutil.Process] = []  # probe and daemon, once running
        self.note = (f"agentwarden up{f' of the tree at {baseline}' if baseline else ''}, "
                     f"tagged cgroup {cgroup.path.name} (id {cgroup.id})")

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "agentwarden", "up"], env=self.env,
                                         cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        watching = wait_until(self._watching, timeout=90, interval=0.2)
        self.children = list(self.processes().values())
        if not watching:
            raise MonitorUnavailable(f"agentwarden up did not report a probe watching "
                                     f"{self.cgroup.path} within 90 s: {_log_tail(self.log_path)}")

    def _watching(self) -> bool:
        if self.proc.poll() is not None:
            raise MonitorUnavailable(f"agentwarden up exited with {self.proc.returncode}: "
                                     f"{_log_tail(self.log_path)}")
        try:
            probe = self.status()["probe"]
        except AgentwardenError:
            return False
        return bool(probe["health"]) and str(self.cgroup.id) in probe["tags"]

    def status(self) -> dict:
        # Under load the daemon answers only between ingest batches: be patient.
        return control.request(self.settings, "status", timeout=30)["status"]

    def settle(self, timeout: float = 15.0) -> bool:
        """True once two status reads a health interval apart show an idle
        pipeline: nothing in the probe's backlog, everything the kernel
        emitted decoded, and the daemon's event count standing still."""
        previous = None

        def idle() -> bool:
            nonlocal previous
            st = self.status()
            health = st["probe"]["health"]
            now = (health.get("decoded", 0), st["daemon"]["counters"].get("events", 0))
            drained = (health.get("backlog", 0) == 0 and
                       health.get("decoded", 0) >= sum(health.get("kernel_emitted", {}).values()))
            unchanged = drained and now == previous
            previous = now if drained else None
            return unchanged

        return bool(wait_until(idle, timeout, interval=self.settings.health_interval * 1.1))

    def processes(self) -> dict[str, psutil.Process]:
        if self.proc is None or self.proc.poll() is not None:
            return {}
        parts = {}
        for child in psutil.Process(self.proc.pid).children():
            try:
                parts[child.cmdline()[-1]] = child  # "... -m agentwarden probe|daemon"
            except psutil.Error:
                pass
        return parts

    def stop(self) -> None:
        # `up` stops the probe first, so its last records reach the daemon.
        _stop_process(self.proc, signal.SIGTERM, timeout=40, children=self.children)
        self.children = []


def importable(tree: Path) -> Path:
    """A directory from which `import agentwarden` finds the tree's package
    laid out as installed (pyproject.toml's package-dir: daemon/, probe/ and
    bpf/ inside agentwarden), made of symlinks inside the tree, once."""
    site = tree / ".bench-site"
    package = site / "agentwarden"
    if not package.is_dir():
        package.mkdir(parents=True)
        for entry in (tree / "agentwarden").iterdir():
            (package / entry.name).symlink_to(entry)
        for part in ("daemon", "probe", "bpf"):
            (package / part).symlink_to(tree / part)
    return site


class Bpftrace(Monitor):
    """bpftrace on the same tracepoints, with the same cgroup filter as a
    predicate: for untagged processes it does the same minimal work."""
    name = "bpftrace"
    label = "bpftrace"

    def __init__(self, workdir: Path, cgroup: BenchCgroup, tracepoints: list[tuple[str, str]],
                 canary: Callable[[], object]):
        super().__init__()
        self.cgroup = cgroup
        self.canary = canary
        self.log_path = workdir / "bpftrace.log"
        probes = ",\n".join(f"tracepoint:{category}:{event}" for category, event in tracepoints)
        # The cgroup id is the positional parameter $1: the script is fixed text.
        self.script = f'{probes}\n/cgroup == $1/\n{{ printf("%s %d %s\\n", probe, pid, comm); }}\n'
        self.proc: subprocess.Popen | None = None
        self.note = (f"bpftrace {_bpftrace_version()}, {len(tracepoints)} tracepoints, "
                     f"predicate cgroup == {cgroup.id}")

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(["bpftrace", "-e", self.script, str(self.cgroup.id)],
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        # BEGIN fires before the probes attach; a tagged canary proves they are.
        if not wait_until(self._saw_canary, timeout=30, interval=0.1):
            raise MonitorUnavailable(f"bpftrace did not report a tagged canary within 30 s: "
                                     f"{_log_tail(self.log_path)}")

    def _saw_canary(self) -> bool:
        if self.proc.poll() is not None:
            raise MonitorUnavailable(f"bpftrace exited with {self.proc.returncode}: "
                                     f"{_log_tail(self.log_path)}")
        self.canary()
        return "tracepoint:" in self.log_path.read_text(errors="replace")

    def processes(self) -> dict[str, psutil.Process]:
        if self.proc is None or self.proc.poll() is not None:
            return {}
        return {"bpftrace": psutil.Process(self.proc.pid)}

    def stop(self) -> None:
        _stop_process(self.proc, signal.SIGINT, timeout=20)


def _bpftrace_version() -> str:
    try:
        return subprocess.run(["bpftrace", "--version"], capture_output=True, text=True,
                              timeout=10).stdout.split()[-1]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "(version unknown)"


def _auditctl(*args: str) -> str:
    result = subprocess.run(["auditctl", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise MonitorUnavailable(f"auditctl {' '.join(args)} failed: "
                                 f"{(result.stderr or result.stdout).strip()}")
    return result.stdout


def _audit_status() -> dict[str, str]:
    status = {}
    for line in _auditctl("-s").splitlines():
        key, _, value = line.partition(" ")
        status[key] = value.strip()
    return status


class Auditd(Monitor):
    """auditd with exit rules on the same syscalls, scoped to an agent uid.

    Owns the kernel audit state for the whole bench. Once audit has been
    enabled in a boot (by this bench or anything before it), every new process
    gets an audit context and takes the slow syscall path even after audit is
    disabled again, so between its own runs it keeps a `-a never,task` rule:
    the other configurations then run on a clean syscall path, as on a machine
    that never enabled audit. The host's own audit set-up is never touched.
    """
    name = "auditd"
    label = "auditd"

    def __init__(self, workdir: Path, syscalls: list[str]):
        super().__init__()
        self.confdir = workdir / "auditd"
        self.rule = ["-a", "always,exit", "-F", "arch=b64", *(a for s in syscalls for a in ("-S", s)),
                     "-F", f"uid={AGENT_UID}", "-k", AUDIT_KEY]
        self.initial_enabled: str | None = None  # set by prepare(): audit is ours to use
        self.running = False
        self.proc: subprocess.Popen | None = None
        self.mode = ""
        self.unknown: list[str] = []   # syscalls auditctl does not know (prepare)

    def prepare(self) -> None:
        status = _audit_status()
        if status.get("pid", "0") != "0":
            raise MonitorUnavailable(f"an audit daemon already runs (pid {status['pid']}): "
                                     "the host's audit is in use; not touching it")
        if _auditctl("-l").strip() != "No rules":
            raise MonitorUnavailable("the host has audit rules loaded; not touching them")
        if status.get("enabled") == "2":
            raise MonitorUnavailable("audit configuration is locked (enabled 2)")
        self.initial_enabled = status.get("enabled", "0")
        self._drop_unknown_syscalls()
        self._write_config()
        _auditctl("-a", "never,task")

    # x86-64's umount2 has its tracepoint named sys_enter_umount; audit names the syscall.
    TRACEPOINT_TO_AUDIT = {"umount": "umount2"}

    def _drop_unknown_syscalls(self) -> None:
        """auditctl refuses a whole rule for one syscall its table lacks (fchmodat2
        in bookworm's): such syscalls are left out, and the note says which."""
        known, self.unknown = [], []
        words = iter(self.rule)
        for word in words:
            if word != "-S":
                known.append(word)
                continue
            name = next(words)
            name = self.TRACEPOINT_TO_AUDIT.get(name, name)
            # ausyscall matches by prefix (umount -> umount2): only an exact name is known.
            found = subprocess.run(["ausyscall", "x86_64", name], capture_output=True, text=True)
            if found.returncode == 0 and name in (line.split()[0] for line in found.stdout.splitlines() if line):
                known.extend(("-S", name))
            else:
                self.unknown.append(name)
        self.rule = known

    def _write_config(self) -> None:
        self.confdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.confdir / "plugins.d").mkdir(exist_ok=True)
        conf = self.confdir / "auditd.conf"
        # Debian's defaults, with the log and plugins inside the bench's directory.
        conf.write_text(f"log_file = {self.confdir / 'audit.log'}\n"
                        f"plugin_dir = {self.confdir / 'plugins.d'}\n"
                        "log_format = ENRICHED\nflush = INCREMENTAL_ASYNC\nfreq = 50\n"
                        "space_left = 2\nadmin_space_left = 1\n")
        conf.chmod(0o600)  # auditd refuses a config others can write

    def start(self) -> None:
        if self.initial_enabled is None:
            raise MonitorUnavailable("not prepared")
        self.running = True
        _auditctl("-D")  # drops the never,task rule: new processes get audit contexts
        _auditctl(*self.rule)
        log_path = self.confdir / "auditd.out"
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(["auditd", "-n", "-c", str(self.confdir), "-s", "enable"],
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        if wait_until(lambda: _audit_status().get("pid") == str(self.proc.pid)
                      or self.proc.poll() is not None, timeout=10) and self.proc.poll() is None:
            self.mode = "auditd -n (records to a log file)"
        else:
            why = _log_tail(log_path) or f"exit status {self.proc.poll()}"
            _stop_process(self.proc, signal.SIGTERM, timeout=10)
            self.proc = None
            _auditctl("-e", "1")
            self.mode = f"kernel audit backlog only, no auditd (auditd did not start: {why})"
        left_out = f" (left out, unknown to auditctl: {', '.join(self.unknown)})" if self.unknown else ""
        self.note = (f"{self.mode}; rule: auditctl {' '.join(self.rule)}{left_out}; between its runs "
                     "`auditctl -a never,task` keeps audit contexts off the other configurations' "
                     "processes (once audit was enabled in a boot, they would slow every syscall)")

    def processes(self) -> dict[str, psutil.Process]:
        if self.proc is None or self.proc.poll() is not None:
            return {}
        return {"auditd": psutil.Process(self.proc.pid)}

    def stop(self) -> None:
        if not self.running:
            return
        self.running = False
        _stop_process(self.proc, signal.SIGTERM, timeout=20)
        self.proc = None
        _auditctl("-D")
        _auditctl("-e", self.initial_enabled)
        _auditctl("-a", "never,task")

    def cleanup(self) -> None:
        """Back to the state found: no rules, audit enabled as it was."""
        if self.initial_enabled is None:
            return
        self.stop()
        _auditctl("-D")
        _auditctl("-e", self.initial_enabled)
        self.initial_enabled = None
