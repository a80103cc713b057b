"""What sessions cost an agent harness that wraps each tool call in
`agentwarden run`: the start of one session, and a coding agent's workload.

1. Session start: `agentwarden run --agent A -- /bin/true` against `/bin/true`
   alone, alternated one start at a time; wall time from fork to the
   harness's wait returning. Two ways to start the command: the installed
   `agentwarden`, the compiled launcher (launcher/agentwarden.c; the venv's
   `agentwarden` as `make setup` links it, and the .deb's /usr/bin/agentwarden),
   and the Python CLI (`python3 -IS` with the package on sys.path), which
   resolves the settings and execs the launcher.
2. A coding agent's workload: tool calls as an agent makes them -- a git
   repository made and committed, byte-compiling with `python3 -m compileall`,
   a small `make` of a few C files, and shell loops of sed, cat, grep, wc, find
   (about 400 execs in 24 tool calls) -- each tool call a `sh -c` started by the
   harness (this process). Three sides: bare; watched (every tool call in the
   tagged agent cgroup, with the agent's policy in force: the daemon decides
   every exec and open); under run (every tool call in a session of its own,
   `agentwarden run --agent A -- sh -c CALL`, session start included). A round
   runs the whole workload once per side, in a shuffled order; the ratio of a
   side is the median over rounds of its time over bare's in the same round.
   Two reference sides give the floor of holding by seccomp user-notify on this
   machine, apart from anything agentwarden does: floor (every tool call under
   bench/notify_floor.c, a minimal supervisor that reads each notified exec's and
   write-open's arguments and continues it) and watched floor (the same, in the
   tagged agent cgroup: what `run` cannot go below while the calls are watched).
   bench/watched_parts.py takes the watched side apart (kernel, probe,
   daemon; CPU time and context switches of each).
"""
from __future__ import annotations

import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from agentwarden import control

import sessions

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
POLICY_FILE = "bench-agentload.toml"   # targets: bench/report.py
INSTALLED = "agentwarden (the compiled launcher)"   # the venv's and the .deb's `agentwarden`


def policy(agent: str, work: Path) -> str:
    """Enforce: the tools the workload runs and what it builds, reads anywhere,
    writes in its work tree and /dev/null. Anything else would fail the bench
    (every tool call must exit 0). The directories of $PATH are all allowed,
    as an admin would allow them (a refused exec where there is no program
    fails with ENOENT under a session as it does bare, so gcc's search for
    `as` through /usr/local/sbin goes on either way)."""
    return (f'[agent.{agent}]\nmode = "enforce"\non-violation = "alert"\n'
            f'[agent.{agent}.exec]\nallow = ["/usr/**", "/bin/**", "/sbin/**", '
            f'"{work}/**"]\n'
            f'[agent.{agent}.files]\nread-allow = ["/**"]\n'
            f'write-allow = ["{work}/**", "/dev/null", "/dev/tty"]\n')


def launchers(settings_env: dict) -> dict[str, list[str]]:
    """name -> the argv that starts `agentwarden`."""
    venv_entry = Path(sys.executable).parent / "agentwarden"
    boot = ("import sys; sys.path[:0] = [sys.argv.pop(1), '/usr/lib/python3/dist-packages']; "
            "from agentwarden.cli import main; main()")
    found = {INSTALLED: [str(venv_entry)],
             "python3 -IS (the Python CLI, then the launcher)": ["/usr/bin/python3", "-IS", "-c", boot,
                                                                 str(REPO)]}
    # Before/after in one run: AGENTWARDEN_BENCH_BASELINE names another tree of
    # the package (`git archive REF agentwarden | tar -x -C DIR`), started the same way.
    baseline = settings_env.get("AGENTWARDEN_BENCH_BASELINE")
    if baseline:
        found[f"python3 -IS, baseline {Path(baseline).name}"] = ["/usr/bin/python3", "-IS", "-c", boot,
                                                                 baseline]
        compiled = Path(baseline) / "agentwarden" / "_launcher"   # sh scripts/build-launcher.sh python3 there
        if compiled.is_file():
            found[baseline_launcher(baseline)] = [str(compiled)]
    return found


def baseline_launcher(baseline: str) -> str:
    return f"{INSTALLED}, baseline {Path(baseline).name}"


