"""The measurements: what each monitor costs processes it does not watch, how
many tagged events per second agentwarden archives without loss, and the
memory its processes take meanwhile."""
from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

from agentwarden.control import DaemonUnavailable
from monitors import (Agentwarden, BenchCgroup, Monitor, MonitorUnavailable, NoMonitor,
                      other_bpf_users, wait_until)
from prereqs import BenchError, Workload

# ---- untagged overhead ------------------------------------------------------


@dataclass(frozen=True)
class OverheadPlan:
    rounds: int  # visits of each monitor
    reps: int    # runs of each workload per visit


@dataclass
class Visit:
    """One stretch of workload runs under one configuration."""
    config: str
    samples: dict[str, list[float]] = field(default_factory=dict)  # workload -> ns/op per run
    other_bpf_users: list[str] = field(default_factory=list)  # seen when it began

    def median(self, workload: str) -> float:
        return statistics.median(self.samples[workload])


def _visit(monitor: Monitor, workloads: dict[str, Callable[[], float]], reps: int) -> Visit:
    visit = Visit(monitor.name, {name: [] for name in workloads},
                  other_bpf_users(monitor.processes().values()))
    for _ in range(reps):
        for name, run in workloads.items():  # alternate, so drift hits all alike
            visit.samples[name].append(run())
    return visit


def measure_untagged(monitors: list[Monitor], workloads: dict[str, Callable[[], float]],
                     plan: OverheadPlan, log) -> dict:
    """Runs the workloads with no monitor and under each monitor in turn.

    The sequence is none, A, none, B, none, C, none, B, none, C, none, A...:
    every monitor visit sits between two baseline visits, and its slowdown is
    measured against their mean, which cancels the slow drift of a shared VM.
    The monitor order rotates from round to round.
    """
    baseline = NoMonitor()
    skipped: dict[str, str] = {}
    rss: dict[str, list[int]] = {m.name: [] for m in monitors}
    visits = [_visit(baseline, workloads, plan.reps)]
    for round_ in range(plan.rounds if monitors else 0):
        turn = round_ % len(monitors)
        for monitor in monitors[turn:] + monitors[:turn]:
            if monitor.name in skipped:
                continue
            log(f"round {round_ + 1}/{plan.rounds}: {monitor.label}")
            try:
                monitor.start()
            except MonitorUnavailable as exc:
                monitor.stop()
                skipped[monitor.name] = str(exc)
                log(f"skipping {monitor.label}: {exc}")
                continue
            try:
                rss[monitor.name].append(sum(monitor.rss_bytes().values()))
                visits.append(_visit(monitor, workloads, plan.reps))
            finally:
                monitor.stop()
            visits.append(_visit(baseline, workloads, plan.reps))
    return _summarise(visits, [baseline, *monitors], workloads, skipped, rss)


def _summarise(visits: list[Visit], configs: list[Monitor], workloads, skipped, rss) -> dict:
    blurred = [v for v in visits if v.other_bpf_users]
    result = {"configs": {}, "workloads": {name: {} for name in workloads},
              "sequence": [v.config for v in visits],
              "visits_with_other_bpf_users": len(blurred),
              "other_bpf_users": sorted({u for v in blurred for u in v.other_bpf_users})}
    for config in configs:
        mine = [i for i, v in enumerate(visits) if v.config == config.name]
        result["configs"][config.name] = {
            "label": config.label, "note": config.note, "skipped": skipped.get(config.name),
            "visits": len(mine),
            "rss_bytes": statistics.median(rss[config.name]) if rss.get(config.name) else None}
        if not mine:
            continue
        for name in workloads:
            samples = [s for i in mine for s in visits[i].samples[name]]
            entry = {"ns_per_op": statistics.median(samples), "samples": samples}
            if config.name != "none":
                # Each visit against the mean of the baseline visits around it.
                ratios = [visits[i].median(name) /
                          statistics.mean([visits[i - 1].median(name), visits[i + 1].median(name)])
                          for i in mine]
                quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
                entry.update(ratio=statistics.median(ratios), ratio_min=min(ratios),
                             ratio_max=max(ratios), ratio_q1=quartiles[0], ratio_q3=quartiles[2],
                             ratios=ratios)
            result["workloads"][name][config.name] = entry
    return result


# ---- tagged throughput --------------------------------------------------------


@dataclass(frozen=True)
class ThroughputPlan:
    rates: list[int]       # target opens per second, one run each
    seconds: float         # length of each run
    files: int             # distinct files the workload cycles through
    drain_timeout: float   # how long the archive may take to catch up after a run
    # A run whose archive lags more than this at the end was not sustained:
    # buffers hid a pipeline slower than the rate, a longer run would lose.
    drain_limit: float = 0.5


@dataclass(frozen=True)
class PipelineCounters:
    """The counters that follow the workload's opens through the pipeline."""
    emitted_open: int   # the kernel put them in the ring buffer, a record each
    dropped_open: int   # the kernel could not (ring buffer or in-flight map full)
    folded_open: int    # the kernel counted them under an earlier open's key (repeats)
    archived_open: int  # the daemon archived them (a record of repeats counts as many)
    archived_records: int  # the open records that carried them
    stage_drops: dict[str, int]  # gap records by stage, as the daemon counted them

    @classmethod
    def read(cls, aw: Agentwarden) -> "PipelineCounters":
        st = aw.status()
        health, counters = st["probe"]["health"], st["daemon"]["counters"]
        return cls(health.get("kernel_emitted", {}).get("open", 0),
                   health.get("kernel_dropped", {}).get("open", 0),
                   health.get("kernel_folded_opens", 0),
                   counters.get("opens", counters.get("records_open", 0)),
                   counters.get("records_open", 0),
                   dict(st["drops"]))

    def since(self, before: "PipelineCounters") -> "PipelineCounters":
        stages = set(self.stage_drops) | set(before.stage_drops)
        return PipelineCounters(
            self.emitted_open - before.emitted_open, self.dropped_open - before.dropped_open,
            self.folded_open - before.folded_open, self.archived_open - before.archived_open,
            self.archived_records - before.archived_records,
            {s: self.stage_drops.get(s, 0) - before.stage_drops.get(s, 0) for s in stages
             if self.stage_drops.get(s, 0) != before.stage_drops.get(s, 0)})

    @property
    def kernel_seen(self) -> int:
        return self.emitted_open + self.dropped_open + self.folded_open


