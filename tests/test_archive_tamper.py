"""Tampering with a real archive — written by a real daemon process, keyed,
several segments (the older ones compressed) — in every way an attacker or an
accident might, and `agentwarden log verify` names the place and exits 1.
A retention deletion verifies clean."""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from agentwarden.archive.segments import (HEAD_FILE, SegmentReader, chain_hash,
                                         compress_bytes, decode_body, encode_head,
                                         list_segments, load_segment, read_head)
from agentwarden.wire import pack

from fakeprobe import Daemon, FakeProbe, exec_record, open_record, tags_record

pytestmark = pytest.mark.kernel

CGROUP = 4711


def _push(probe: FakeProbe, batches: int) -> None:
    probe.send([tags_record({CGROUP: {"agent": "tamper", "path": "/sys/fs/cgroup/tamper"}})])
    for b in range(batches):
        pid = 5000 + b
        probe.send([exec_record(pid, CGROUP, ["/usr/bin/git", "commit", "-m", f"change {b}"]),
                    open_record(pid, CGROUP, f"/home/agent/work/file{b}.py", os.O_WRONLY | os.O_TRUNC),
                    open_record(pid, CGROUP, "/etc/passwd")])


def _wait_written(daemon: Daemon, count: int) -> None:
    deadline = time.monotonic() + 20
    while daemon.archive_state()["durable_seq"] < count:
        assert time.monotonic() < deadline, daemon.archive_state()
        time.sleep(0.05)


@pytest.fixture(scope="module")
def written(kernel, tmp_path_factory):
    """A keyed archive of about 1,000 records in several segments."""
    tmp = tmp_path_factory.mktemp("tamper")
    key = tmp / "archive.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    daemon = Daemon(tmp, env={"AGENTWARDEN_ARCHIVE_KEY_FILE": str(key),
                              "AGENTWARDEN_ARCHIVE_SEGMENT_BYTES": "48K"}).start()
    probe = FakeProbe(daemon.settings)
    _push(probe, 330)
    _wait_written(daemon, 990)
    probe.close()
    deadline = time.monotonic() + 30
    while daemon.archive_state()["counters"].get("segments_compressed", 0) < 4:
        assert time.monotonic() < deadline, daemon.archive_state()
        time.sleep(0.05)
    assert daemon.stop() == 0, daemon.output()
    assert len(list_segments(daemon.settings.archive_dir)) >= 5
    return daemon, key


@pytest.fixture
def archive(written, tmp_path):
    daemon, key = written
    copy = tmp_path / "archive"
    shutil.copytree(daemon.settings.archive_dir, copy)
    return copy


def _verify(written, archive: Path, key: bool = True):
    daemon, keyfile = written
    args = ["log", "verify", "--archive", str(archive)] + (["--key", str(keyfile)] if key else [])
    result = daemon.cli(*args)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def _expect(written, archive: Path, seq: int | None, segment: str | None, *words: str) -> str:
    result = _verify(written, archive)
    assert result.returncode == 1, result.stdout + result.stderr
    [failed] = [line for line in result.stdout.splitlines() if line.startswith("FAILED: ")]
    if seq is not None:
        assert re.search(rf"record seq {seq}\b", failed), failed
    if segment is not None:
        assert f"in {segment}" in failed, failed
    for word in words:
        assert word in failed, failed
    return failed


# -- reading and rewriting segments as an attacker would ------------------------------

def _segment(archive: Path, compressed: bool):
    """A middle segment that is compressed, or the last (plain) one."""
    segments = list_segments(archive)
    if compressed:
        return next(s for s in segments[1:-1] if s.compression)
    return segments[-1]


def _entries(segment):
    data = load_segment(segment)
    reader = SegmentReader(data)
    entries = list(reader.entries())
    ends = [e.offset for e in entries[1:]] + [reader.offset]
    return data, reader, entries, ends


def _store(segment, data: bytes) -> None:
    segment.path.write_bytes(compress_bytes(data, segment.compression) if segment.compression else data)


def test_the_untouched_archive_verifies(written, archive):
    result = _verify(written, archive)
    assert result.returncode == 0, result.stdout
    assert result.stdout.startswith("OK: ") and "(keyed)" in result.stdout


