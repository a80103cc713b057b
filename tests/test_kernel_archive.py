"""The archive on the real pipeline: replay of a real session, attribution of
every event, the disk-full policy on a real small filesystem, and the log
commands on bad input."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from agentwarden import identity
from agentwarden import cgroups, wire
from agentwarden.archive.segments import read_items

from conftest import AgentCgroup, events_of, wait_for
from fakeprobe import Daemon, FakeProbe, exec_record, open_record, tags_record

pytestmark = pytest.mark.kernel

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _policy(agent: str) -> str:
    return (f'[agent.{agent}]\nmode = "enforce"\non-violation = "kill"\n'
            f'[agent.{agent}.exec]\nallow = ["/**"]\ndeny = ["/usr/bin/id"]\n'
            f'[agent.{agent}.files]\nread-allow = ["/**"]\nwrite-allow = ["/**"]\n')


def _join(cgroup: Path):
    def join():
        with open(cgroup / "cgroup.procs", "w") as f:
            f.write("0")
    return join


def test_replay_of_a_real_session_shows_what_happened(warden, agent_cgroup, tmp_path):
    agent = f"replay-{uuid.uuid4().hex[:6]}"
    session = f"run-{uuid.uuid4().hex[:12]}"
    cg = agent_cgroup(agent, tag=False)
    cgroups.set_attribution(cg.path, session=session, task="summarise the notes",
                            on_behalf_of="alice@example.com", user="alice")
    cg.tag()
    policy_hash = warden.set_policy(agent, _policy(agent))
    notes = tmp_path / "notes.txt"
    notes.write_text("three things\n")
    pids = tmp_path / "pids"
    # The shell writes down the pid of each child it starts: the truth to compare with.
    script = (f"cat {notes} > /dev/null & echo $! > {pids}; wait; "
              f"ls {tmp_path} > /dev/null & echo $! >> {pids}; wait; "
              f"/usr/bin/id & echo $! >> {pids}; wait; "
              f"echo done > {tmp_path / 'out.txt'}")
    shell = subprocess.Popen(["/bin/sh", "-c", script], preexec_fn=_join(cg.path))
    assert shell.wait(timeout=30) == 0
    cat_pid, ls_pid, id_pid = (int(p) for p in pids.read_text().split())
    warden.cli("freeze", "--agent", agent)
    warden.cli("thaw", "--agent", agent)
    warden.settle()

    result = warden.cli("log", "replay", session, "--json")
    replay = json.loads(result.stdout)
    s = replay["session"]
    assert (s["session"], s["agent"], s["person"], s["task"], s["user"]) == \
        (session, agent, "alice@example.com", "summarise the notes", "alice")
    assert s["host"] == socket.gethostname() and s["policy_hash"] == policy_hash
    processes = {p["pid"]: p for p in replay["processes"]}
    assert replay["roots"] == [shell.pid]
    root = processes[shell.pid]
    assert root["execs"][0]["argv"] == ["/bin/sh", "-c", script]
    assert root["children"] == [cat_pid, ls_pid, id_pid]  # in the order they started
    assert any(o["path"] == str(tmp_path / "out.txt") and o["access"].startswith("w") for o in root["opens"])
    cat, ls, ident = processes[cat_pid], processes[ls_pid], processes[id_pid]
    assert cat["ppid"] == ls["ppid"] == ident["ppid"] == shell.pid
    assert cat["execs"][-1]["argv"] == ["cat", str(notes)] and cat["execs"][-1]["path"] == "/usr/bin/cat"
    assert any(o["path"] == str(notes) and o["access"] == "r" for o in cat["opens"])
    assert ls["execs"][-1]["argv"] == ["ls", str(tmp_path)]
    [violation] = ident["violations"]
    assert violation["attempted"].startswith("exec /usr/bin/id")
    assert violation["action_taken"].startswith("killed in the kernel")
    timeline = replay["timeline"]
    assert [t["seq"] for t in timeline] == sorted(t["seq"] for t in timeline)
    admin = [(t["action"], t["user"]) for t in timeline if t["kind"] == "admin"]
    me = identity.describe("self", os.getuid())[0]   # the kernel's word, not $SUDO_USER
    assert admin == [("freeze", me), ("thaw", me)]
    started = [t["pid"] for t in timeline if t["kind"] == "exec"]
    assert started.index(cat_pid) < started.index(ls_pid) < started.index(id_pid)
    # Every event and decision in it carries the whole attribution.
    for line in timeline:
        if line["kind"] in (*wire.EVENT_KINDS, "violation"):
            assert (line["session"], line["person"], line["task"], line["session_user"],
                    line["policy_hash"], line["host"]) == \
                (session, "alice@example.com", "summarise the notes", "alice", policy_hash,
                 socket.gethostname()), line

    text = warden.cli("log", "replay", session).stdout
    assert f"session {session}: agent {agent}, person alice@example.com" in text
    assert f"{shell.pid} /bin/sh -c" in text and f"├─ {cat_pid} cat {notes}" in text
    assert f"└─ {id_pid} /usr/bin/id" in text and "VIOLATION exec /usr/bin/id" in text
    assert "ADMIN" in text and " freeze " in text


def test_every_event_of_a_tagged_cgroup_has_a_derived_session(warden, agent_cgroup, tmp_path):
    agent = f"derived-{uuid.uuid4().hex[:6]}"
    cg = agent_cgroup(agent)
    cg.run(["/bin/sh", "-c", f"cat /etc/hostname > {tmp_path / 'x'}"])
    warden.settle()
    records = events_of(warden.records(), cg.id)
    assert records
    sessions = {r["session"] for r in records}
    assert len(sessions) == 1 and sessions.pop().startswith(f"{agent}-")
    exported = warden.cli("log", "export", "--format", "jsonl", "--agent", agent).stdout.splitlines()
    lines = [json.loads(line) for line in exported]
    assert [line["seq"] for line in lines if line["kind"] in wire.EVENT_KINDS] == \
        [r["seq"] for r in records]
    assert all(line["host"] == socket.gethostname() and line["session"] == records[0]["session"]
               and line["person"] is None and line["boot_id"] for line in lines)
    found = warden.cli("log", "search", "--agent", agent, "--kind", "exec", "--path", "/usr/bin/c*")
    assert "/usr/bin/cat" in found.stdout and "/bin/sh" not in found.stdout


def test_attribution_xattrs_are_read_with_the_tag(kernel):
    cg = AgentCgroup(kernel, None, f"attr-{uuid.uuid4().hex[:6]}")
    try:
        cgroups.tag(cg.path, cg.agent)
        cgroups.set_attribution(cg.path, task="line one\nline two", on_behalf_of="bob")
        os.setxattr(cg.path, cgroups.ATTRIBUTION_XATTRS["session"], b"not a valid id!")
        [tagged] = [t for t in cgroups.scan_tagged(kernel).values() if t.cgroup_id == cg.id]
        assert dict(tagged.attribution) == {"task": "line oneline two", "on_behalf_of": "bob"}
        with pytest.raises(cgroups.CgroupError, match="invalid session id"):
            cgroups.set_attribution(cg.path, session="bad id")
        cgroups.set_attribution(cg.path, session="run-7", task=None)
        assert dict(cgroups.read_attribution(cg.path)) == {"session": "run-7", "on_behalf_of": "bob"}
    finally:
        cg.remove()


def _fill(path: Path) -> None:
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def _frozen(path: Path) -> bool:
    return "frozen 1" in (path / "cgroup.events").read_text()


def test_a_full_disk_freezes_agents_damages_nothing_and_recovers(kernel, tmp_path):
    """A real daemon with its archive on a 2 MiB tmpfs; real agent processes in
    real tagged cgroups. (The tags come from a fake probe that names only this
    test's cgroups: a real probe sees every tagged cgroup on the host, and the
    policy would freeze them all, other test runs' agents included.)"""
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "agentwarden-test", str(state)],
                   check=True)
    made, sleepers, daemon = [], [], None
    try:
        agent, already, late = (AgentCgroup(kernel, None, f"{n}-{uuid.uuid4().hex[:6]}")
                                for n in ("full", "frozen", "late"))
        made += [agent, already, late]
        for cg in made:
            sleepers.append(subprocess.Popen(["/bin/sleep", "120"], preexec_fn=_join(cg.path)))
        (already.path / "cgroup.freeze").write_text("1")  # frozen by someone else: stays frozen
        tags = {cg.id: {"agent": cg.agent, "path": str(cg.path)} for cg in (agent, already)}
        daemon = Daemon(tmp_path, state_dir=state).start()
        probe = FakeProbe(daemon.settings)
        pid = sleepers[0].pid
        probe.send([tags_record(tags)])
        probe.send([exec_record(pid, agent.id, ["/bin/sleep", "120"], n=0)])
        wait_for(lambda: daemon.archive_state()["durable_seq"] >= 3, what="first records")
        before = {i.seq: i.chain for i in read_items(daemon.settings.archive_dir)}

        _fill(state / "filler")
        probe.send([open_record(pid, agent.id, f"/data/{n}", n=n) for n in range(1, 50)])
        wait_for(lambda: _frozen(agent.path), timeout=10, what="the disk-full policy to freeze the agent")
        st = daemon.archive_state()
        assert st["state"] == "disk-full" and "No space left on device" in st["error"]
        assert st["on_disk_full"] == {"policy": "freeze", "active": True, "frozen": [str(agent.path)]}
        # An agent tagged while the disk is full is frozen too.
        probe.send([tags_record({**tags, late.id: {"agent": late.agent, "path": str(late.path)}})])
        wait_for(lambda: _frozen(late.path), timeout=10, what="the late agent frozen")
        for n in range(50, 60):
            probe.send([open_record(pid, agent.id, f"/data/{n}", n=n)])  # held in memory
        wait_for(lambda: daemon.archive_state()["pending_records"] >= 10, what="records held in memory")
        # Nothing already written is damaged: it verifies, and every record is as it was.
        assert daemon.cli("log", "verify").returncode == 0
        after = {i.seq: i.chain for i in read_items(daemon.settings.archive_dir)}
        assert all(after[seq] == chain for seq, chain in before.items())

        (state / "filler").unlink()
        wait_for(lambda: daemon.archive_state()["state"] == "ok", what="recovery")
        wait_for(lambda: not _frozen(agent.path) and not _frozen(late.path), what="thawed")
        assert _frozen(already.path)
        probe.close()
        assert daemon.stop() == 0
        result = daemon.cli("log", "verify")
        assert result.returncode == 0, result.stdout
        records = [i.record for i in read_items(daemon.settings.archive_dir)]
        assert [r["n"] for r in records if "n" in r] == list(range(60))  # nothing lost or reordered
        alerts = [r for r in records if r["kind"] == "archive"]
        assert [a["event"] for a in alerts] == ["disk-full", "disk-ok"]
        full, ok = alerts
        assert full["policy"] == "freeze" and full["action_taken"] == \
            f"froze {agent.path}; {already.path} was frozen already"
        assert ok["action_taken"] == f"thawed {agent.path}; thawed {late.path}" and ok["dropped"] == 0
        assert records.index(full) < min(records.index(r) for r in records if r.get("n", 0) >= 50)
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()
        if daemon:
            daemon.stop()
        for cg in made:
            (cg.path / "cgroup.freeze").write_text("0")
            cg.remove()
        subprocess.run(["umount", str(state)], check=False)


