"""Flood: the largest rate of tagged opens at which every record still reaches
the archive, and above it, what the exact counts say.

    .venv/bin/python bench/flood.py [--quick]   (as root; or: make bench-flood;
                                                  also a part of make bench, --skip-flood)

Starts its own `agentwarden up` (own run and state directories, own tagged
cgroup) with an enforce policy in force: every open of the flood is decided
(allowed), and one program, forbidden-tool, is denied (killed in the kernel).
Each step runs FLOODERS processes of bench/flood.c (static, so nothing runs in
them that the bench did not count) in the agent cgroup, opening and closing
files in tight loops paced to a total target rate, or unpaced. While they
flood, another process of the same agent execs forbidden-tool a few times,
each with its own mark in argv, and as many times forbidden-lingering, which
no allow rule matches: the daemon kills it in user space; left alone it would
run 30 s. "Ran" is its exit record's time minus its exec record's: how long
a forbidden program kept running while the pipeline was flooded.

The workload counts the records it makes, per kind, exactly: one `open` per
open, one `fd` per close (the first is the close of cgroup.procs after the
join), one `exec` per forbidden exec, one `exit` per process. For each step the
bench reads the probe's kernel_emitted / kernel_dropped per kind, the daemon's
archived records per kind and gap records by stage (their per-kind detail from
the archive), waits until they account for every record made (or the drain
timeout), and checks that made = archived + counted drops, kind by kind. A
forbidden exec is identified when the archive holds its exec record (by path
and mark) and the daemon's violation naming it; "after" is that violation's
time minus the exec record's (the syscall's) time.

The rates: a ladder doubling from the start rate until a step loses records,
then a few bisection steps between the highest complete rate and the lowest
lossy one, then one unpaced step. Prints the tables, saves
bench/results/flood-latest.json and rewrites the flood block of
docs/benchmarks.md (not with --no-docs).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentwarden import control  # noqa: E402
from agentwarden.archive.segments import list_segments, segment_items  # noqa: E402
from agentwarden.control import DaemonUnavailable  # noqa: E402

import report as bench_report  # noqa: E402  (bench/report.py, beside this file)
from monitors import BENCH_AGENT, Agentwarden, BenchCgroup, other_bpf_users, wait_until  # noqa: E402
from prereqs import BENCH_DIR, BenchError  # noqa: E402

FLOOD_SOURCE = BENCH_DIR / "flood.c"
FORBIDDEN = "forbidden-tool"
FORBIDDEN_USER = "forbidden-lingering"   # killed by the daemon (no allow rule), else runs 30 s
UNPACED = 0                      # a step's target rate when the flood is not paced
KINDS = ("open", "fd", "exec", "exit")   # the kinds the workload makes
# Gap stages whose detail names the kinds lost ("kind=count, ..."); the others
# (transport, probe-decode, malformed) cannot say which kinds they lost.
_KIND_COUNT = re.compile(r"\b([a-z]+)=(\d+)\b")


@dataclass(frozen=True)
class FloodPlan:
    name: str
    seconds: float        # flood length of each step
    start_rate: int       # opens/s of the ladder's first step, all flooders together
    max_rate: int         # the ladder stops doubling here (then unpaced)
    bisections: int       # steps between the highest complete and the lowest lossy rate
    execs: int            # forbidden execs per step, spread over the flood
    flooders: int = 4
    files: int = 2_000    # distinct files each flooder cycles through
    drain_timeout: float = 60.0
    # Bisection stops once the lossy rate is within this factor of the complete one.
    resolution: float = 1.15


PROFILES = {
    "full": FloodPlan("full", seconds=5, start_rate=10_000, max_rate=640_000, bisections=4, execs=5),
    "quick": FloodPlan("quick", seconds=2, start_rate=20_000, max_rate=320_000, bisections=2, execs=3),
}


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# ---- the rates: a ladder, then bisection, then unpaced (pure) -----------------


def _round_rate(rate: float) -> int:
    step = 1_000 if rate < 100_000 else 5_000
    return max(step, int(round(rate / step)) * step)


def next_rate(done: list[tuple[int, bool, float]], plan: FloodPlan) -> int | None:
    """The next target rate given the steps done, (target, every record
    arrived, achieved opens/s) each; UNPACED once the paced steps have found
    the limit (or cannot); None when the unpaced step is done."""
    if any(target == UNPACED for target, _, _ in done):
        return None
    if not done:
        return plan.start_rate
    complete = [t for t, ok, _ in done if ok]
    lossy = [t for t, ok, _ in done if not ok]
    if not lossy:
        target, _, achieved = done[-1]
        if achieved < 0.9 * target or 2 * target > plan.max_rate:
            return UNPACED   # the workload cannot go faster paced, or the ladder's top
        return 2 * target
    high = min(lossy)
    first_lossy = next(i for i, (_, ok, _) in enumerate(done) if not ok)
    if len(done) - 1 - first_lossy >= plan.bisections:
        return UNPACED
    below = [t for t in complete if t < high]
    low = max(below) if below else None
    if low is None:   # the first step lost: halve
        candidate = _round_rate(high / 2)
    elif high / low <= plan.resolution:
        return UNPACED
    else:
        candidate = _round_rate((low + high) / 2)
    if candidate in {t for t, _, _ in done} or candidate >= high or (low and candidate <= low):
        return UNPACED
    return candidate


# ---- the accounting (pure) ------------------------------------------------------


def gap_kinds(detail: str) -> dict[str, int]:
    """{kind: count} named in a gap record's detail ("...: exec=1, open=5")."""
    return {kind: int(n) for kind, n in _KIND_COUNT.findall(detail or "")}