def _timed(argv: list[str], env: dict, cwd: Path | None = None, join: Path | None = None) -> int:
    """Wall ns of one command, from fork to wait; raises if it fails."""
    def preexec():
        if join is not None:
            with open(join, "w") as f:
                f.write("0")
    start = time.perf_counter_ns()
    proc = subprocess.run(argv, env=env, cwd=cwd, preexec_fn=preexec, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
    took = time.perf_counter_ns() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)[-300:]} failed ({proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace').strip()[-400:]}")
    return took


def _timed_start(argv: list[str], env: dict) -> tuple[int, int]:
    """Wall ns and CPU ns (user + system, the started process alone: its own
    work, not the probe's or the supervisor's) of one command."""
    start = time.perf_counter_ns()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    took = time.perf_counter_ns() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)[-300:]} failed ({proc.returncode}): {err.strip()[-400:]}")
    return took, int((usage.ru_utime + usage.ru_stime) * 1e9)


def _summary_ms(values: list[int]) -> dict:
    ordered = sorted(v / 1e6 for v in values)
    return {"n": len(ordered), "median_ms": statistics.median(ordered),
            "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
            "min_ms": ordered[0]}


def session_start(env: dict, agent: str, starts: int, log=print) -> dict:
    """`run -- /bin/true` against `/bin/true`, alternated, per launcher."""
    sides = {"bare": ["/bin/true"]}
    for name, argv in launchers(env).items():
        sides[name] = argv + ["run", "--agent", agent, "--", "/bin/true"]
    samples = {side: [] for side in sides}
    cpu = {side: [] for side in sides}
    order = random.Random(2)
    for number in range(starts + 3):   # 3 warm-up rounds
        for side in order.sample(list(sides), len(sides)):
            took, used = _timed_start(sides[side], env)
            if number >= 3:
                samples[side].append(took)
                cpu[side].append(used)
    result = {side: {**_summary_ms(values), "cpu_median_ms": statistics.median(cpu[side]) / 1e6}
              for side, values in samples.items()}
    for side, r in result.items():
        log(f"  session start, {side}: median {r['median_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
            f"CPU {r['cpu_median_ms']:.1f} ms")
    return result


# The workload: (what, shell command) per tool call, run in the work tree.
def tool_calls() -> list[tuple[str, str]]:
    git = "git -c user.name=agent -c user.email=agent@example.invalid"
    calls = [
        ("write the tree", "mkdir -p src pkg && for i in $(seq 1 12); do "
         "printf 'def f%s(x):\\n    return x + %s\\n' $i $i > pkg/m$i.py; done && "
         "for i in 1 2 3 4; do printf '#include \"util.h\"\\nint f%s(int x) { return x * %s; }\\n' $i $i "
         "> src/f$i.c; done && printf 'int f1(int);int f2(int);int f3(int);int f4(int);\\n' > src/util.h && "
         "printf '#include \"util.h\"\\nint main(void) { return f1(0)+f2(0)+f3(0)+f4(0); }\\n' > src/main.c && "
         "printf 'OBJ=f1.o f2.o f3.o f4.o main.o\\nprog: $(OBJ)\\n\\tcc -o $@ $(OBJ)\\n"
         "%%.o: src/%%.c src/util.h\\n\\tcc -O1 -c -o $@ $<\\nclean:\\n\\trm -f *.o prog\\n' > Makefile"),
        ("git init", "git init -q ."),
        ("git add", "git add -A"),
        ("git commit", f"{git} commit -qm 'initial tree'"),
        ("read files", "for f in pkg/*.py; do cat $f > /dev/null; done"),
        ("grep", "grep -rn 'return' pkg src | wc -l > /dev/null"),
        ("find", "find . -name '*.py' -newer Makefile | wc -l > /dev/null; find . -type f | wc -l > /dev/null"),
        ("compileall", "python3 -m compileall -q pkg"),
        ("make", "make -s"),
        ("run it", "./prog; test $? -eq 0"),
        ("edit with sed", "for f in pkg/*.py; do sed -i 's/return x +/return x -/' $f; done"),
        ("git status", "git status --short > /dev/null"),
        ("git diff", "git diff --stat > /dev/null"),
        ("many short commands", "for i in $(seq 1 100); do sed -n 1p pkg/m1.py > /dev/null; "
         "head -c 10 src/f1.c > /dev/null; done"),
        ("cat loop", "for f in pkg/*.py src/*.c; do cat $f | wc -c > /dev/null; done"),
        ("grep loop", "for f in pkg/*.py src/*.c; do grep -c x $f > /dev/null || true; done"),
        ("wc loop", "for f in pkg/*.py; do wc -l < $f > /dev/null; basename $f > /dev/null; done"),
        ("compileall again", "python3 -m compileall -q -f pkg"),
        ("make clean", "make -s clean"),
        ("make again", "make -s"),
        ("git add 2", "git add -A"),
        ("git commit 2", f"{git} commit -qm 'edit'"),
        ("git log", "git log --oneline | wc -l > /dev/null"),
        ("clean up", "make -s clean && rm -rf pkg/__pycache__"),
    ]
    return calls