def _cpu_seconds(processes: dict[str, psutil.Process]) -> dict[str, float]:
    seconds = {}
    for part, proc in processes.items():
        try:
            times = proc.cpu_times()
            seconds[part] = times.user + times.system
        except psutil.Error:
            pass
    return seconds


def _throughput_step(aw: Agentwarden, workload: Workload, cgroup: BenchCgroup, files_dir: Path,
                     rate: int, plan: ThroughputPlan) -> dict:
    settled = aw.settle()  # if not, the counts may include what came before
    before = PipelineCounters.read(aw)
    processes = aw.processes()
    others = other_bpf_users(processes.values())
    cpu_before = _cpu_seconds(processes)
    started = time.monotonic()
    out = workload.open_at_rate(rate, plan.seconds, files_dir, plan.files, cgroup.procs)
    ended = time.monotonic()
    ops = out["ops"]
    slowest_status = 0.0

    def counted() -> PipelineCounters | None:
        """Counts since the run began; None while the daemon is too busy to answer."""
        nonlocal slowest_status
        asked = time.monotonic()
        try:
            now = PipelineCounters.read(aw)
        except DaemonUnavailable:
            now = None
        slowest_status = max(slowest_status, time.monotonic() - asked)
        return now.since(before) if now else None

    def reached(condition: Callable[[PipelineCounters], bool]) -> Callable[[], bool]:
        def check() -> bool:
            delta = counted()
            return delta is not None and condition(delta)
        return check

    # Drained: every open the kernel did not drop is in the archive. The probe
    # reports drops once a second, so when some were dropped this also waits
    # for that report.
    drained = wait_until(reached(lambda d: d.archived_open + d.dropped_open >= ops),
                         timeout=plan.drain_timeout)
    lag = time.monotonic() - ended if drained else None
    cpu_after = _cpu_seconds(processes)
    window = time.monotonic() - started
    # Kernel counters travel in the probe's health record, once a second.
    wait_until(reached(lambda d: d.kernel_seen >= ops), timeout=5)
    delta = wait_until(counted, timeout=120)
    if delta is None:
        raise BenchError("the agentwarden daemon answered no status request for 2 minutes "
                         f"after a run at {rate:,} opens/s")
    elapsed = out["elapsed_ns"] / 1e9
    return {
        "target_rate": rate, "achieved_rate": ops / elapsed, "ops": ops,
        "late_ticks": out["late_ticks"], "other_bpf_users": others, "settled": settled,
        "kernel_emitted": delta.emitted_open, "kernel_dropped": delta.dropped_open,
        "stage_drops": delta.stage_drops, "archived": delta.archived_open,
        "kernel_folded": delta.folded_open, "records": delta.archived_records,
        # Anything the kernel saw but the archive lacks, wherever it was lost.
        "lost": delta.kernel_seen - delta.archived_open,
        # Nonzero when the kernel counted opens other than the workload's, or
        # missed some of them: then the figures are approximate.
        "unexplained": delta.kernel_seen - ops,
        "drain_lag_s": lag,
        # What the pipeline really moved: opens archived per second, counting
        # the time it needed after the workload to catch up.
        "archive_rate": delta.archived_open / (elapsed + lag) if lag is not None else None,
        # The daemon answers its control socket between ingest batches.
        "slowest_status_s": slowest_status,
        "cpu_percent": {part: 100 * (cpu_after[part] - cpu_before[part]) / window
                        for part in cpu_after if part in cpu_before},
    }


def sustained(step: dict, plan: ThroughputPlan) -> bool:
    """No loss, and the archive kept up with the workload."""
    return (step["lost"] <= 0 and step["drain_lag_s"] is not None
            and step["drain_lag_s"] <= plan.drain_limit)


def measure_throughput(aw: Agentwarden, workload: Workload, cgroup: BenchCgroup, files_dir: Path,
                       plan: ThroughputPlan, log) -> dict:
    steps = []
    for rate in plan.rates:
        log(f"tagged opens at {rate:,}/s for {plan.seconds:g} s")
        step = _throughput_step(aw, workload, cgroup, files_dir, rate, plan)
        step["sustained"] = sustained(step, plan)
        steps.append(step)
        if step["lost"] or step["drain_lag_s"] is None or step["drain_lag_s"] > plan.seconds:
            break  # far past the limit: higher rates would only take longer to show it
    good = [s for s in steps if s["sustained"]]
    return {"steps": steps, "not_run": plan.rates[len(steps):],
            "seconds": plan.seconds, "files": plan.files,
            "drain_limit_s": plan.drain_limit, "drain_timeout_s": plan.drain_timeout,
            "sustained_rate": max((s["achieved_rate"] for s in good), default=None)}


class PeakRss:
    """Samples the RSS of some processes in a thread; keeps the maximum of each."""

    def __init__(self, processes: dict[str, psutil.Process], interval: float = 0.2):
        self.processes = processes
        self.interval = interval
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for part, proc in self.processes.items():
                try:
                    self.peak[part] = max(self.peak.get(part, 0), proc.memory_info().rss)
                except psutil.Error:
                    pass

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
