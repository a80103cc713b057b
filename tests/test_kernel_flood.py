"""Execs are never the records a flood drops: four processes of an agent open
a file in a tight loop, 1M opens in all, while another execs a forbidden
program 20 times: each exec is recorded, judged and killed. Opens may be
dropped (counted); exec, fork and exit records have a ring of their own,
which the probe keeps draining while the daemon does not read (the opens then
back up in the kernel)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from agentwarden import headers
from conftest import events_of

pytestmark = pytest.mark.kernel

EXECS = 20
FLOODERS = 4
OPENS = 1_000_000
REPORT_EVERY = 10_000   # opens between a flooder's progress lines

# Prints a line every REPORT_EVERY opens: the test execs to that beat.
FLOOD = """\
import os, sys
path, count, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(count // every):
    for _ in range(every):
        os.close(os.open(path, os.O_RDONLY))
    print(i, flush=True)
"""


def test_a_flood_of_opens_never_hides_a_forbidden_exec(warden, agent_cgroup, tmp_path):
    agent = f"flood-{uuid.uuid4().hex[:6]}"
    cg = agent_cgroup(agent)
    warden.set_policy(agent, (f'[agent.{agent}]\nmode = "enforce"\non-violation = "kill"\n'
                              f'[agent.{agent}.exec]\nallow = ["/**"]\ndeny = ["/usr/bin/id"]\n'
                              f'[agent.{agent}.files]\nread-allow = ["/**"]\nwrite-allow = ["/**"]\n'))
    # A directory: its closes go out too (a read-only file's are counted, not
    # sent), so each open makes two records, the flood the ring was sized for;
    # and its repeated opens are never folded (a read-only file's would be).
    target = tmp_path / "flooded"
    target.mkdir()
    procs = str(cg.path / "cgroup.procs")
    status = warden.status()
    before = status["probe"]["health"]["kernel_dropped"]
    violations_before = status["daemon"]["counters"].get("violations", 0)
    started = time.monotonic()
    # The first flooder beats time for the execs; the others have twice its
    # opens, so that none ends before the execs however the CPUs are shared
    # out, and are stopped once its opens are done.
    flooders = [subprocess.Popen([sys.executable, "-S", "-c", FLOOD, str(target),
                                  str(OPENS // FLOODERS * (1 if n == 0 else 2)), str(REPORT_EVERY)],
                                 stdout=subprocess.PIPE, preexec_fn=lambda: open(procs, "w").write("0"))
                for n in range(FLOODERS)]
    try:
        beat = flooders[0].stdout
        for _ in range(3):   # the ring is full by now (about 100,000 records fill it)
            assert beat.readline()
        for i in range(EXECS):
            assert beat.readline(), "the flood ended before the execs"
            result = cg.run(["/usr/bin/id", f"exec-{i}"])
            assert result.returncode == -9   # killed in the kernel before it ran
            assert all(f.poll() is None for f in flooders[1:]), "a flooder ended before the execs"
        flooders[0].wait(timeout=300)
    finally:
        for f in flooders:
            f.kill()
            f.wait(timeout=300)
            f.stdout.close()
    flood_seconds = time.monotonic() - started
    # The daemon counts violations; the archive is read once they are all in.
    try:
        warden.wait_for_violations(violations_before, EXECS, "every forbidden exec's violation")
    except AssertionError:
        pass   # what is missing is shown below
    warden.settle_after_flood()
    records = warden.records()
    execs = [r for r in events_of(records, cg.id, "exec") if r["argv"][:1] == ["/usr/bin/id"]]
    violations = [r for r in records if r["kind"] == "violation" and r["agent"] == agent]
    after = warden.status()["probe"]["health"]["kernel_dropped"]
    dropped = {kind: after[kind] - before.get(kind, 0) for kind in after}
    print(f"{FLOODERS} flooders ({OPENS // FLOODERS} opens for the one beating time) for {flood_seconds:.1f}s, "
          f"{EXECS} execs judged after {time.monotonic() - started:.1f}s; kernel dropped {dropped}")
    assert dropped["open"] > 0, "no open was dropped: this was no flood"
    assert len(execs) == EXECS, f"{EXECS - len(execs)} of {EXECS} execs were never recorded"
    assert sorted(r["argv"][1] for r in execs) == sorted(f"exec-{i}" for i in range(EXECS))
    assert all(r["killed_in_kernel"] for r in execs) and dropped["exec"] == 0
    assert sorted(v["attempted"] for v in violations) == sorted(
        f"exec /usr/bin/id exec-{i} (/usr/bin/id)" for i in range(EXECS))
    assert all(v["action_taken"].startswith("killed in the kernel") for v in violations)


# Opens in the kernel's `events` ring, about 150 bytes each, before the execs:
# the probe's backlog (8,192) and the 16 MB ring are full by then.
STOPPED_OPENS = 400_000
STOPPED_EXECS = 1200   # find -exec: more exec records than the `vital` ring holds


def test_execs_while_the_daemon_does_not_read_are_all_recorded(warden, agent_cgroup, tmp_path):
    """The daemon stopped (SIGSTOP) while an agent floods opens: the probe's
    backlog fills, it stops draining `events` (opens back up in the kernel,
    dropped and counted), but keeps draining `vital`. Meanwhile the agent's
    `find -exec` runs more execs than the `vital` ring can hold, then a
    forbidden exec is killed in the kernel: once the daemon reads again,
    every exec is recorded and the forbidden one judged, no exec, fork or exit lost."""
    agent = f"stopped-{uuid.uuid4().hex[:6]}"
    cg = agent_cgroup(agent)
    warden.set_policy(agent, (f'[agent.{agent}]\nmode = "enforce"\non-violation = "kill"\n'
                              f'[agent.{agent}.exec]\nallow = ["/**"]\ndeny = ["/usr/bin/id"]\n'
                              f'[agent.{agent}.files]\nread-allow = ["/**"]\nwrite-allow = ["/**"]\n'))
    c = headers.header_constants()
    # Each exec record carries its filename and the kernel's copy of it, AW_MAX_PATH
    # bytes each: the execs need more than twice the `vital` ring.
    assert STOPPED_EXECS * 2 * c["AW_MAX_PATH"] > 2 * c["AW_VITAL_RINGBUF_PAGES"] * os.sysconf("SC_PAGE_SIZE")
    work = tmp_path / "work"
    work.mkdir()
    for i in range(STOPPED_EXECS):
        (work / f"f{i:04}").write_text("x")
    # A directory: each open is a record (repeated opens of a read-only file
    # would be folded in the kernel into one record with a count: no flood).
    target = tmp_path / "flooded"
    target.mkdir()
    procs = str(cg.path / "cgroup.procs")
    status = warden.status()
    before = status["probe"]["health"]["kernel_dropped"]
    violations_before = status["daemon"]["counters"].get("violations", 0)
    daemon = status["daemon"]["pid"]
    os.kill(daemon, signal.SIGSTOP)
    flooder = None
    try:
        # Opens until killed, a line every REPORT_EVERY: the flood goes on through the execs.
        flooder = subprocess.Popen([sys.executable, "-S", "-c", FLOOD, str(target), str(1 << 40),
                                    str(REPORT_EVERY)], stdout=subprocess.PIPE,
                                   preexec_fn=lambda: open(procs, "w").write("0"))
        for _ in range(STOPPED_OPENS // REPORT_EVERY):
            assert flooder.stdout.readline(), "the flood ended early"
        found = cg.run(["find", str(work), "-type", "f", "-exec", "/usr/bin/true", "{}", ";"], timeout=300)
        assert found.returncode == 0, found.stderr
        forbidden = cg.run(["/usr/bin/id", "while-stopped"])
        assert forbidden.returncode == -9   # killed in the kernel before it ran
        assert flooder.poll() is None, "the flood ended before the execs"
    finally:
        if flooder is not None:
            flooder.kill()
            flooder.wait()
            flooder.stdout.close()
        os.kill(daemon, signal.SIGCONT)

    warden.wait_for_violations(violations_before, 1, "the forbidden exec's violation")
    warden.settle_after_flood()
    after = warden.status()["probe"]["health"]["kernel_dropped"]
    dropped = {kind: after[kind] - before.get(kind, 0) for kind in after}
    assert dropped["open"] > 0, "no open was dropped: the probe never stopped draining `events`"
    assert dropped["exec"] == dropped["fork"] == dropped["exit"] == 0, dropped
    records = warden.records()
    execs = events_of(records, cg.id, "exec")
    trues = sorted(r["argv"][1] for r in execs if r["argv"][:1] == ["/usr/bin/true"])
    assert trues == sorted(str(path) for path in work.iterdir())
    [killed] = [r for r in execs if r["argv"] == ["/usr/bin/id", "while-stopped"]]
    assert killed["killed_in_kernel"]
    [violation] = [r for r in records if r["kind"] == "violation" and r["agent"] == agent]
    assert violation["attempted"] == "exec /usr/bin/id while-stopped (/usr/bin/id)"
    assert violation["action_taken"].startswith("killed in the kernel")
