"""End to end on the real kernel: BPF -> probe -> ZeroMQ -> daemon -> archive / tail."""
from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from conftest import events_of, wait_for

pytestmark = pytest.mark.kernel


def _opens_of(records, cg, path):
    return [r for r in events_of(records, cg.id, "open") if r.get("resolved_path") == str(path)]


def _execs_of(records, cg, argv0):
    return [r for r in events_of(records, cg.id, "exec") if r["argv"][:1] == [argv0]]


def test_exec_and_open_events_carry_exact_fields(warden, agent_cgroup, tmp_path):
    cg = agent_cgroup("coder")
    target = tmp_path / "hello.txt"
    target.write_text("hi\n")
    result = cg.run(["/usr/bin/cat", str(target), "--", "-"], input=b"")
    assert result.stdout == b"hi\n"
    warden.settle()
    records = warden.records()

    [exec_rec] = [r for r in _execs_of(records, cg, "/usr/bin/cat") if str(target) in r["argv"]]
    assert exec_rec["argv"] == ["/usr/bin/cat", str(target), "--", "-"]
    assert exec_rec["filename"] == "/usr/bin/cat"
    assert exec_rec["exec_path"] == "/usr/bin/cat"
    assert exec_rec["resolved_exec_path"] == "/usr/bin/cat"
    assert exec_rec["syscall"] == "execve"
    assert (exec_rec["ret"], exec_rec["error"]) == (0, None)
    assert exec_rec["comm"] == "cat"
    assert exec_rec["agent"] == "coder"
    assert exec_rec["cgroup_id"] == cg.id and exec_rec["agent_cgroup_id"] == cg.id
    assert exec_rec["uid"] == os.getuid() and exec_rec["gid"] == os.getgid()
    assert exec_rec["ppid"] == os.getpid()
    assert exec_rec["argv_truncated"] is False

    [open_rec] = _opens_of(records, cg, target)
    assert open_rec["pid"] == exec_rec["pid"]
    assert open_rec["path"] == str(target)
    assert open_rec["syscall"] == "openat"
    assert open_rec["flags"] & os.O_ACCMODE == os.O_RDONLY
    assert open_rec["ret"] >= 0 and open_rec["error"] is None
    assert open_rec["agent"] == "coder"
    # Lineage: the exit of cat is recorded too.
    assert any(r["pid"] == exec_rec["pid"] for r in events_of(records, cg.id, "exit"))


def test_relative_open_after_cd_in_shell_is_resolved(warden, agent_cgroup, tmp_path):
    cg = agent_cgroup("shell")
    work = tmp_path / "work dir"
    work.mkdir()
    (work / "notes.txt").write_text("x")
    cg.run(["/bin/sh", "-c", f"cd '{work}' && cat notes.txt missing.txt; true"])
    warden.settle()
    records = warden.records()

    chdirs = [r for r in events_of(records, cg.id, "chdir") if r["path"] == str(work)]
    assert chdirs and chdirs[0]["ret"] == 0
    [ok] = _opens_of(records, cg, work / "notes.txt")
    assert ok["path"] == "notes.txt" and ok["ret"] >= 0
    [failed] = _opens_of(records, cg, work / "missing.txt")
    assert failed["path"] == "missing.txt"
    assert failed["error"] == "ENOENT" and failed["ret"] == -2
    # cat ran as a child of sh: its parent is the shell.
    [sh_exec] = _execs_of(records, cg, "/bin/sh")
    [cat_exec] = _execs_of(records, cg, "cat")
    assert cat_exec["ppid"] == sh_exec["pid"]
    assert cat_exec["exec_path"] == "/usr/bin/cat"  # found on PATH by the shell


