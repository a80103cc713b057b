"""Repeated opens folded in the kernel (bpf program, "repeated opens"): an
open that would make the same record as an earlier one of the same thread
(absolute path, flags, result, fd number, file) is counted, and the probe
sends the count in one record. Every open is still accounted for, exactly;
each key's first open goes out at once; and what differs -- a symlink that
now leads elsewhere, a relative path, a write -- is never folded."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from conftest import events_of, wait_for
from test_kernel_enforce import _policy

pytestmark = pytest.mark.kernel

# Opens and closes each path of argv[1:] argv[0] times, in this order, a
# round of all the paths at a time; prints how many opens failed per path.
OPENER = r"""
import json, os, sys
rounds, paths = int(sys.argv[1]), sys.argv[2:]
failed = {p: 0 for p in paths}
for _ in range(rounds):
    for p in paths:
        try:
            os.close(os.open(p, os.O_RDONLY))
        except OSError:
            failed[p] += 1
print(json.dumps(failed))
"""


def _opens_of(records: list[dict], cgroup_id: int, path: str) -> list[dict]:
    return [r for r in events_of(records, cgroup_id, "open") if r["path"] == path]


def _standing_for(records: list[dict]) -> int:
    return sum(r.get("count", 1) for r in records)


def _health(warden) -> dict:
    return warden.status()["probe"]["health"]


def test_repeated_opens_are_counted_exactly_and_the_first_goes_out_at_once(warden, agent_cgroup, tmp_path):
    agent = f"fold-{uuid.uuid4().hex[:6]}"
    cg = agent_cgroup(agent)
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("a")
    b.write_text("b")
    missing = tmp_path / "missing"
    relative = "a.txt"
    warden.settle()
    before = _health(warden)
    opens_before = warden.status()["daemon"]["counters"].get("opens", 0)
    rounds = 2000
    run = cg.run([sys.executable, "-c", OPENER, str(rounds), str(a), str(b), str(missing), relative],
                 cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    warden.settle()
    after = _health(warden)
    records = warden.records()
    pids = {r["pid"] for r in _opens_of(records, cg.id, str(a))}
    assert len(pids) == 1
    for path in (str(a), str(b), str(missing), relative):
        mine = [r for r in _opens_of(records, cg.id, path) if r["pid"] in pids]
        # Every open accounted for, none twice.
        assert _standing_for(mine) == rounds, str((path, len(mine), _standing_for(mine), before, after))
        if path == relative:
            # A relative path names what the cwd says at that moment: never folded.
            assert all("count" not in r for r in mine) and len(mine) == rounds
            continue
        # Folded: far fewer records than opens; the first one as it happened.
        assert len(mine) < rounds / 10, (path, len(mine))
        first = min(mine, key=lambda r: r["time"])
        assert "count" not in first
        for r in mine:
            if "count" in r:
                assert r["count"] >= 1 and r["time"] <= r["last_time"]
                assert r["time"] > first["time"]
                # The record says what each of its opens said.
                for key in ("tid", "flags", "ret", "error", "syscall", "uid", "comm", "resolved_path"):
                    assert r.get(key) == first.get(key), key
    assert all(r["ret"] < 0 for r in _opens_of(records, cg.id, str(missing)) if r["pid"] in pids)
    # The kernel's count of folded opens is what the records of repeats stand for.
    folded = after["kernel_folded_opens"] - before["kernel_folded_opens"]
    sent = after["folded_opens"] - before["folded_opens"]
    assert folded == sent >= 3 * rounds * 0.9, (folded, sent)
    # And the daemon counts the opens they stand for.
    opens_after = warden.status()["daemon"]["counters"].get("opens", 0)
    assert opens_after - opens_before >= 4 * rounds


def test_a_symlink_that_leads_elsewhere_is_another_open_with_its_own_look(
        warden, agent_cgroup, tmp_path):
    agent = f"foldlink-{uuid.uuid4().hex[:6]}"
    cg = agent_cgroup(agent)
    allowed, secret = tmp_path / "allowed", tmp_path / "secret"
    allowed.mkdir()
    secret.mkdir()
    (allowed / "f").write_text("ok")
    (secret / "f").write_text("secret")
    link = tmp_path / "link"
    link.symlink_to(allowed / "f")
    warden.set_policy(agent, _policy(agent, "monitor", "alert", ["/usr/bin/**", "/bin/**"],
                                     read_allow=["/usr/**", "/lib/**", "/etc/**", "/proc/**", "/dev/**",
                                                 str(link), str(allowed / "**")]))
    # Opens the link 300 times; once the daemon has looked where it leads, it is
    # pointed at the secret and opened 300 times more.
    go = tmp_path / "go"
    script = (OPENER + "\nimport time\nwhile not os.path.exists(sys.argv[4]):\n    time.sleep(0.01)\n"
              "os.unlink(sys.argv[2]); os.symlink(sys.argv[3], sys.argv[2])\n"
              "for _ in range(rounds):\n    os.close(os.open(sys.argv[2], os.O_RDONLY))\n")
    warden.settle()
    join = lambda: (cg.path / "cgroup.procs").write_text("0")
    proc = subprocess.Popen([sys.executable, "-c", script, "300", str(link), str(secret / "f"), str(go)],
                            cwd=tmp_path, preexec_fn=join, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: any(r.get("real_path") == str(allowed / "f")
                             for r in _opens_of(warden.records(), cg.id, str(link))),
                 timeout=30, what="the record of the link's first open")
    finally:
        go.touch()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode(errors="replace")
    warden.settle()
    records = warden.records()
    opens = _opens_of(records, cg.id, str(link))
    assert _standing_for(opens) == 600
    by_target: dict[str, int] = {}
    for r in opens:
        by_target[r.get("real_path")] = by_target.get(r.get("real_path"), 0) + r.get("count", 1)
    # Two files, two keys: the repeats of each with the real path of its own first open.
    assert by_target == {str(allowed / "f"): 300, str(secret / "f"): 300}, by_target
    # Each file's repeats are decided as its first open was, from that open's look.
    for target in (allowed / "f", secret / "f"):
        mine = sorted((r for r in opens if r.get("real_path") == str(target)), key=lambda r: r["time"])
        assert "count" not in mine[0] and all("count" in r for r in mine[1:])
        assert {(r["verdict"]["decision"], r["verdict"]["rule"]) for r in mine} == \
            {(mine[0]["verdict"]["decision"], mine[0]["verdict"]["rule"])}


def test_writes_and_fd_numbers_that_differ_are_never_folded(warden, agent_cgroup, tmp_path):
    agent = f"foldw-{uuid.uuid4().hex[:6]}"
    cg = agent_cgroup(agent)
    target = tmp_path / "w.txt"
    # 200 write-opens; then 200 read-only opens kept open (each a new fd number).
    script = ("import os, sys\np = sys.argv[1]\n"
              "for _ in range(200):\n    os.close(os.open(p, os.O_WRONLY | os.O_CREAT, 0o600))\n"
              "fds = [os.open(p, os.O_RDONLY) for _ in range(200)]\n")
    warden.settle()
    run = cg.run([sys.executable, "-c", script, str(target)], timeout=60)
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    warden.settle()
    opens = _opens_of(warden.records(), cg.id, str(target))
    writes = [r for r in opens if r["flags"] & os.O_ACCMODE]
    reads = [r for r in opens if not r["flags"] & os.O_ACCMODE]
    assert len(writes) == 200 and all("count" not in r for r in writes)
    assert len(reads) == 200 and len({r["ret"] for r in reads}) == 200


def test_tail_shows_a_record_of_repeats_with_its_count(warden, agent_cgroup, tmp_path):
    agent = f"foldtail-{uuid.uuid4().hex[:6]}"
    cg = agent_cgroup(agent)
    f = tmp_path / "again.txt"
    f.write_text("x")
    warden.settle()
    run = cg.run([sys.executable, "-c", OPENER, "50", str(f)], timeout=60)
    assert run.returncode == 0
    warden.settle()
    wait_for(lambda: any("count" in r for r in _opens_of(warden.records(), cg.id, str(f))),
             what="the record of the repeats")
    out = warden.cli("log", "show", "--agent", agent, check=False)
    assert out.returncode == 0, out.stderr
    assert f"{f} r ×49 until " in out.stdout, out.stdout[-2000:]
