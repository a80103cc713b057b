"""The fleet: records shipped per second by one host with nothing lost, and a
hold on that host to visible in `fleet holds` to approved-and-running.

    .venv/bin/python bench/fleet.py [--records 20000] [--holds 30]   (as root; or: make bench-fleet)

Starts a three-node nats-server JetStream cluster on 127.0.0.1
(tests/fleet_cluster.py, the permissions of docs/fleet.md), the collector
(`agentwarden fleet archive`) and its own `agentwarden up` as fleet host
"bench-a" (own run and state directories, own tagged cgroup).

- Shipping: with the cluster stopped, a workload (find over /usr, real opens)
  leaves a backlog in the host's archive; the cluster starts again, and the
  rate is the backlog over the time from the shipper's reconnection to
  JetStream's acknowledgement of its last record. Then the collector's copy
  is compared seq by seq with the host's archive: every record once.
- Holds: one `agentwarden run` session execs /usr/bin/true --holds times, each
  held by the policy. For each: from the hold record's time (the supervisor's
  clock as it holds the call) to the hold showing in the aw-holds bucket, as
  `fleet holds` reads it (polled every 2 ms over one admin connection); then
  from sending the signed approval (request/reply, as `fleet approve`) to the
  session printing the line after /usr/bin/true.

Prints the figures, saves bench/results/fleet-latest.json and rewrites the
fleet block of docs/benchmarks.md (not with --no-docs).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH.parent / "tests"))

from agentwarden import cgroups, fleet  # noqa: E402
from agentwarden.archive.segments import read_items  # noqa: E402

import report as bench_report  # noqa: E402
from fleet_cluster import NatsCluster  # noqa: E402
from monitors import BENCH_AGENT, Agentwarden, BenchCgroup, wait_until  # noqa: E402

HOST = "bench-a"
LOCK_PATH = Path("/run/lock/agentwarden-bench.lock")   # as bench/run.py
RESULTS = "fleet-latest.json"
SHELLS = '["/usr/bin/sh", "/usr/bin/dash", "/bin/sh", "/bin/dash", "/usr/bin/find"]'
POLICY = (f'[agent.{BENCH_AGENT}]\nmode = "enforce"\non-violation = "kill"\nhold-timeout = 120\n'
          f'[agent.{BENCH_AGENT}.exec]\nallow = {SHELLS}\nhold = ["/usr/bin/true *"]\n'
          f'[agent.{BENCH_AGENT}.files]\nread-allow = ["/**"]\n')
WAIT = 120.0


@contextlib.contextmanager
def one_bench_at_a_time():
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_PATH, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield


T0 = time.monotonic()


def log(what: str) -> None:
    print(f"bench-fleet: {time.monotonic() - T0:6.1f}s {what}", file=sys.stderr, flush=True)


def step(what: str, predicate, timeout: float = WAIT, interval: float = 0.01):
    log(f"waiting for {what}")
    value = wait_until(predicate, timeout, interval=interval)
    if not value:
        raise SystemExit(f"bench: no {what} within {timeout:g} s")
    return value


def summary(values_ms: list[float]) -> dict:
    ms = sorted(values_ms)
    return {"count": len(ms), "median_ms": statistics.median(ms),
            "p99_ms": statistics.quantiles(ms, n=100, method="inclusive")[98] if len(ms) > 1 else ms[0],
            "max_ms": ms[-1]}


def ship(cluster: NatsCluster, warden: Agentwarden, cgroup: BenchCgroup, central: Path, records: int) -> dict:
    cluster.stop()
    step("disconnection", lambda: not warden.status()["fleet"]["connected"])
    before = warden.status()["daemon"]["archive_state"]["next_seq"]
    # find opens every directory it lists: real open records, in the agent's cgroup.
    script = "while :; do find /usr -xdev >/dev/null 2>&1; done"
    load = subprocess.Popen(["/bin/sh", "-c", script], preexec_fn=lambda: cgroup.procs.write_text("0"))
    step(f"{records} records", lambda: warden.status()["daemon"]["archive_state"]["next_seq"] - before
         >= records, interval=0.2)
    (cgroup.path / "cgroup.kill").write_text("1")
    load.wait()
    warden.settle()
    target = warden.status()["daemon"]["archive_state"]["next_seq"] - 1
    step("durable archive", lambda: warden.status()["daemon"]["archive_state"]["durable_seq"] >= target)
    backlog = target - warden.status()["fleet"]["acked_seq"]
    cluster.start()
    acked_before = warden.status()["fleet"]["acked_seq"]
    step("reconnection", lambda: warden.status()["fleet"]["connected"], interval=0.002)
    reconnected = time.monotonic()
    # The restarted cluster elects the stream's leader first: publishes fail until then.
    step("the first acknowledgement", lambda: warden.status()["fleet"]["acked_seq"] > acked_before,
         interval=0.002)
    start, first = time.monotonic(), warden.status()["fleet"]["acked_seq"]
    step("acknowledgements", lambda: warden.status()["fleet"]["acked_seq"] >= target, interval=0.005)
    seconds = time.monotonic() - start
    # The collector reconnects on its own after the cluster's restart: its directory may not exist yet.
    step("the collector's copy", lambda: (central / HOST).is_dir()
         and any(i.seq >= target for i in read_items(central / HOST)), interval=0.5)
    local = {i.seq: i.chain for i in read_items(warden.settings.archive_dir) if i.seq <= target}
    copy = [(i.seq, i.chain) for i in read_items(central / HOST) if i.seq <= target]
    lost = len(set(local) - {s for s, _ in copy})
    repeated = len(copy) - len({s for s, _ in copy})
    differing = sum(1 for s, c in copy if local.get(s) != c)
    return {"backlog": backlog, "seconds": seconds, "records_per_s": (target - first) / seconds,
            "recovery_s": start - reconnected,
            "checked": len(local), "lost": lost, "repeated": repeated, "differing": differing}


class Lines:
    """The session's stdout, each line with the time it was read."""

    def __init__(self, stream):
        self.seen: dict[str, int] = {}
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for line in stream:
            self.seen[line.strip()] = time.time_ns()