def test_python_script_opens_with_flags_dirfd_and_openat2(warden, agent_cgroup, tmp_path):
    cg = agent_cgroup("py")
    script = f"""
import os
d = os.open({str(tmp_path)!r}, os.O_RDONLY | os.O_DIRECTORY)
fd = os.open("created.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640, dir_fd=d)
os.write(fd, b"data")
os.close(fd)
with open({str(tmp_path / 'appended.txt')!r}, "a") as f:
    f.write("more")
"""
    cg.run([sys.executable, "-S", "-c", script], check=True)
    warden.settle()
    records = warden.records()
    [created] = _opens_of(records, cg, tmp_path / "created.txt")
    assert created["path"] == "created.txt"
    assert created["dirfd"] >= 0
    assert created["flags"] & (os.O_WRONLY | os.O_CREAT | os.O_TRUNC) == os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    assert created["mode"] == 0o640
    [appended] = _opens_of(records, cg, tmp_path / "appended.txt")
    assert appended["flags"] & os.O_APPEND


def test_paths_resolve_through_every_copy_of_a_descriptor(warden, agent_cgroup, tmp_path):
    """openat relative to an O_PATH fd and to copies made by dup, dup2, dup3,
    fcntl(F_DUPFD[_CLOEXEC]) and pidfd_getfd; fchdir to a copy; a closed fd
    whose number a pipe took resolves nothing; execveat(fd, "", AT_EMPTY_PATH)
    names the file behind fd."""
    cg = agent_cgroup("fds")
    routes = ["opath", "dup", "dup2", "dup3", "dupfd", "dupfd-cloexec", "pidfd-getfd", "fchdir"]
    for route in routes:
        (tmp_path / route).write_text(route)
    script = f"""
import ctypes, fcntl, os
libc = ctypes.CDLL(None, use_errno=True)
d = os.open({str(tmp_path)!r}, os.O_PATH | os.O_DIRECTORY)
copies = {{"opath": d, "dup": libc.dup(d), "dup2": os.dup2(d, 50), "dup3": os.dup2(d, 51, inheritable=False),
          "dupfd": fcntl.fcntl(d, fcntl.F_DUPFD, 60),
          "dupfd-cloexec": fcntl.fcntl(d, fcntl.F_DUPFD_CLOEXEC, 70),
          "pidfd-getfd": libc.syscall(438, os.pidfd_open(os.getpid()), d, 0)}}
assert copies["pidfd-getfd"] >= 0, ctypes.get_errno()
for route, fd in copies.items():
    os.close(os.open(route, os.O_RDONLY, dir_fd=fd))
os.fchdir(copies["dup3"])
os.close(os.open("fchdir", os.O_RDONLY))
stale = copies["dup"]
os.close(stale)
assert stale in os.pipe()
try:
    os.open("stale", os.O_RDONLY, dir_fd=stale)
except NotADirectoryError:
    pass
os.execve(os.open("/usr/bin/true", os.O_PATH), ["true"], {{}})
"""
    cg.run([sys.executable, "-S", "-c", script], check=True)
    warden.settle()
    records = events_of(warden.records(), cg.id)
    opens = {r["path"]: r["resolved_path"] for r in records if r["kind"] == "open"}
    for route in routes:
        assert opens[route] == str(tmp_path / route), (route, opens)
    assert "stale" in opens and opens["stale"] is None
    [fexecve] = [r for r in records if r["kind"] == "exec" and r["argv"] == ["true"]]
    assert fexecve["syscall"] == "execveat" and fexecve["filename"] == ""
    assert fexecve["resolved_filename"] == "/usr/bin/true"
    copied = {r["syscall"] for r in records if r["kind"] == "fd" and r["resolved_path"] == str(tmp_path)}
    assert copied == {"dup", "dup2", "dup3", "fcntl_dupfd", "fcntl_dupfd_cloexec", "pidfd_getfd", "close"}


def test_failed_exec_carries_its_error(warden, agent_cgroup):
    cg = agent_cgroup("failing")
    with pytest.raises(FileNotFoundError):
        cg.run(["/nonexistent/agentwarden-missing-prog", "arg1"])
    warden.settle()
    [failed] = [r for r in events_of(warden.records(), cg.id, "exec")
                if r["filename"] == "/nonexistent/agentwarden-missing-prog"]
    assert failed["error"] == "ENOENT" and failed["ret"] == -2
    assert failed["argv"] == ["/nonexistent/agentwarden-missing-prog", "arg1"]
    assert failed["exec_path"] == ""  # the kernel never got to run anything


