"""The archive writer and verify, in process (no root needed): chain, rotation,
compression, torn tails, write failures, retention, keys."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agentwarden.daemon.archive import ArchiveWriter
from agentwarden.archive.segments import (ArchiveError, SegmentReader, list_segments, load_key,
                                         load_segment, read_head, read_items, read_records)
from agentwarden.archive.verify import verify
from agentwarden.settings import ArchiveSettings

KEY = bytes(range(32))


def gap(n: int) -> dict:
    return {"kind": "gap", "time": 1_700_000_000_000_000_000 + n, "stage": "test", "count": n,
            "detail": f"record {n} " + "x" * 100}


def write(directory: Path, count: int, key: bytes = b"", start: int = 0, sync: bool = True,
          **config) -> ArchiveWriter:
    writer = ArchiveWriter(directory, ArchiveSettings(**config), key)
    for n in range(start, start + count):
        writer.append(gap(n))
        if n % 50 == 49:
            writer.flush()
    if sync:
        writer.sync()
    return writer


def wait_compressed(writer: ArchiveWriter, count: int) -> None:
    deadline = time.monotonic() + 20
    while writer.counters["segments_compressed"] < count:
        assert time.monotonic() < deadline, "compression did not finish"
        time.sleep(0.01)


def counts(directory: Path) -> list[int]:
    return [r["count"] for r in read_records(directory) if r["kind"] == "gap"]


def test_records_come_back_in_order_with_their_seq_and_verify(tmp_path):
    writer = write(tmp_path, 200, KEY)
    writer.close()
    records = list(read_records(tmp_path))
    assert [r["seq"] for r in records] == list(range(len(records)))
    assert counts(tmp_path) == list(range(200))
    assert oct(tmp_path.stat().st_mode & 0o777) == "0o700"
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in tmp_path.iterdir())
    report = verify(tmp_path, KEY)
    assert report.ok and report.keyed and report.records == len(records)
    assert read_head(tmp_path).seq == len(records) - 1


@pytest.mark.parametrize("compression", ["xz", "zlib", "none"])
def test_rotation_by_size_and_compression_keep_the_chain(tmp_path, compression):
    writer = write(tmp_path, 600, segment_bytes=16384, compress=compression)
    segments = list_segments(tmp_path)
    assert len(segments) > 3
    if compression != "none":
        wait_compressed(writer, len(segments) - 1)
        assert {s.compression for s in list_segments(tmp_path)[:-1]} == {compression}
    assert list_segments(tmp_path)[-1].compression is None  # the active one stays plain
    writer.close()
    assert counts(tmp_path) == list(range(600))
    assert verify(tmp_path, None).ok


def test_rotation_by_age(tmp_path):
    writer = write(tmp_path, 10, segment_age=60)
    writer.rotate_if_old(time.time_ns())
    assert len(list_segments(tmp_path)) == 1
    writer.rotate_if_old(time.time_ns() + 61 * 10**9)
    writer.append(gap(10))
    writer.sync()
    assert len(list_segments(tmp_path)) == 2
    writer.close()
    assert verify(tmp_path, None).ok and counts(tmp_path) == list(range(11))


def test_sync_is_due_within_the_interval(tmp_path):
    writer = ArchiveWriter(tmp_path, ArchiveSettings(sync_interval=0.2))
    assert not writer.sync_due() and writer.seconds_to_sync() is None
    seq = writer.append(gap(1))
    writer.flush()
    assert writer.durable_seq < seq and not writer.sync_due()
    assert 0 < writer.seconds_to_sync() <= 0.2
    assert writer.sync_due(time.monotonic() + 0.21)
    writer.sync()
    assert writer.durable_seq == seq and read_head(tmp_path).seq == seq
    writer.close()


def test_a_torn_tail_is_cut_and_the_cut_recorded(tmp_path):
    write(tmp_path, 30).close()
    [segment] = list_segments(tmp_path)
    data = segment.path.read_bytes()
    whole = len(data)
    last = list(SegmentReader(data).entries())[-1]
    with open(segment.path, "ab") as f:
        f.write(data[last.offset:last.offset + 70])  # the start of a record that never finished
    report = verify(tmp_path, None)
    assert report.ok and "a write in progress, or a crash" in report.notes[0]
    writer = ArchiveWriter(tmp_path)
    [cut] = [r for r in writer.recovered if r["event"] == "torn-tail-cut"]
    assert cut["bytes_cut"] == 70 and cut["offset"] == whole
    writer.close()
    report = verify(tmp_path, None)
    assert report.ok, report.problem
    assert any("recovered from a crash" in n for n in report.notes)
    assert counts(tmp_path) == list(range(30))


def test_a_segment_with_a_torn_header_is_removed_and_recorded(tmp_path):
    write(tmp_path, 30, segment_bytes=4096, compress="none").close()
    segments = list_segments(tmp_path)
    last = segments[-1]
    header_start = last.path.read_bytes()[:25]
    nxt = tmp_path / f"segment-{int(last.first_seq) + 1000:016d}.awseg"
    nxt.write_bytes(header_start)
    writer = ArchiveWriter(tmp_path)
    assert [r["event"] for r in writer.recovered] == ["torn-header-removed"]
    assert not nxt.exists()
    writer.append(gap(99))
    writer.close()
    assert verify(tmp_path, None).ok


def test_garbage_inside_the_last_segment_is_left_for_verify(tmp_path):
    write(tmp_path, 30).close()
    [segment] = list_segments(tmp_path)
    with open(segment.path, "ab") as f:
        f.write(b"\xc1" * 40)  # never valid msgpack
    writer = ArchiveWriter(tmp_path)
    assert [r["event"] for r in writer.recovered] == ["damaged-tail"]
    writer.append(gap(30))
    writer.close()
    assert len(list_segments(tmp_path)) == 2  # writing went on in a new segment
    report = verify(tmp_path, None)
    assert not report.ok
    assert report.problem.segment.startswith(segment.path.name)  # by now compressed: .xz
    assert "damaged or edited" in str(report.problem)
    assert counts(tmp_path) == list(range(31))  # readers still get every record


def test_records_cut_below_the_head_are_lost_durable_records(tmp_path):
    write(tmp_path, 30).close()
    [segment] = list_segments(tmp_path)
    reader = SegmentReader(load_segment(segment))
    entries = list(reader.entries())
    os.truncate(segment.path, entries[-5].offset)
    report = verify(tmp_path, None)
    assert not report.ok and "cut off the end" in str(report.problem)
    writer = ArchiveWriter(tmp_path)
    assert [r["event"] for r in writer.recovered] == ["lost-durable"]
    writer.close()
    assert "head file had confirmed durable were lost" in str(verify(tmp_path, None).problem)


def test_only_one_writer(tmp_path):
    writer = ArchiveWriter(tmp_path)
    with pytest.raises(ArchiveError, match="another agentwarden daemon"):
        ArchiveWriter(tmp_path)
    writer.close()


def test_keys(tmp_path):
    write(tmp_path, 20, KEY).close()
    assert verify(tmp_path, KEY).ok
    wrong = verify(tmp_path, bytes(32))
    assert not wrong.ok and "not with the given key" in str(wrong.problem)
    with pytest.raises(ArchiveError, match="give the key"):
        verify(tmp_path, None)
    # A daemon restarted without its key goes on unkeyed; verify with the key says so.
    writer = ArchiveWriter(tmp_path, ArchiveSettings(segment_bytes=4096))
    for n in range(100):
        writer.append(gap(n))
        writer.flush()
    writer.close()
    report = verify(tmp_path, KEY)
    assert not report.ok and "is not keyed, but a key was given" in str(report.problem)


def test_key_files(tmp_path):
    path = tmp_path / "key"
    assert load_key(path, required=False, check_owner=False) == b""
    with pytest.raises(ArchiveError, match="does not exist"):
        load_key(path, required=True)
    path.write_bytes(b"short")
    with pytest.raises(ArchiveError, match="needs 16 to 64"):
        load_key(path, required=True, check_owner=False)
    path.write_bytes(KEY)
    path.chmod(0o644)
    with pytest.raises(ArchiveError, match="readable by root only"):
        load_key(path, required=True)
    path.chmod(0o600)
    assert load_key(path, required=True, check_owner=False) == KEY


def test_retention_by_size_and_age_is_recorded_and_verifies(tmp_path):
    writer = write(tmp_path, 400, segment_bytes=8192, compress="none", retain_bytes=30000)
    before = list_segments(tmp_path)
    deleted = writer.apply_retention()
    assert deleted
    left = {s.path.name for s in list_segments(tmp_path)}
    assert {r["segment"] for r in deleted} == {s.path.name for s in before} - left
    assert sum(s.path.stat().st_size for s in list_segments(tmp_path)) <= 30000
    assert all(r["event"] == "retention" and r["reason"] == "size" for r in deleted)
    writer.close()
    report = verify(tmp_path, None)
    assert report.ok, report.problem
    assert any("deleted by retention" in n for n in report.notes)

    writer = ArchiveWriter(tmp_path, ArchiveSettings(segment_bytes=8192, compress="none", retain_age=3600))
    assert writer.apply_retention(time.time_ns()) == []             # nothing an hour old
    aged = writer.apply_retention(time.time_ns() + 2 * 3600 * 10**9)
    assert aged and all(r["reason"] == "age" for r in aged)
    assert len(list_segments(tmp_path)) == 1                         # never the newest
    writer.close()
    assert verify(tmp_path, None).ok


def test_segments_deleted_by_hand_are_not_retention(tmp_path):
    write(tmp_path, 300, segment_bytes=8192, compress="none").close()
    first = list_segments(tmp_path)[0]
    first.path.unlink()
    report = verify(tmp_path, None)
    assert not report.ok
    assert "no retention record accounts for them" in str(report.problem)
    assert report.problem.segment == list_segments(tmp_path)[0].path.name


_FAILING_WRITER = r"""
import resource, signal, sys, time
from pathlib import Path
from agentwarden.daemon.archive import ArchiveWriter
from agentwarden.settings import ArchiveSettings
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # over the limit: write() fails with EFBIG
directory = Path(sys.argv[1])
writer = ArchiveWriter(directory, ArchiveSettings(compress="none"))
def gap(n): return {"kind": "gap", "time": n, "stage": "t", "count": n, "detail": "y" * 200}
for n in range(20): writer.append(gap(n))
assert writer.sync()
size = sum(p.stat().st_size for p in directory.glob("segment-*"))
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 1000, hard))
for n in range(20, 60): writer.append(gap(n))
assert not writer.sync() and writer.failure and "File too large" in writer.failure
on_disk = sum(p.stat().st_size for p in directory.glob("segment-*"))
assert on_disk == size, (on_disk, size)   # no half record left behind
assert writer.durable_seq == 19 and len(writer.pending) == 40
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
writer.retry_at = 0
assert writer.sync_due() and writer.sync() and writer.failure is None
assert writer.durable_seq == 59
writer.close()
print("ok")
"""


def test_a_failed_write_leaves_no_partial_record_and_is_retried(tmp_path):
    result = subprocess.run([sys.executable, "-c", _FAILING_WRITER, str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "ok", result.stderr
    assert counts(tmp_path) == list(range(60))
    assert verify(tmp_path, None).ok


def test_read_items_reports_what_it_skips(tmp_path):
    write(tmp_path, 100, segment_bytes=4096, compress="none").close()
    segments = list_segments(tmp_path)
    segments[0].path.write_bytes(b"not an archive")
    errors: list[str] = []
    items = list(read_items(tmp_path, errors))
    assert items and errors and segments[0].path.name in errors[0]


class HeldFsync:
    """os.fsync as a slow or failing disk makes it, on the archive-sync thread
    only (the loop's own fsyncs, sealing or closing, run as they do)."""

    def __init__(self, monkeypatch, fail: bool = False):
        self.real, self.fail = os.fsync, fail
        self.entered, self.release = threading.Event(), threading.Event()
        monkeypatch.setattr(os, "fsync", self)

    def __call__(self, fd: int) -> None:
        if threading.current_thread().name == "archive-sync" and not self.release.is_set():
            self.entered.set()
            self.release.wait(30)
            if self.fail:
                self.fail = False
                raise OSError(5, "Input/output error")
        self.real(fd)


def _when_due(writer: ArchiveWriter) -> None:
    deadline = time.monotonic() + 20
    while not writer.sync_due():
        assert time.monotonic() < deadline, "the background fsync never ended"
        time.sleep(0.005)


def test_a_slow_fsync_holds_up_neither_appends_nor_writes_and_the_head_waits_for_it(tmp_path, monkeypatch):
    writer = write(tmp_path, 100)
    held = HeldFsync(monkeypatch)
    for n in range(100, 200):
        writer.append(gap(n))
    started = time.monotonic()
    assert writer.sync_soon()
    assert held.entered.wait(10)
    for n in range(200, 300):   # the loop goes on while the disk is slow
        writer.append(gap(n))
    assert writer.flush()
    assert time.monotonic() - started < 5   # it never waited for the held fsync (held up to 30 s)
    assert writer.state()["sync_in_flight"] and not writer.sync_due()
    assert writer.durable_seq == 99 and read_head(tmp_path).seq == 99   # nothing claimed before the fsync ends
    held.release.set()
    _when_due(writer)
    assert writer.sync_soon()
    # Durable: what the fsync covered, not the records written while it ran.
    assert writer.durable_seq == 199 and read_head(tmp_path).seq == 199
    assert writer.counters["background_fsyncs"] == 1
    writer.close()
    assert counts(tmp_path) == list(range(300))
    assert verify(tmp_path, None).ok


def test_a_failed_background_fsync_is_undone_written_again_and_verifies(tmp_path, monkeypatch):
    writer = write(tmp_path, 50)
    held = HeldFsync(monkeypatch, fail=True)
    for n in range(50, 100):
        writer.append(gap(n))
    assert writer.sync_soon()
    assert held.entered.wait(10)
    for n in range(100, 120):
        writer.append(gap(n))
    assert writer.flush()
    held.release.set()
    _when_due(writer)
    assert not writer.sync_soon()   # the failure is taken: undone, kept in memory, retried later
    assert "cannot fsync" in writer.failure and writer.durable_seq == 49 and writer.size == writer.synced_size
    assert writer.pending and writer.written_seq == 49   # the 70 records are to be written again
    writer.retry_at = 0   # as RETRY_INTERVAL later
    assert writer.sync_soon()   # the plain way while failing; the disk works again
    assert writer.failure is None and writer.durable_seq == 119
    writer.close()
    assert counts(tmp_path) == list(range(120))
    assert verify(tmp_path, None).ok


def test_a_segment_sealed_while_its_fsync_runs_waits_for_it(tmp_path, monkeypatch):
    writer = write(tmp_path, 20, segment_bytes=8192, compress="none")
    held = HeldFsync(monkeypatch)
    for n in range(20, 40):
        writer.append(gap(n))
    assert writer.sync_soon()
    assert held.entered.wait(10)
    threading.Timer(0.3, held.release.set).start()
    for n in range(40, 200):   # past segment_bytes: the flush seals, after the fsync in flight
        writer.append(gap(n))
        writer.flush()
    assert len(list_segments(tmp_path)) > 1
    writer.close()
    assert counts(tmp_path) == list(range(200))
    assert verify(tmp_path, None).ok


def test_the_daemon_decides_and_archives_while_its_fsync_is_held(tmp_path, monkeypatch):
    """A real Daemon (in process, as bench/record_cost.py makes one): with its
    archive's fsync held, its loop's sync returns at once, and a batch that
    breaks the policy is still decided, its violation archived."""
    from agentwarden import wire
    from agentwarden.daemon.main import Daemon
    from agentwarden.settings import Settings
    settings = Settings(run_dir=tmp_path / "run", state_dir=tmp_path / "state", policy_dir=tmp_path / "policy.d",
                        cgroup_scope="held-fsync")
    settings.policy_dir.mkdir(parents=True)
    (settings.policy_dir / "a.toml").write_text('[agent.a]\nmode = "monitor"\non-violation = "alert"\n'
                                                '[agent.a.files]\nread-allow = ["/usr/**"]\n')
    daemon = Daemon(settings)
    held = HeldFsync(monkeypatch)
    held.release.set()   # the first sync (the tags record) as usual
    try:
        daemon.handle_message(wire.encode_batch("probe", 0, [{"kind": "tags", "time": time.time_ns(), "agents": {
            "4242": {"agent": "a", "path": "/sys/fs/cgroup/held-fsync", "level": 1, "watched": True}}}]))
        daemon.archive.sync()
        held.release.clear()

        def opened(path: str) -> dict:
            pid = os.getpid()
            return {"kind": "open", "time": time.time_ns(), "pid": pid, "tid": pid, "ppid": 1, "uid": 0, "gid": 0,
                    "comm": "agent", "cgroup_id": 4242, "agent_cgroup_id": 4242, "syscall": "openat",
                    "path": path, "dirfd": -100, "ret": 3, "error": None, "path_unreadable": False,
                    "path_truncated": False, "flags": os.O_RDONLY, "mode": 0, "resolve": 0,
                    "killed_in_kernel": False, "kernel_rule": None}
        daemon.handle_message(wire.encode_batch("probe", 1, [opened("/usr/lib/os-release")]))
        started = time.monotonic()
        daemon.sync_archive()
        assert held.entered.wait(10)
        violations = daemon.counters["violations"]
        daemon.handle_message(wire.encode_batch("probe", 2, [opened("/etc/shadow")]))
        daemon.sync_archive()   # due again or not: it must not wait for the held fsync
        assert time.monotonic() - started < 5, "the loop waited for the disk"
        assert daemon.counters["violations"] == violations + 1
        assert daemon.archive.state()["sync_in_flight"]
    finally:
        held.release.set()
        daemon.archive.close()
    shadow = [r for r in read_records(settings.archive_dir) if r.get("path") == "/etc/shadow"]
    [violation] = [r for r in read_records(settings.archive_dir) if r["kind"] == "violation"]
    assert shadow and violation["attempted"].endswith("/etc/shadow") and violation["event_seq"] == shadow[0]["seq"]