async def holds(cluster: NatsCluster, warden: Agentwarden, key: fleet.AdminKey, count: int) -> dict:
    nats = fleet.nats_module()
    creds = fleet.load_credentials(cluster.credentials("alice"))
    nc = await nats.connect(fleet.servers(cluster.url), **fleet.connect_options(creds))
    js = nc.jetstream()
    kv = await js.key_value(fleet.HOLDS_BUCKET)
    prefix = f"$KV.{fleet.HOLDS_BUCKET}.{fleet.token(HOST)}."
    script = f"i=0; while [ $i -lt {count} ]; do /usr/bin/true held-$i; echo ran-$i; i=$((i+1)); done"
    proc = subprocess.Popen([sys.executable, "-m", "agentwarden", "run", "--agent", BENCH_AGENT, "--",
                             "/bin/sh", "-c", script], env=warden.env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    lines = Lines(proc.stdout)
    visible, running = [], []
    try:
        for number in range(count):
            deadline = time.monotonic() + WAIT
            entry = None
            while entry is None:
                if time.monotonic() > deadline:
                    raise SystemExit(f"bench: hold {number} never showed in {fleet.HOLDS_BUCKET}")
                # As `fleet holds` lists them: the bucket stream's subjects (admins may not watch it).
                info = await js.stream_info(f"KV_{fleet.HOLDS_BUCKET}", subjects_filter=prefix + ">")
                for subject in info.state.subjects or {}:
                    try:
                        got = await kv.get(subject[len(f"$KV.{fleet.HOLDS_BUCKET}."):])
                    except Exception:   # a deleted key's tombstone
                        continue
                    if got.value:
                        entry = json.loads(got.value)
                        seen = time.time_ns()
                if entry is None:
                    await asyncio.sleep(0.002)
            visible.append((seen - entry["since"]) / 1e6)
            sent = time.time_ns()
            signed = fleet.sign_decision(key, HOST, entry["hold_id"], "approve", "bench")
            reply = fleet.decode_record((await nc.request(fleet.decide_subject(HOST), signed, timeout=10)).data)
            if reply.get("state") != "approved":
                raise SystemExit(f"bench: approval of {entry['hold_id']} answered {reply}")
            step(f"ran-{number}", lambda: f"ran-{number}" in lines.seen, interval=0.001)
            running.append((lines.seen[f"ran-{number}"] - sent) / 1e6)
            while True:   # the next hold must not be mistaken for this one
                try:
                    if not (await kv.get(fleet.hold_key(HOST, entry["hold_id"]))).value:
                        break
                except Exception:
                    break
                await asyncio.sleep(0.002)
        proc.wait(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
        await nc.close()
    return {"holds": count, "visible": summary(visible), "approved_running": summary(running),
            "total": summary([a + b for a, b in zip(visible, running)])}


def measure(records: int, count: int, workdir: Path) -> dict:
    cluster = NatsCluster(workdir / "nats", [HOST], ["alice"])
    cluster.start()
    key_line = fleet.generate_key("alice", workdir / "alice.key")
    (workdir / "admins").write_text(key_line + "\n")
    central = workdir / "central"
    collector_log = open(workdir / "collector.log", "w")
    collector = subprocess.Popen([sys.executable, "-m", "agentwarden", "fleet", "archive", "--dir", str(central),
                                  "--url", cluster.url, "--credentials", str(cluster.credentials("collector"))],
                                 stdout=collector_log, stderr=subprocess.STDOUT)
    cgroup = BenchCgroup(cgroups.cgroup2_root())
    warden = Agentwarden(workdir / "agentwarden", cgroup, policy=POLICY)
    warden.env.update(AGENTWARDEN_FLEET_URL=cluster.url, AGENTWARDEN_FLEET_HOST=HOST,
                      AGENTWARDEN_FLEET_CREDENTIALS=str(cluster.credentials(HOST)),
                      AGENTWARDEN_FLEET_ADMIN_KEYS=str(workdir / "admins"))
    try:
        warden.start()
        step("the shipper's connection", lambda: warden.status()["fleet"]["connected"])
        shipping = ship(cluster, warden, cgroup, central, records)
        hold_figures = asyncio.run(holds(cluster, warden, fleet.load_admin_key(workdir / "alice.key"), count))
    finally:
        warden.stop()
        collector.terminate()
        collector.wait(timeout=30)
        collector_log.close()
        cluster.stop()
        cgroup.remove()
    return {"shipping": shipping, "holds": hold_figures}


def render(results: dict) -> dict[str, str]:
    s, h = results["shipping"], results["holds"]
    rows = [["shipping", "records/s, backlog drained", f"{s['backlog']}", f"{s['records_per_s']:,.0f}", "", ""]]
    notes_first = [f"after the cluster's restart, {s['recovery_s']:.1f} s passed from the shipper's "
                   "reconnection to its first acknowledgement (the stream electing its leader): not "
                   "counted in the rate"]
    for name, label in (("visible", "hold → visible in fleet holds"),
                        ("approved_running", "approve sent → running"), ("total", "hold → running")):
        v = h[name]
        rows.append(["holds", label, f"{v['count']}", f"{v['median_ms']:.1f}", f"{v['p99_ms']:.1f}",
                     f"{v['max_ms']:.1f}"])
    notes = notes_first + [f"the collector's copy of seqs 0..{s['checked'] - 1}: {s['lost']} lost, {s['repeated']} repeated, "
             f"{s['differing']} differing from the host's archive"]
    intro = ("One host (`agentwarden up` as fleet host bench-a) on a three-node nats-server 2.9 JetStream "
             "cluster on 127.0.0.1 with the collector running. Shipping: a backlog left while the cluster "
             "was down, drained from the shipper's reconnection to the last acknowledgement (R3 stream, "
             "512 records in flight). Holds: an exec held in a real `agentwarden run` session; visible = "
             "from the hold record's time to its entry in aw-holds; running = from sending the signed "
             "approval (request/reply) to the session's next line.")
    section = bench_report.Section("Fleet: shipping and holds over NATS", intro,
                                    ["part", "what", "count", "median ms / rate", "p99 ms", "max ms"],
                                    rows, notes, text_columns=2)
    return bench_report.block("fleet", results, section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Example: .venv/bin/python bench/fleet.py --records 20000")
    parser.add_argument("--records", type=int, default=20000, help="backlog to ship (default 20000)")
    parser.add_argument("--holds", type=int, default=30, help="holds to approve (default 30)")
    args, meta, started = bench_report.bench_args(parser, "fleet.py", "bench-fleet")
    workdir = Path(tempfile.mkdtemp(prefix="agentwarden-bench-fleet-"))
    try:
        with one_bench_at_a_time():
            results = measure(args.records, args.holds, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    bench_report.publish(results, meta, started, lambda r: "\n".join(
        f"{k}: {json.dumps(v)}" for k, v in r.items()) + "\n", RESULTS, render, docs=not args.no_docs)


if __name__ == "__main__":
    main()