def test_untagged_process_child_cgroup_and_untag(warden, agent_cgroup, tmp_path):
    cg = agent_cgroup("nested")
    sub = cg.child("session-1")
    marker = tmp_path / "marker"
    marker.write_text("")

    # Outside any agent cgroup: nothing recorded.
    subprocess.run(["/usr/bin/cat", str(marker)], check=True)
    # A child cgroup created after tagging is covered.
    cg.run(["/usr/bin/cat", str(marker)], cgroup=sub, check=True)
    warden.settle()
    records = warden.records()
    seen = [r for r in records if r["kind"] == "open" and r.get("resolved_path") == str(marker)]
    assert len(seen) == 1, seen
    assert seen[0]["cgroup_id"] == os.stat(sub).st_ino
    assert seen[0]["agent_cgroup_id"] == cg.id and seen[0]["agent"] == "nested"

    # Untagging stops events.
    cg.untag()
    after = tmp_path / "after-untag"
    after.write_text("")
    cg.run(["/usr/bin/cat", str(after)], cgroup=sub, check=True)
    warden.settle()
    assert not [r for r in warden.records() if r.get("resolved_path") == str(after)]  # no open, no close


def test_tail_json_shows_the_agents_events(warden, agent_cgroup, tmp_path):
    cg = agent_cgroup("tailed")
    other = agent_cgroup("other")
    target = tmp_path / "tailed.txt"
    target.write_text("")
    tail = subprocess.Popen([sys.executable, "-m", "agentwarden", "tail", "--json", "--agent", "tailed"],
                            env=warden.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    sel = selectors.DefaultSelector()
    sel.register(tail.stdout, selectors.EVENT_READ)

    def read_some():
        for _ in sel.select(timeout=0.2):
            lines.append(tail.stdout.readline())
        return lines

    try:
        # PUB/SUB joins asynchronously: poke until the tail shows it is connected.
        wait_for(lambda: (cg.run(["/bin/true"]), read_some())[1], timeout=20, what="tail to connect")
        other.run(["/usr/bin/cat", str(target)])
        cg.run(["/usr/bin/cat", str(target)])
        import json
        def saw_target():
            read_some()
            return [json.loads(l) for l in lines if l.strip() and str(target) in l]
        found = wait_for(saw_target, timeout=20, what="the open on tail --json")
    finally:
        tail.terminate()
        tail.wait(timeout=10)
    assert all(r["agent"] == "tailed" for r in found)


def test_every_open_and_exec_is_archived_or_counted_as_dropped(warden, agent_cgroup, tmp_path):
    files = tmp_path / "many"
    files.mkdir()
    count = 10_000
    for i in range(count):
        (files / f"f{i}").write_bytes(b"")
    cg = agent_cgroup("bulk")
    before = warden.status()
    script = (f"import os\nfor i in range({count}):\n"
              f"    os.close(os.open('{files}/f%d' % i, os.O_RDONLY))\n")
    cg.run([sys.executable, "-S", "-c", script], check=True)
    cg.run(["/bin/sh", "-c", "i=0; while [ $i -lt 500 ]; do /bin/true; i=$((i+1)); done"], check=True)
    warden.settle()
    after = warden.status()
    records = warden.records()
    opened = {r["resolved_path"] for r in events_of(records, cg.id, "open")
              if str(r.get("resolved_path", "")).startswith(f"{files}/")}
    execs = [r for r in _execs_of(records, cg, "/bin/true")]
    dropped = {kind: after["probe"]["health"]["kernel_dropped"][kind]
               - before["probe"]["health"]["kernel_dropped"][kind] for kind in ("open", "exec")}
    # Losses during this test (the warden is shared: a flood test before may have lost some).
    other_losses = {k: v - before["drops"].get(k, 0) for k, v in after["drops"].items()
                    if k != "kernel" and v != before["drops"].get(k, 0)}
    assert not other_losses
    assert len(opened) + dropped["open"] == count
    assert len(execs) + dropped["exec"] == 500
    print(f"opens archived {len(opened)}, dropped {dropped['open']}; "
          f"execs archived {len(execs)}, dropped {dropped['exec']}")


def test_garbage_on_ingest_and_control_sockets_is_counted_not_fatal(warden):
    before = warden.status()["daemon"]["counters"].get("malformed", 0)
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 2000)
    push.connect(warden.settings.ingest_endpoint)
    valid = __import__("agentwarden.wire", fromlist=["encode_batch"]).encode_batch(
        "fuzzer", 0, [{"kind": "gap", "time": 1, "stage": "x", "count": 0, "detail": None}])
    garbage = [b"", b"\xc1", b"not msgpack at all", valid[: len(valid) // 2], b"\x91\x01",
               b"\x81\xa1v\x02", os.urandom(4096)]
    for g in garbage:
        push.send(g)
    push.close()
    wait_for(lambda: warden.status()["daemon"]["counters"].get("malformed", 0) - before == len(garbage),
             what="the daemon to count every malformed message")
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(warden.settings.control_endpoint)
    req.send(b"\xff\xfe garbage")
    assert req.poll(5000)
    reply = __import__("msgpack").unpackb(req.recv())
    req.close()
    assert reply["ok"] is False and "msgpack" in reply["error"]
    # The loss is recorded in the archive, and the daemon still answers.
    warden.settle()
    gaps = [r for r in warden.records() if r["kind"] == "gap" and r["stage"] == "daemon-ingest"]
    assert sum(g["count"] for g in gaps) >= len(garbage)
    assert warden.status()["daemon"]["pid"]


def test_decoder_layouts_match_the_c_header(kernel):
    """The decoder takes layouts from BCC's view of agentwarden.h: every field
    the header declares is decoded at the offset the compiler gave it."""
    import re

    from agentwarden import headers
    from agentwarden.probe import loader
    from agentwarden.probe.decode import Layout
    header = (headers.bpf_dir() / headers.EVENT_HEADER).read_text()
    bpf = loader.compile_and_attach()
    try:
        for struct_name, scratch, tail in (("aw_exec", "exec_scratch", "argv"),
                                           ("aw_file", "file_scratch", "path"),
                                           ("aw_task", "task_scratch", None),
                                           ("aw_fd", "inflight_fd", None),
                                           ("aw_move", "move_scratch", "dst_path")):
            leaf = bpf[scratch.encode()].Leaf
            leaf = getattr(leaf, "_type_", leaf)
            body = re.search(r"struct %s \{(.*?)\n\};" % struct_name, header, re.S).group(1)
            declared = re.findall(r"^\s+\w+\s+(\w+)(?:\[\w+(?: \+ \w+)?\])?;", body, re.M)
            layout = Layout(leaf, tail=tail)
            header_fields = re.findall(r"^\s+\w+\s+(\w+)(?:\[\w+\])?;",
                                       re.search(r"struct aw_header \{(.*?)\n\};", header, re.S).group(1), re.M)
            expected = header_fields + [f for f in declared if f != "h"]
            decoded = list(layout.names) + ([tail] if tail else [])
            assert decoded == expected
            assert layout.struct.size == (layout.tail_offset if tail else __import__("ctypes").sizeof(leaf))
    finally:
        bpf.cleanup()


def test_loading_gives_back_the_compilers_memory(kernel, tmp_path):
    """BCC compiles in the probe's process: once the program is loaded, the
    compiler libraries' pages are dropped (read-only ones only), and what the
    probe does after still works: its maps answer, its programs run (the
    heartbeat), its rings are read (a tagged cgroup's exec, decoded), and the
    compiler runs again in the same process (a second program loaded)."""
    from agentwarden import cgroups, headers
    from agentwarden.probe import loader
    from agentwarden.probe.main import Probe
    from agentwarden.probe import rings
    from agentwarden.probe.rings import Ring
    from agentwarden.settings import Settings
    from conftest import AgentCgroup

    def compiler_resident() -> int:
        mappings = loader._clean_compiler_mappings(Path("/proc/self/smaps").read_text())
        return sum(resident for _start, _end, resident in mappings)

    bpf = loader.compile_and_attach()
    again = None
    cg = AgentCgroup(kernel, None, "released")
    try:
        left = compiler_resident()
        table = bpf[b"counters"]
        assert len([table.sum(table.Key(i)).value for i in range(4)]) == 4   # the maps still answer
        # Compiling touched about 85 MB of them on the development machines.
        assert left < 16 * 2**20, f"{left / 2**20:.0f} MB of the compiler's pages still resident"
        # Writable or copied-on-write mappings are never chosen.
        text = Path("/proc/self/smaps").read_text()
        for start, _end, _resident in loader._clean_compiler_mappings(text):
            header = next(line for line in text.splitlines() if line.startswith(f"{start:x}-"))
            assert "w" not in header.split()[1]
        # A probe on this program: heartbeat, tags into the maps, the rings read and decoded.
        settings = Settings(run_dir=tmp_path / "run", state_dir=tmp_path / "state",
                            policy_dir=tmp_path / "policy", cgroup_scope=cg.path.parent.name)
        probe = Probe(settings, bpf, headers.header_constants())
        try:
            assert probe.heartbeat() == []   # every heartbeat program ran
            cg.tag()
            assert probe.tags.watch(cg.path)["ok"]
            # Both readers: libbpf's, and the probe's own mapping (x86-64).
            for reader in (Ring, rings.MappedRing):
                probe.vital, probe.events = reader(bpf, "vital"), reader(bpf, "events")
                argv = ["/usr/bin/true", f"after-release-{reader.__name__}"]
                assert cg.run(argv).returncode == 0
                records = wait_for(lambda: [r for r in probe._drain() if r["kind"] == "exec"
                                            and r["agent_cgroup_id"] == cg.id], what="the exec record")
                assert [r["argv"] for r in records] == [argv]
                probe.vital.close()
                probe.events.close()
                probe.vital = probe.events = None
        finally:
            for ring in (probe.vital, probe.events):
                if ring is not None:
                    ring.close()
            probe.sock.close()
            probe.rules_sock.close()
        # The compiler's dropped pages come back from their files when it runs again.
        again = loader.compile_and_attach()
        assert again[b"counters"].sum(table.Key(0)).value >= 0
    finally:
        if again is not None:
            again.cleanup()
        bpf.cleanup()
        cgroups.untag(cg.path)
        cg.remove()


def test_records_queued_without_a_wakeup_still_arrive_within_the_interval(warden, agent_cgroup, tmp_path):
    """The ring wakes the probe at most once per wake-up interval; a record
    emitted just after a wake-up is queued silently and must still reach the
    daemon about one interval later, not at the probe's next health tick."""
    from agentwarden import wire
    interval = warden.settings.wakeup_interval
    assert interval > 0
    cg = agent_cgroup("silent")
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_text("")
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"events")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(warden.settings.events_endpoint)
    # Quiet long enough for a wake-up, then a second open well inside the interval.
    script = (f"import os, time\ntime.sleep({3 * interval})\n"
              f"os.close(os.open('{first}', os.O_RDONLY))\ntime.sleep({interval / 5})\n"
              f"os.close(os.open('{second}', os.O_RDONLY | os.O_CREAT, 0o600))\nprint(time.monotonic())\n")

    def arrival_of_second() -> float:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if sub.poll(100):
                _topic, payload = sub.recv_multipart()
                if any(r.get("resolved_path") == str(second) for r in wire.decode_batch(payload).records):
                    return time.monotonic()
        raise AssertionError("the second open never arrived")

    wait_for(lambda: (cg.run(["/bin/true"]), sub.poll(200))[1], timeout=20, what="the subscriber to connect")
    delays = []
    try:
        for _ in range(5):
            while sub.poll(0):
                sub.recv_multipart()
            second.unlink(missing_ok=True)
            done = float(cg.run([sys.executable, "-S", "-c", script], check=True,
                                capture_output=True, text=True).stdout)
            delays.append(arrival_of_second() - done)
    finally:
        sub.close()
    print("delivery delays (s):", [round(d, 4) for d in delays])
    # Health ticks come every second: without the timed look the delays spread over it.
    assert max(delays) < 0.3, delays
