"""The daemon's memory stays bounded under a flood, losing nothing and changing
no decision: a sealed segment compressed and checked piece by piece, the
archive synced early once enough waits unsynced, the open-verdict cache's
least recently used entries evicted and counted (decided again the same way),
the symlink look of a batch (a directory once, then one lstat per entry) saying
what the per-path look says, and the C heap trimmed after a burst. In process,
no root, except the last (a real daemon fed by a fake probe)."""
from __future__ import annotations

import os
import random
import tracemalloc
from pathlib import Path

import pytest

from agentwarden import policy as policy_mod
from agentwarden.archive.segments import (ArchiveError, compressor, decompressed_pieces, list_segments,
                                         read_records)
from agentwarden.archive.verify import verify
from agentwarden.daemon import archive as archive_mod
from agentwarden.daemon import governor as governor_mod
from agentwarden.daemon.archive import ArchiveWriter
from agentwarden.daemon.governor import BatchLooks, Governor, kernel_real_path
from agentwarden.settings import ArchiveSettings
from conftest import wait_for


def noise(n: int) -> dict:
    """A record that compresses about as badly as real ones (random text)."""
    return {"kind": "gap", "time": 1_700_000_000_000_000_000 + n, "stage": "test", "count": n,
            "detail": os.urandom(200).hex()}


def sealed_segment(directory: Path, size: int) -> tuple[ArchiveWriter, Path, bytes]:
    """A writer (compressing nothing itself) with one sealed plain segment of about size bytes."""
    writer = ArchiveWriter(directory, ArchiveSettings(segment_bytes=size, compress="none"))
    n = 0
    while len(list_segments(directory)) < 2:
        writer.append(noise(n))
        n += 1
        if n % 100 == 0:
            writer.flush()
    writer.sync()
    first = list_segments(directory)[0].path
    return writer, first, first.read_bytes()


def compressing_peak(directory: Path, size: int, compression: str) -> tuple[int, Path, bytes]:
    """The most Python memory held while compressing a sealed segment of about size bytes."""
    directory.mkdir()
    writer, path, original = sealed_segment(directory, size)
    writer.config = ArchiveSettings(compress=compression)
    tracemalloc.start()
    try:
        writer._compress(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    writer.close()
    return peak, path, original


@pytest.mark.parametrize("compression", ["xz", "zlib"])
def test_a_sealed_segment_is_compressed_and_checked_piece_by_piece(tmp_path, compression):
    small, _, _ = compressing_peak(tmp_path / "small", 4 << 20, compression)
    large, path, original = compressing_peak(tmp_path / "large", 24 << 20, compression)
    assert len(original) > 16 * archive_mod.COMPRESS_PIECE
    # Whole, it held the segment, its compressed copy and the check's copy at
    # once; now a few pieces and the compressor's own state (xz: about 10 MiB),
    # whatever the segment's size.
    print(f"{compression}: {small / 2**20:.1f} MiB held compressing 4 MiB, {large / 2**20:.1f} for 24")
    assert large - small < 2 * archive_mod.COMPRESS_PIECE
    assert large < len(original) * 0.6
    assert not path.exists()
    (compressed,) = [s for s in list_segments(tmp_path / "large") if s.compression]
    with open(compressed.path, "rb") as f:
        assert b"".join(decompressed_pieces(f, compression)) == original
    assert verify(tmp_path / "large", b"").ok
    counts = [r["count"] for r in read_records(tmp_path / "large") if r["kind"] == "gap"]
    assert counts == list(range(len(counts))) and len(counts) > 20_000


def test_a_copy_that_does_not_decompress_to_the_segment_replaces_nothing(tmp_path, monkeypatch):
    writer, path, original = sealed_segment(tmp_path, 1 << 20)
    writer.config = ArchiveSettings(compress="xz")

    class OneByteWrong:
        def __init__(self, compression):
            self.inner, self.first = compressor(compression), True

        def compress(self, data: bytes) -> bytes:
            if self.first:
                data, self.first = bytes([data[0] ^ 1]) + data[1:], False
            return self.inner.compress(data)

        def flush(self) -> bytes:
            return self.inner.flush()

    monkeypatch.setattr(archive_mod, "compressor", OneByteWrong)
    with pytest.raises(ArchiveError, match="does not decompress to the original"):
        writer._compress(path)
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("segment")) == \
        sorted(s.path.name for s in list_segments(tmp_path))   # no copy, no .tmp left
    assert all(s.compression is None for s in list_segments(tmp_path))
    writer.close()