def account(made: dict[str, int], emitted: dict[str, int], dropped: dict[str, int],
            archived: dict[str, int], gaps: list[dict]) -> dict:
    """Per kind: made, what the kernel emitted and dropped, the drops of later
    stages (gap records that name the kind), archived, lost = made - archived;
    it adds up when lost equals the drops counted for that kind. Gap records
    of the kernel stage are checked against the kernel's own drop counters.
    Drops that name no kind (transport, decode) are `unattributed`."""
    kernel_gaps: dict[str, int] = {}
    later: dict[str, int] = {}
    unattributed = 0
    by_stage: dict[str, int] = {}
    for gap in gaps:
        by_stage[gap["stage"]] = by_stage.get(gap["stage"], 0) + gap["count"]
        kinds = gap_kinds(gap.get("detail", ""))
        if sum(kinds.values()) != gap["count"]:
            unattributed += gap["count"]
            continue
        into = kernel_gaps if gap["stage"] == "kernel" else later
        for kind, n in kinds.items():
            into[kind] = into.get(kind, 0) + n
    kinds = {}
    for kind in sorted(set(made) | set(emitted) | set(dropped) | set(archived) | set(later)):
        m, a = made.get(kind, 0), archived.get(kind, 0)
        e, d, after = emitted.get(kind, 0), dropped.get(kind, 0), later.get(kind, 0)
        kinds[kind] = {"made": m, "kernel_emitted": e, "kernel_dropped": d, "later_dropped": after,
                       "archived": a, "lost": m - a, "kernel_saw_all": e + d == m,
                       "gap_records_match_kernel": kernel_gaps.get(kind, 0) == d,
                       "adds_up": m == a + d + after}
    lost = sum(k["lost"] for k in kinds.values())
    return {"kinds": kinds, "gaps_by_stage": by_stage, "unattributed": unattributed,
            "lost": lost, "every_record": lost == 0,
            "adds_up": all(k["adds_up"] for k in kinds.values()) and unattributed == 0}


# ---- measuring ------------------------------------------------------------------