@pytest.mark.parametrize("compressed", [True, False], ids=["sealed-segment", "active-segment"])
def test_a_flipped_byte(written, archive, compressed):
    segment = _segment(archive, compressed)
    data, _, entries, ends = _entries(segment)
    victim, end = entries[len(entries) // 2], ends[len(entries) // 2]
    at = end - 32 - 10  # inside the record's body, before its hash
    changed = bytearray(data)
    changed[at] ^= 0x20
    _store(segment, bytes(changed))
    _expect(written, archive, victim.seq, segment.path.name, f"at byte {victim.offset}",
            "hash does not match", "the record was changed")


def test_a_deleted_record(written, archive):
    segment = _segment(archive, True)
    data, _, entries, ends = _entries(segment)
    k = len(entries) // 2
    _store(segment, data[:entries[k].offset] + data[ends[k]:])
    _expect(written, archive, entries[k + 1].seq, segment.path.name,
            f"records {entries[k].seq}..{entries[k].seq} were removed")


def test_two_swapped_records(written, archive):
    segment = _segment(archive, False)
    data, _, entries, ends = _entries(segment)
    k = len(entries) // 3
    a, b = data[entries[k].offset:ends[k]], data[entries[k + 1].offset:ends[k + 1]]
    _store(segment, data[:entries[k].offset] + b + a + data[ends[k + 1]:])
    _expect(written, archive, entries[k + 1].seq, segment.path.name,
            f"found where seq {entries[k].seq} belongs", "swapped or moved")


def test_an_inserted_copy_of_a_record(written, archive):
    segment = _segment(archive, True)
    data, _, entries, ends = _entries(segment)
    k = 3
    copy = data[entries[k].offset:ends[k]]
    _store(segment, data[:ends[k]] + copy + data[ends[k]:])
    _expect(written, archive, entries[k].seq, segment.path.name, "repeated or out of order")


def test_a_dropped_middle_segment(written, archive):
    segments = list_segments(archive)
    dropped, following = segments[2], segments[3]
    first_missing = SegmentReader(load_segment(dropped)).header.first_seq
    dropped.path.unlink()
    _expect(written, archive, following.first_seq, following.path.name,
            f"records seq {first_missing}..{following.first_seq - 1} are missing", "a segment was removed")


def test_a_dropped_first_segment_is_not_retention(written, archive):
    segments = list_segments(archive)
    segments[0].path.unlink()
    _expect(written, archive, segments[1].first_seq, segments[1].path.name,
            "no retention record accounts for them")


@pytest.mark.parametrize("where", ["record-boundary", "mid-record"])
def test_a_truncated_tail(written, archive, where):
    segment = _segment(archive, False)
    _, _, entries, _ = _entries(segment)
    cut = entries[-4].offset + (0 if where == "record-boundary" else 11)
    os.truncate(segment.path, cut)
    last = read_head(archive).seq
    _expect(written, archive, entries[-4].seq, None,
            f"the archive ends at seq {entries[-4].seq - 1}", f"says seq {last} was durable",
            "cut off the end")


def test_a_truncated_tail_with_the_head_removed(written, archive):
    segment = _segment(archive, False)
    _, _, entries, _ = _entries(segment)
    os.truncate(segment.path, entries[-4].offset)
    (archive / HEAD_FILE).unlink()
    _expect(written, archive, None, None, "there is no head file")


def _edit_and_rehash(archive: Path, key: bytes) -> int:
    """Change one exec record's argv in the last segment and recompute every hash
    after it and the head — as someone without the key can (the header, whose
    hash they cannot make either, they leave as it is)."""
    segment = _segment(archive, False)
    data, reader, entries, _ = _entries(segment)
    k = next(i for i, e in enumerate(entries) if decode_body(e.body)["kind"] == "exec")
    out = data[:reader.header_end]
    chain = reader.header.prev_hash
    for i, entry in enumerate(entries):
        body = entry.body
        if i == k:
            record = decode_body(body)
            record["argv"] = ["/usr/bin/git", "status"]
            body = pack(record)
        chain = chain_hash(key, chain, entry.seq, body)
        out += pack([entry.seq, body, chain])
    segment.path.write_bytes(out)
    head = read_head(archive)
    (archive / HEAD_FILE).write_bytes(encode_head(key, entries[-1].seq, chain, head.segment, head.time))
    return entries[k].seq


def test_an_edited_record_rehashed_without_the_key(written, archive):
    seq = _edit_and_rehash(archive, b"")
    _expect(written, archive, seq, None, "hash does not match", "rehashed without the key")



def test_retention_deletions_verify_clean(kernel, tmp_path):
    daemon = Daemon(tmp_path, env={"AGENTWARDEN_ARCHIVE_SEGMENT_BYTES": "16K",
                                   "AGENTWARDEN_ARCHIVE_RETAIN_BYTES": "40K"}).start()
    probe = FakeProbe(daemon.settings)
    _push(probe, 300)
    _wait_written(daemon, 900)
    deadline = time.monotonic() + 20
    while daemon.archive_state()["counters"].get("segments_deleted", 0) < 3:
        assert time.monotonic() < deadline, daemon.archive_state()
        time.sleep(0.1)
    probe.close()
    assert daemon.stop() == 0
    archive = daemon.settings.archive_dir
    assert list_segments(archive)[0].first_seq > 0  # the start is gone
    result = daemon.cli("log", "verify")
    assert result.returncode == 0, result.stdout
    assert "were deleted by retention" in result.stdout
    deletions = daemon.cli("log", "search", "--kind", "archive", "--json")
    assert '"event": "retention"' in deletions.stdout and '"reason": "size"' in deletions.stdout