def test_a_truncated_compressed_stream_is_an_archive_error(tmp_path):
    packer = compressor("xz")
    data = packer.compress(os.urandom(200_000)) + packer.flush()
    (tmp_path / "cut").write_bytes(data[:len(data) // 2])
    with open(tmp_path / "cut", "rb") as f, pytest.raises(ArchiveError, match="ends early"):
        list(decompressed_pieces(f, "xz"))


def test_sync_is_due_once_enough_waits_unsynced(tmp_path):
    writer = ArchiveWriter(tmp_path, ArchiveSettings(sync_interval=60, compress="none"))
    n = 0
    while writer.unsynced_bytes < archive_mod.MAX_UNSYNCED_BYTES:
        assert writer.sync_due() is False   # the interval is a minute away
        for _ in range(200):
            writer.append(noise(n))
            n += 1
        writer.flush()
    assert writer.sync_due() and writer.seconds_to_sync() == 0.0
    assert writer.sync()
    assert writer.unsynced_bytes == 0 and writer.unsynced == []
    assert writer.durable_seq == writer.seq - 1
    writer.close()


def open_record(path: Path, flags: int = os.O_RDONLY) -> dict:
    return {"kind": "open", "agent": "a", "pid": 1, "comm": "cat", "path": str(path),
            "resolved_path": str(path), "flags": flags, "ret": 3, "error": None, "agent_cgroup_id": 1}


def test_the_verdict_cache_evicts_the_least_recently_used_and_never_changes_a_decision(tmp_path, monkeypatch):
    monkeypatch.setattr(governor_mod, "DECISION_CACHE_SIZE", 4)
    data = tmp_path / "data"
    data.mkdir()
    policy_dir = tmp_path / "policy.d"
    policy_dir.mkdir()
    (policy_dir / "a.toml").write_text(f'[agent.a]\nmode = "monitor"\non-violation = "alert"\n[agent.a.files]\n'
                                       f'deny = ["{data}/secret*"]\nread-allow = ["{data}/**"]\n')
    governor = Governor([policy_dir], lambda cgroup_id: None)
    governor.load()
    names = [f"f{i}" for i in range(6)] + ["secret1", "secret2"]
    for name in names:
        (data / name).write_text("x")

    def judged(name: str, flags: int = os.O_RDONLY) -> str:
        record = open_record(data / name, flags)
        governor.judge(record)
        uncached = policy_mod.decide(open_record(data / name, flags), governor.policy)
        assert record["verdict"]["decision"] == uncached.decision, name
        assert record["verdict"]["rule"] == uncached.rule, name
        return record["verdict"]["decision"]

    assert [judged(n) for n in ("f0", "f1", "f2", "f3")] == ["allow"] * 4
    assert governor.cache_state()["evictions"] == 0
    judged("f0")                                      # f0 used again: f1 is now the oldest
    assert judged("secret1") == "deny"                # a fifth: f1 goes
    assert governor.cache_state() == {"entries": 4, "size": 4, "hits": 1, "evictions": 1}
    judged("f0")                                      # still there
    assert governor.cache_state()["hits"] == 2
    judged("f1")                                      # decided again (f2 goes for it)
    assert governor.cache_state()["hits"] == 2 and governor.cache_state()["evictions"] == 2
    rng = random.Random(7)
    for _ in range(300):                              # churn: every answer as without a cache
        judged(rng.choice(names), rng.choice([os.O_RDONLY, os.O_WRONLY]))
    state = governor.cache_state()
    assert state["entries"] == 4 and state["evictions"] > 100
    governor.load()                                   # a new policy object: the cache goes with it
    judged("f0")
    assert governor.cache_state()["entries"] == 1


def test_a_batch_looks_up_real_paths_as_the_kernel_resolves_them(tmp_path, monkeypatch):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "plain").write_text("x")
    (tmp_path / "dir" / "sub").mkdir()
    (tmp_path / "dir" / "sub" / "deep").write_text("x")
    (tmp_path / "dir" / "link").symlink_to(tmp_path / "dir" / "plain")
    (tmp_path / "dir" / "relative").symlink_to("sub/deep")
    (tmp_path / "dir" / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "linkdir").symlink_to(tmp_path / "dir")
    os.mkfifo(tmp_path / "dir" / "fifo")
    paths = [str(tmp_path / p) for p in (
        "dir/plain", "dir/link", "dir/relative", "dir/dangling", "dir/missing", "dir/sub/deep",
        "linkdir/plain", "linkdir/sub/deep", "linkdir", "dir/plain/under-a-file", "dir/fifo",
        "dir/sub/../plain", "dir/./plain", "dir//plain", "dir/")] + ["/", "relative/path"]
    before = set(os.listdir("/proc/self/fd"))
    looks = BatchLooks()
    assert {p: looks.real_path(p) for p in paths} == {p: kernel_real_path(p) for p in paths}
    looks.close()
    assert set(os.listdir("/proc/self/fd")) == before   # the batch's directories closed
    # More directories than a batch keeps open: the rest are looked up path by path.
    monkeypatch.setattr(governor_mod, "MAX_DIRECTORIES_PER_BATCH", 1)
    looks = BatchLooks()
    assert {p: looks.real_path(p) for p in paths} == {p: kernel_real_path(p) for p in paths}
    assert sum(fd is not None for fd in looks.directories.values()) == 1
    looks.close()


@pytest.mark.kernel
def test_the_heap_is_trimmed_once_a_burst_is_over(kernel, tmp_path):
    from fakeprobe import Daemon, FakeProbe, open_record as wire_open, tags_record
    daemon = Daemon(tmp_path).start()
    probe = FakeProbe(daemon.settings)
    try:
        probe.send([tags_record({77: {"agent": "burst", "path": "/sys/fs/cgroup/burst"}})])
        assert daemon.status()["daemon"]["counters"].get("heap_trims", 0) == 0
        sent = 0
        while sent < 25_000:
            probe.send([wire_open(9000, 77, f"/work/b{sent + i}") for i in range(1000)])
            sent += 1000

        def trimmed() -> bool:
            counters = daemon.status()["daemon"]["counters"]
            return counters.get("records_open", 0) >= sent and counters.get("heap_trims", 0) >= 1
        wait_for(trimmed, timeout=30, what="a heap trim after the burst")
    finally:
        probe.close()
        daemon.stop()


@pytest.mark.kernel
def test_ingest_queues_only_a_few_batches_while_the_daemon_is_busy(kernel, tmp_path):
    """The ingest socket's high-water mark holds (it is set before bind): a
    daemon that does not read takes a few batches, then the sender must keep
    the rest (the probe: its bounded backlog, then the kernel ring, counted).
    Set after bind, ZeroMQ queued 1,000 batches, up to a gigabyte."""
    import zmq
    from agentwarden import wire
    from agentwarden.daemon import main as daemon_main
    from agentwarden.settings import Settings
    from fakeprobe import open_record as wire_open
    settings = Settings(run_dir=tmp_path / "run", state_dir=tmp_path / "state",
                        policy_dir=tmp_path / "policy.d", cgroup_scope="ingest-hwm")
    settings.policy_dir.mkdir(parents=True)
    daemon = daemon_main.Daemon(settings)   # its loop not running: nothing reads the socket
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.SNDHWM, 4)
    push.connect(settings.ingest_endpoint)
    try:
        batch = wire.encode_batch("probe", 0, [wire_open(9000, 77, f"/work/hwm/{i:06d}" + "x" * 150)
                                               for i in range(4096)])
        accepted = 0

        def full() -> bool:
            nonlocal accepted
            while accepted < 200:
                try:
                    push.send(batch, zmq.NOBLOCK)
                except zmq.Again:
                    return True
                accepted += 1
            return True
        # The first sends race the connection: retry until the queue stays full.
        wait_for(lambda: full() and accepted > 0 and not push.poll(200, zmq.POLLOUT), timeout=20,
                 what="the ingest queue to fill")
        print(f"{accepted} batches of {len(batch) / 2**20:.1f} MiB taken while the daemon did not read")
        assert accepted <= daemon_main.INGEST_HWM + 4 + 4, accepted   # its HWM, the sender's, in flight
        # Nothing taken is lost: the daemon archives every one once it reads.
        for _ in range(accepted):
            daemon.handle_message(daemon.pull.recv())
        assert daemon.counters["records_open"] == accepted * 4096
    finally:
        push.close()
        for sock in (daemon.pull, daemon.pub, daemon.control):
            sock.close()
        daemon.archive.close()