def build(workdir: Path) -> tuple[Path, Path, Path]:
    """The static flood binary, and its copies that are the forbidden programs."""
    binary = workdir / "flood"
    result = subprocess.run(["gcc", "-O2", "-Wall", "-static", "-o", str(binary), str(FLOOD_SOURCE)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise BenchError(f"gcc could not build {FLOOD_SOURCE} (static: needs libc6-dev):\n{result.stderr}")
    forbidden = workdir / FORBIDDEN
    shutil.copy(binary, forbidden)
    lingering = workdir / FORBIDDEN_USER
    shutil.copy(binary, lingering)
    return binary, forbidden, lingering


def policy(files_dir: Path, forbidden: Path) -> str:
    return (f'[agent.{BENCH_AGENT}]\nmode = "enforce"\non-violation = "kill"\n'
            f'[agent.{BENCH_AGENT}.exec]\ndeny = ["{forbidden}"]\n'
            f'[agent.{BENCH_AGENT}.files]\nread-allow = ["{files_dir}/**"]\n')


@dataclass
class Counts:
    """The pipeline's counters for the workload's kinds, at one moment."""
    emitted: dict[str, int]
    dropped: dict[str, int]
    archived: dict[str, int]
    drops: dict[str, int]   # gap records by stage, as the daemon counted them
    archive_seq: int        # the seq the daemon's next archived record takes

    @classmethod
    def read(cls, aw: Agentwarden) -> "Counts":
        st = aw.status()
        health, counters = st["probe"]["health"], st["daemon"]["counters"]
        # Opens: repeats folded in the kernel count as seen there, and a record of
        # repeats as the opens it stands for (counters["opens"]).
        folded = health.get("kernel_folded_opens", 0)
        return cls({k: health.get("kernel_emitted", {}).get(k, 0) + (folded if k == "open" else 0)
                    for k in KINDS},
                   {k: health.get("kernel_dropped", {}).get(k, 0) for k in KINDS},
                   {k: counters.get("opens", 0) if k == "open" else counters.get(f"records_{k}", 0)
                    for k in KINDS},
                   dict(st["drops"]), st["daemon"]["archive_seq"])

    def since(self, before: "Counts") -> "Counts":
        def minus(a: dict, b: dict) -> dict:
            return {k: a.get(k, 0) - b.get(k, 0) for k in set(a) | set(b) if a.get(k, 0) != b.get(k, 0)}
        return Counts({k: self.emitted[k] - before.emitted[k] for k in KINDS},
                      {k: self.dropped[k] - before.dropped[k] for k in KINDS},
                      {k: self.archived[k] - before.archived[k] for k in KINDS},
                      minus(self.drops, before.drops), self.archive_seq)

    def accounted(self) -> int:
        """Records archived or counted as dropped by some stage."""
        return sum(self.archived.values()) + sum(self.drops.values())

    def kernel_seen(self) -> int:
        return sum(self.emitted.values()) + sum(self.dropped.values())


def records_from(archive_dir: Path, first: int):
    """The archive's records from seq `first` on (segments wholly before it skipped)."""
    segments = list_segments(archive_dir)
    for index, segment in enumerate(segments):
        if index + 1 < len(segments) and segments[index + 1].first_seq <= first:
            continue
        for item in segment_items(segment):
            if item.seq >= first:
                yield item.record


def _forbidden_found(records, marks: dict[str, dict]) -> list[dict]:
    """Each forbidden exec (marks: mark -> its program, return code, whether
    the daemon kills it in user space): its exec record (path and mark),
    violation and, for a user-space kill, how long it ran (exit - exec)."""
    programs = {run["program"] for run in marks.values()}
    execs, violations, exits = {}, {}, {}
    for record in records:
        kind = record.get("kind")
        if kind == "exec" and record.get("exec_path") in programs:
            mark = (record.get("argv") or [None, None, None])[-1]
            execs[mark] = record
        elif kind == "exit":
            exits.setdefault(record.get("pid"), []).append(record)
        elif kind == "violation" and record.get("event") == "exec":
            for mark, run in marks.items():
                if mark in record.get("attempted", "") and run["program"] in record.get("attempted", ""):
                    violations[mark] = record
    found = []
    for mark, run in marks.items():
        exec_record, violation = execs.get(mark), violations.get(mark)
        identified = exec_record is not None and violation is not None
        exit_record = next((e for e in exits.get(exec_record["pid"], []) if e["time"] >= exec_record["time"]),
                           None) if exec_record else None
        found.append({"mark": mark, "returncode": run["returncode"], "exec_recorded": exec_record is not None,
                      "violation": violation is not None, "identified": identified,
                      "killed_in_kernel": bool(exec_record and exec_record.get("killed_in_kernel")),
                      "after_ms": (violation["time"] - exec_record["time"]) / 1e6 if identified else None,
                      "user_space": run["user_space"],
                      "killed": bool(violation and violation["action_taken"].startswith("killed process")),
                      "action_taken": violation["action_taken"] if violation else None,
                      "ran_ms": (exit_record["time"] - exec_record["time"]) / 1e6 if exit_record else None})
    return found


def flood_step(aw: Agentwarden, binary: Path, forbidden: Path, lingering: Path, cgroup: BenchCgroup,
               files_dir: Path, plan: FloodPlan, rate: int, number: int) -> dict:
    settled = aw.settle()
    others = other_bpf_users(aw.processes().values())
    before = Counts.read(aw)
    per_flooder = rate / plan.flooders
    argv = [str(binary), "flood", f"{per_flooder:.3f}", f"{plan.seconds:g}", str(files_dir),
            str(plan.files), str(cgroup.procs)]
    started = time.monotonic()
    flooders = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(plan.flooders)]
    marks: dict[str, dict] = {}
    lingerers: dict[str, subprocess.Popen] = {}
    try:
        for i in range(plan.execs):   # spread over the flood, from another process of the agent
            time.sleep(max(0.0, started + plan.seconds * (i + 1) / (plan.execs + 1) - time.monotonic()))
            mark = f"flood-step{number}-exec{i}"
            done = subprocess.run([str(binary), "exec", str(cgroup.procs), str(forbidden), mark],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            marks[mark] = {"returncode": done.returncode, "program": str(forbidden), "user_space": False}
            mark = f"flood-step{number}-user{i}"   # the daemon's to kill; not waited for here
            lingerers[mark] = subprocess.Popen([str(binary), "exec", str(cgroup.procs), str(lingering), mark,
                                                "linger"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        outputs = [f.communicate(timeout=plan.seconds + 120) for f in flooders]
        for mark, proc in lingerers.items():   # killed by the daemon, or done after 30 s
            marks[mark] = {"returncode": proc.wait(timeout=120), "program": str(lingering), "user_space": True}
    finally:
        for f in [*flooders, *lingerers.values()]:
            if f.poll() is None:
                f.kill()
                f.wait()
    ended = time.monotonic()
    for f, (_, err) in zip(flooders, outputs):
        if f.returncode != 0:
            raise BenchError(f"a flooder failed ({f.returncode}): {err.strip()}")
    outs = [json.loads(out) for out, _ in outputs]
    opens = sum(o["opens"] for o in outs)
    elapsed = max(o["elapsed_ns"] for o in outs) / 1e9
    execs = len(marks)   # forbidden execs, both programs
    made = {"open": opens, "fd": sum(o["closes"] for o in outs) + execs,
            "exec": execs, "exit": plan.flooders + execs}

    def counted() -> Counts | None:
        try:
            return Counts.read(aw).since(before)
        except DaemonUnavailable:
            return None   # busy ingesting: it answers between batches

    total = sum(made.values())
    drained = wait_until(lambda: (c := counted()) and c.accounted() >= total and c.kernel_seen() >= total,
                         timeout=plan.drain_timeout, interval=0.1)
    lag = time.monotonic() - ended if drained else None
    wait_until(lambda: (c := counted()) and c.kernel_seen() >= total, timeout=5)
    delta = wait_until(counted, timeout=120)
    if delta is None:
        raise BenchError(f"the daemon answered no status request for 2 minutes after a flood at {rate:,}/s")
    read_started = time.monotonic()
    records = list(records_from(aw.settings.archive_dir, before.archive_seq))
    gaps = [r for r in records if r.get("kind") == "gap"]
    forbidden_execs = _forbidden_found(records, marks)
    del records
    accounting = account(made, delta.emitted, delta.dropped, delta.archived, gaps)
    step = {"target_rate": rate, "flooders": plan.flooders, "seconds": elapsed, "opens": opens,
            "achieved_rate": opens / elapsed, "late_ticks": sum(o["late_ticks"] for o in outs),
            "made": made, "records_made": total, "records_made_per_s": total / elapsed,
            "settled": settled, "other_bpf_users": others, "drain_s": lag, "stage_drops": delta.drops,
            "archive_read_s": time.monotonic() - read_started,
            "forbidden": forbidden_execs, **accounting}
    found = sum(f["identified"] for f in forbidden_execs)
    user = [f for f in forbidden_execs if f["user_space"]]
    ran = sorted(f["ran_ms"] for f in user if f["ran_ms"] is not None)
    log(f"  {step['achieved_rate']:,.0f} opens/s ({total / elapsed:,.0f} records/s): "
        f"lost {step['lost']:,} of {total:,}, "
        f"{'adds up' if step['adds_up'] else 'does NOT add up'}; drain "
        f"{'timeout' if lag is None else f'{lag:.2f} s'}; forbidden execs identified {found}/{execs}; "
        f"killed by the daemon {sum(f['killed'] for f in user)}/{len(user)}"
        + (f", ran {ran[len(ran) // 2]:,.0f} ms median, {ran[-1]:,.0f} max" if ran else ""))
    return step


def _wait_for_kernel_rules(aw: Agentwarden) -> None:
    wanted = control.request(aw.settings, "reload", timeout=10)["policy_hash"]
    if not wait_until(lambda: aw.status()["probe"]["health"].get("kernel_rules_policy") == wanted, timeout=15):
        raise BenchError("the probe did not load the policy's in-kernel rules within 15 s")


def measure(plan: FloodPlan, workdir: Path, cgroup: BenchCgroup) -> dict:
    """Needs root; an agentwarden of its own under `workdir`, watching `cgroup`."""
    binary, forbidden, lingering = build(workdir)
    files_dir = workdir / "flood-files"
    files_dir.mkdir()
    for i in range(plan.files):
        # Directories: the kernel sends the close of a directory fd (one of a
        # read-only regular file it only counts), so each close stays a record.
        (files_dir / f"f{i}").mkdir()
    aw = Agentwarden(workdir / "flood-agentwarden", cgroup, policy=policy(files_dir, forbidden))
    try:
        log("flood: starting agentwarden")
        aw.start()
        aw.settle()
        _wait_for_kernel_rules(aw)
        steps: list[dict] = []
        while (rate := next_rate([(s["target_rate"], s["every_record"], s["achieved_rate"]) for s in steps],
                                 plan)) is not None:
            log(f"flood: {plan.flooders} processes, "
                f"{'unpaced' if rate == UNPACED else f'{rate:,} opens/s'} for {plan.seconds:g} s")
            steps.append(flood_step(aw, binary, forbidden, lingering, cgroup, files_dir, plan, rate, len(steps)))
    finally:
        aw.stop()
    complete = [s for s in steps if s["every_record"]]
    lossy = [s for s in steps if not s["every_record"]]
    return {"plan": asdict(plan), "steps": steps,
            "largest_complete_rate": max((s["achieved_rate"] for s in complete), default=None),
            "lowest_lossy_rate": min((s["achieved_rate"] for s in lossy), default=None),
            "lossy_steps_add_up": all(s["adds_up"] for s in lossy),
            "forbidden_identified": sum(f["identified"] for s in steps for f in s["forbidden"]),
            "forbidden_execs": sum(len(s["forbidden"]) for s in steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Example: sudo .venv/bin/python bench/flood.py --quick")
    parser.add_argument("--quick", action="store_true", help="a short run (about a minute)")
    args, meta, started = bench_report.bench_args(parser, "flood.py", "bench-flood")
    if os.geteuid() != 0:
        sys.exit("bench: run as root (it loads BPF programs and makes cgroups)")
    from agentwarden import cgroups
    from run import one_bench_at_a_time   # bench/run.py: one bench at a time on the machine
    plan = PROFILES["quick" if args.quick else "full"]
    meta["profile"] = plan.name
    workdir = Path(tempfile.mkdtemp(prefix="agentwarden-bench-flood-"))
    try:
        with one_bench_at_a_time():
            cgroup = BenchCgroup(cgroups.cgroup2_root())
            try:
                results = measure(plan, workdir, cgroup)
            finally:
                cgroup.remove()
    except BenchError as exc:
        sys.exit(f"bench: error: {exc}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    bench_report.publish(results, meta, started, lambda r: bench_report.render_text(
        r, "flood bench", bench_report.flood_sections(r)), bench_report.FLOOD_RESULTS,
        bench_report.flood_blocks, docs=not args.no_docs)


if __name__ == "__main__":
    main()