def _workload_once(side: str, work: Path, env: dict, prefix: list[str], agent_procs: Path) -> int:
    """One pass of every tool call; wall ns of the whole."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    total = 0
    for _what, command in tool_calls():
        call = ["/bin/sh", "-c", command]
        if side == "bare":
            total += _timed(call, env, work)
        elif side == "watched":
            total += _timed(call, env, work, join=agent_procs)
        elif side == "watched floor":
            total += _timed(prefix + call, env, work, join=agent_procs)
        else:   # run (this tree's or the baseline's launcher), floor
            total += _timed(prefix + call, env, work)
    return total


def count_execs(work: Path, env: dict) -> int:
    """Execs of one pass (strace -f, once, outside the measurement)."""
    if shutil.which("strace") is None:
        return 0
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    execs = 0
    for _what, command in tool_calls():
        out = subprocess.run(["strace", "-f", "-qq", "-e", "trace=execve", "-e", "signal=none",
                              "/bin/sh", "-c", command], env=env, cwd=work, capture_output=True, text=True)
        execs += sum(1 for line in out.stderr.splitlines() if "execve(" in line and "= 0" in line)
    return execs


def measure(settings, env: dict, agent: str, agent_cgroup: Path, policy_dir: Path, starts: int,
            rounds: int, workdir: Path, log=print) -> dict:
    """Both measurements. Needs a running agentwarden whose probe watches
    agent_cgroup, tagged `agent`; gives the agent the workload's policy meanwhile."""
    (policy_dir / POLICY_FILE).write_text(policy(agent, workdir))
    try:
        control.request(settings, "reload", timeout=10)
        return {"start": session_start(env, agent, starts, log),
                "workload": workload(env, agent, agent_cgroup, rounds, workdir, log)}
    finally:
        (policy_dir / POLICY_FILE).unlink()
        control.request(settings, "reload", timeout=10)


def workload(env: dict, agent: str, agent_cgroup: Path, rounds: int, workdir: Path, log=print) -> dict:
    work = workdir / "agent-work"
    # An agent's usual PATH: gcc's search for `as` goes through every directory of it.
    env = {**env, "TMPDIR": str(workdir), "HOME": str(workdir), "GIT_CONFIG_NOSYSTEM": "1",
           "LC_ALL": "C", "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    found = launchers(env)
    run_argv = {"run": found[INSTALLED] + ["run", "--agent", agent, "--"]}
    baseline = env.get("AGENTWARDEN_BENCH_BASELINE")
    if baseline and baseline_launcher(baseline) in found:   # before/after under run, paired too
        run_argv["run, baseline"] = found[baseline_launcher(baseline)] + ["run", "--agent", agent, "--"]
    floor = [str(sessions.build(workdir, "notify_floor"))]
    prefixes = {**run_argv, "floor": floor, "watched floor": floor}
    sides = ("bare", "watched", *prefixes)
    samples = {side: [] for side in sides}
    order = random.Random(3)
    try:
        execs = count_execs(work, env)
        for side in sides:   # a warm-up pass of each
            _workload_once(side, work, env, prefixes.get(side, []), agent_cgroup / "cgroup.procs")
        for number in range(rounds):
            for side in order.sample(sides, len(sides)):
                samples[side].append(_workload_once(side, work, env, prefixes.get(side, []),
                                                    agent_cgroup / "cgroup.procs"))
            log(f"  workload round {number + 1}/{rounds}: " + ", ".join(
                f"{side} {samples[side][-1] / 1e9:.2f} s" for side in sides))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = {side: [s / b for s, b in zip(samples[side], samples["bare"])] for side in sides if side != "bare"}
    # What agentwarden's sessions add above the mechanism's own floor, watched as they are.
    ratios["run over watched floor"] = [r / f for r, f in zip(samples["run"], samples["watched floor"])]
    result = {"tool_calls": len(tool_calls()), "execs": execs, "rounds": rounds,
              "seconds": {side: [v / 1e9 for v in samples[side]] for side in sides},
              "median_s": {side: statistics.median(samples[side]) / 1e9 for side in sides},
              "ratio": {side: statistics.median(r) for side, r in ratios.items()},
              "ratio_min": {side: min(r) for side, r in ratios.items()},
              "ratio_max": {side: max(r) for side, r in ratios.items()}}
    log(f"  workload: bare {result['median_s']['bare']:.2f} s, watched ×{result['ratio']['watched']:.3f}, "
        f"under run ×{result['ratio']['run']:.3f} ({execs} execs in {result['tool_calls']} tool calls)"
        + "".join(f", {side} ×{result['ratio'][side]:.3f}" for side in sides[3:]))
    return result