@pytest.fixture(scope="module")
def small_archive(kernel, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    daemon = Daemon(tmp).start()
    probe = FakeProbe(daemon.settings)
    probe.send([tags_record({77: {"agent": "cli", "path": "/sys/fs/cgroup/cli"}}),
                exec_record(700, 77, ["/usr/bin/true"]), open_record(700, 77, "/etc/hosts")])
    wait_for(lambda: daemon.archive_state()["durable_seq"] >= 4, what="records")
    probe.close()
    daemon.stop()
    return daemon


@pytest.mark.parametrize("args,message,code", [
    (["search"], "give at least one filter", 2),
    (["show", "--since", "last tuesday"], "give a time like 2024-05-01T10:00", 2),
    (["show", "--verdict", "maybe"], "use one of allow, hold, violation, deny", 2),
    (["show", "--kind", "exec,bogus"], "--kind bogus: unknown", 2),
    (["show", "--path", "etc/*"], "is not an absolute path", 2),
    (["show", "--seq", "ten"], "give a seq (1234) or a range", 2),
    (["export", "--format", "csv"], "use one of jsonl, ocsf, ecs", 2),
    (["verify", "--archive", "/nonexistent/archive"], "there is no archive at /nonexistent/archive", 2),
    (["verify", "--key", "/nonexistent/key"], "archive key file /nonexistent/key does not exist", 1),
    (["replay", "nosuch"], "no session 'nosuch' in the archive", 1),
    (["search", "--agent", "nobody-has-this"], "no records match", 1),
])
def test_log_commands_on_bad_input_say_what_is_wrong(small_archive, args, message, code):
    result = small_archive.cli("log", *args)
    assert result.returncode == code, result.stdout  # 2: usage, 1: nothing found (docs/cli.md)
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_only_root_reads_the_archive(small_archive):
    result = subprocess.run([*NOBODY, sys.executable, "-m", "agentwarden", "log", "show"],
                            env=small_archive.env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 4
    assert "permission denied" in result.stderr and "sudo" in result.stderr
    assert "Traceback" not in result.stderr
    shown = small_archive.cli("log", "show").stdout
    assert "/usr/bin/true" in shown and "/etc/hosts" in shown
