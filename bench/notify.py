"""Hold to notification delivered: how soon notify_command and notify_webhook
have a hold, from the hold record's time, median and p99.

    .venv/bin/python bench/notify.py [--holds 50]   (as root; or: make bench-notify)

Starts its own `agentwarden up` (own run and state directories, own tagged
cgroup, a policy that holds every exec of /usr/bin/true) with notify_command set
to bench/notify_receiver.c (C: it notes the time it starts, then reads the JSON)
and notify_webhook to an http.server on 127.0.0.1 in this process, which notes
the time each POST arrives. One `agentwarden run` session execs /usr/bin/true
--holds times; each hold is approved through the supervisor's socket once both
receivers have its pending record, so each measures one delivery, not a queue.

Prints the figures, saves them in bench/results/notify-latest.json and rewrites
the notify block of docs/benchmarks.md (not with --no-docs).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentwarden import cgroups, session  # noqa: E402

import report as bench_report  # noqa: E402  (bench/report.py, beside this file)
from monitors import BENCH_AGENT, Agentwarden, BenchCgroup, wait_until  # noqa: E402
from sessions import build  # noqa: E402

SHELLS = '["/usr/bin/sh", "/usr/bin/dash", "/bin/sh", "/bin/dash"]'
POLICY = (f'[agent.{BENCH_AGENT}]\nmode = "enforce"\non-violation = "kill"\n'
          f'[agent.{BENCH_AGENT}.exec]\nallow = {SHELLS}\nhold = ["/usr/bin/true *"]\n'
          f'[agent.{BENCH_AGENT}.files]\nread-allow = ["/**"]\n')
WAIT = 30.0  # seconds for any one step before the bench gives up


class Webhook:
    """notify_webhook: an http.server on 127.0.0.1 noting (arrival ns, body)."""

    def __init__(self):
        self.received: list[tuple[int, dict]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                now = time.time_ns()
                received.append((now, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hold"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def command_received(log: Path) -> list[tuple[int, dict]]:
    if not log.exists():
        return []
    lines = log.read_text().splitlines()
    return [(int(ns), json.loads(body)) for ns, body in (line.split(" ", 1) for line in lines)]


def has(received: list[tuple[int, dict]], hold_id: str, state: str) -> bool:
    return any(body["hold_id"] == hold_id and body["state"] == state for _, body in received)


def summary(latencies_ns: list[int]) -> dict:
    ms = sorted(n / 1e6 for n in latencies_ns)
    return {"count": len(ms), "median_ms": statistics.median(ms),
            "p99_ms": statistics.quantiles(ms, n=100, method="inclusive")[98] if len(ms) > 1 else ms[0],
            "max_ms": ms[-1]}


def latencies(received: list[tuple[int, dict]]) -> dict:
    by_state = {"pending": [], "decided": []}
    for arrived, body in received:
        by_state["pending" if body["state"] == "pending" else "decided"].append(arrived - body["time"])
    return {**{state: summary(v) for state, v in by_state.items() if v},
            "all": summary(by_state["pending"] + by_state["decided"])}


def step(what: str, predicate):
    value = wait_until(predicate, WAIT, interval=0.002)
    if not value:
        raise SystemExit(f"bench: no {what} within {WAIT:g} s")
    return value


def measure(holds: int, workdir: Path) -> dict:
    receiver = build(workdir, "notify_receiver")
    command_log = workdir / "command.log"
    webhook = Webhook()
    cgroup = BenchCgroup(cgroups.cgroup2_root())
    warden = Agentwarden(workdir / "agentwarden", cgroup, policy=POLICY)
    warden.env.update(AGENTWARDEN_NOTIFY_COMMAND=f"{receiver} {command_log}",
                      AGENTWARDEN_NOTIFY_WEBHOOK=webhook.url)
    proc = None
    try:
        warden.start()
        script = f"i=0; while [ $i -lt {holds} ]; do /usr/bin/true held-$i; i=$((i+1)); done"
        proc = subprocess.Popen([sys.executable, "-m", "agentwarden", "run", "--agent", BENCH_AGENT,
                                 "--", "/bin/sh", "-c", script], env=warden.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for number in range(holds):
            def pending():
                return session.admin_request(warden.settings, {"cmd": "holds"})["holds"]
            [hold] = step(f"hold number {number + 1}", pending)
            for state in ("pending", "approved"):
                step(f"{state} record of {hold['id']} at both receivers",
                     lambda: has(command_received(command_log), hold["id"], state)
                     and has(webhook.received, hold["id"], state))
                if state == "pending":
                    session.admin_request(warden.settings, {"cmd": "approve", "id": hold["id"],
                                                            "reason": "bench"})
        _, err = proc.communicate(timeout=WAIT)
        if proc.returncode != 0:
            raise SystemExit(f"bench: the session failed ({proc.returncode}): {err.strip()[-500:]}")
        counters = warden.status()["notify"]["channels"]
    finally:
        if proc and proc.poll() is None:
            proc.kill()
        warden.stop()
        webhook.close()
        cgroup.remove()
    return {"holds": holds,
            "latency": {"command": latencies(command_received(command_log)),
                        "webhook": latencies(webhook.received)},
            "counters": counters}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Example: .venv/bin/python bench/notify.py --holds 50")
    parser.add_argument("--holds", type=int, default=50, help="holds to make and approve (default 50)")
    args, meta, started = bench_report.bench_args(parser, "notify.py", "bench-notify")
    workdir = Path(tempfile.mkdtemp(prefix="agentwarden-bench-notify-"))
    try:
        results = measure(args.holds, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    bench_report.publish(results, meta, started, lambda r: bench_report.render_text(
        r, "notify bench", [bench_report.notify_section(r)]), bench_report.NOTIFY_RESULTS,
        bench_report.notify_blocks, docs=not args.no_docs)


if __name__ == "__main__":
    main()
