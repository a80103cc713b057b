"""What a session costs: per allowed exec and per allowed write-open, under
`agentwarden run` (seccomp notification round trip to the daemon, exec
verification in BPF) against the same workload without agentwarden, in one
run, interleaved."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from agentwarden import control

HERE = Path(__file__).resolve().parent
POLICY_FILE = "bench-sessions.toml"


def build(workdir: Path) -> Path:
    binary = workdir / "session_workload"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(HERE / "session_workload.c")], check=True)
    return binary


def _latencies(argv: list[str], env: dict) -> list[int]:
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])}... failed: {result.stderr.strip()[-500:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["ns"]


def _summary(values: list[int]) -> dict:
    ordered = sorted(values)
    return {"n": len(ordered), "median_us": statistics.median(ordered) / 1000,
            "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1000}


def session_costs(settings, env: dict, agent: str, policy_dir: Path, ops: int, rounds: int,
                  log=print) -> dict:
    """Needs a running agentwarden (policy dir policy_dir) whose probe watches
    a cgroup tagged `agent`."""
    with tempfile.TemporaryDirectory(prefix="agentwarden-bench-") as tmp:
        work = Path(tmp)
        binary = build(work)
        writes = work / "writes"
        writes.mkdir()
        (policy_dir / POLICY_FILE).write_text(
            f'[agent.{agent}]\nmode = "enforce"\non-violation = "kill"\n'
            f'[agent.{agent}.exec]\nallow = ["{binary}", "/usr/bin/true"]\n'
            f'[agent.{agent}.files]\nread-allow = ["/**"]\nwrite-allow = ["{writes}/**"]\n')
        control.request(settings, "reload", timeout=10)
        run = [sys.executable, "-m", "agentwarden", "run", "--agent", agent, "--"]
        samples = {(what, where): [] for what in ("exec", "wopen") for where in ("bare", "session")}
        try:
            for _ in range(rounds):  # interleaved: drift hits both sides alike
                for what, target in (("exec", "/usr/bin/true"), ("wopen", str(writes))):
                    cmd = [str(binary), what, str(ops), target]
                    samples[(what, "bare")] += _latencies(cmd, env)
                    samples[(what, "session")] += _latencies(run + cmd, env)
        finally:
            (policy_dir / POLICY_FILE).unlink()
    results = {}
    for what in ("exec", "wopen"):
        bare, session = _summary(samples[(what, "bare")]), _summary(samples[(what, "session")])
        results[what] = {"bare": bare, "session": session,
                         "added_median_us": session["median_us"] - bare["median_us"],
                         "added_p99_us": session["p99_us"] - bare["p99_us"]}
        log(f"  {what}: bare median {bare['median_us']:.1f} us, under run {session['median_us']:.1f} us "
            f"(+{results[what]['added_median_us']:.1f} us median, +{results[what]['added_p99_us']:.1f} us p99)")
    return results
