"""The daemon's archive writer: chain, write, fsync, rotate, compress, recover, retain.

The format is in segments.py. The writer's promises:

- **Order and chain**: ``append`` gives each record the next ``seq`` and its
  chain hash at once (so the daemon can publish the seq); ``flush`` writes what
  is pending to the OS in one write; ``sync`` fsyncs and then rewrites the head
  file. ``durable_seq`` is the highest seq known to be on stable storage.
- **Bounded loss**: the daemon calls ``sync_soon`` when ``sync_due`` — at most
  ``sync_interval`` after the first record that is not yet fsynced, or
  sooner once ``MAX_UNSYNCED_BYTES`` wait (bounded memory: what is written but
  not fsynced is kept to write again).
- **The disk never holds the daemon's loop**: ``sync_soon`` writes what is
  pending, then hands the fsync (of a dup of the segment's fd) and the head
  file's rewrite to the ``archive-sync`` thread and returns; the loop takes
  the outcome at a later ``sync_soon`` (``sync_due`` says when). ``durable_seq``
  and the head name only what that fsync covered; a failed one is undone
  as a failed ``sync`` is. The loop waits for the disk only to seal or close
  a segment, for ``sync``, and when twice ``MAX_UNSYNCED_BYTES`` wait behind a
  slow fsync (memory stays bounded).
- **Torn tails**: at start, an incomplete record at the end of the last
  segment (a crash mid-write) is cut, and an ``archive`` record
  ``torn-tail-cut`` says where and how many bytes. Anything else unreadable is
  left in place for ``verify`` to report, and the writer continues in a new
  segment (``damaged-tail``).
- **Failures** (a full disk above all): a failed write or fsync is undone
  (truncated back) and the data stays in memory, up to ``MAX_PENDING_BYTES``;
  later records are counted in ``dropped`` and become a ``gap``. ``failure``
  says what is wrong until a sync succeeds again. Deciding what agents may do
  meanwhile is the daemon's job.
- **Retention** deletes the oldest sealed segments by age or total size; each
  deletion is first recorded (``archive`` record ``retention``, durable before
  the file goes), so verify can tell it from tampering.
"""
from __future__ import annotations

import collections
import errno
import fcntl
import logging
import os
import queue
import socket
import threading
import time
from pathlib import Path
from typing import Any

import msgpack

from agentwarden.settings import ArchiveSettings

from agentwarden.archive.segments import (fsync_dir, COMPRESSED_SUFFIXES, GENESIS, HEAD_FILE, LOCK_FILE, SEGMENT_NAME, ArchiveError,
                       Header, NewerFormat, SegmentFile, SegmentReader, TornHeader, chain_hash, compressor,
                       decompressed_pieces, encode_head, encode_header, key_id, list_segments,
                       load_segment, read_head, read_header, read_records, segment_name)

__all__ = ["ArchiveWriter", "ArchiveError", "read_records", "boot_id"]

log = logging.getLogger("agentwarden.daemon")

MAX_PENDING_BYTES = 64 << 20   # held in memory while the archive cannot be written
RETRY_INTERVAL = 1.0           # s between attempts while writing fails
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Written but not yet fsynced, kept to write again if the fsync fails: past
# this much, sync is due at once rather than after sync_interval (a flood
# would otherwise hold sync_interval's worth of records in memory).
MAX_UNSYNCED_BYTES = 4 << 20
COMPRESS_PIECE = 1 << 20       # bytes of a sealed segment compressed (and checked) at a time
SYNC_POLL = 0.005              # s between the loop's looks at an fsync in flight


class _SyncJob:
    """One background fsync: what it covers, and its outcome once done."""

    def __init__(self, fd: int, size: int, seq: int, chain: bytes, count: int, nbytes: int, segment: str):
        self.fd, self.size, self.seq, self.chain = fd, size, seq, chain
        self.count, self.nbytes, self.segment = count, nbytes, segment   # unsynced entries and bytes covered
        self.started = time.monotonic()
        self.seconds = 0.0
        self.error: OSError | None = None
        self.done = threading.Event()


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def _write_all(fd: int, data: bytes) -> int:
    """Write all of data (regular files may write less than asked); returns
    how much was written before an error, which is re-raised with ``done`` set."""
    view, done = memoryview(data), 0
    while done < len(view):
        try:
            done += os.write(fd, view[done:])
        except OSError as exc:
            exc.done = done
            raise
    return done


def _decompresses_to(copy: Path, original: Any, compression: str) -> bool:
    """Whether the compressed file copy holds exactly what file original holds."""
    with open(copy, "rb") as f:
        for piece in decompressed_pieces(f, compression, COMPRESS_PIECE):
            if original.read(len(piece)) != piece:
                return False
    return original.read(1) == b""


def _archive_record(event: str, detail: str, **fields: Any) -> dict:
    return {"kind": "archive", "time": time.time_ns(), "event": event, "detail": detail, **fields}


class ArchiveWriter:
    def __init__(self, directory: Path, config: ArchiveSettings | None = None, key: bytes = b"",
                 host: str | None = None, boot: str | None = None):
        self.directory = directory
        self.config = config or ArchiveSettings()
        self.key = key
        self.host = host or socket.gethostname()
        self.boot_id = boot or boot_id()
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
            self._lock_fd = self._lock()
        except OSError as exc:
            raise ArchiveError(f"cannot use the archive directory {directory}: {exc.strerror}") from None
        self.seq = 0                    # the next seq to give
        self.chain = GENESIS            # chain hash of seq - 1
        self.pending: list[bytes] = []  # envelopes not yet written
        self.pending_bytes = 0
        self.unsynced: list[bytes] = []  # written since the last fsync (rewritten if it fails)
        self.unsynced_bytes = 0
        self.written_seq, self.written_chain = -1, GENESIS
        self.durable_seq, self.durable_chain = -1, GENESIS
        self.fd: int | None = None
        self.segment_path: Path | None = None
        self.segment_created = 0
        self.header_size = 0
        self.size = self.synced_size = 0
        self.segments_opened = 0
        self.failure: str | None = None
        self.failure_errno: int | None = None
        self.dropped = 0
        self.unsynced_since: float | None = None
        self.retry_at = 0.0
        self.counters: collections.Counter = collections.Counter()
        # wire.pack's encoding, one packer kept (append runs in the daemon's loop only)
        self._pack = msgpack.Packer(use_bin_type=True).pack
        self.bodies: dict[int, bytes] = {}   # seq -> packed record, kept on request until taken
        self._headers: dict[int, Header] = {}
        self._files_lock = threading.Lock()   # compression vs retention
        self._compress_queue: queue.Queue = queue.Queue()
        self._compressor = threading.Thread(target=self._compress_worker, name="archive-compress",
                                            daemon=True)
        self._sync_job: _SyncJob | None = None   # the fsync in flight on the archive-sync thread
        self._sync_queue: queue.Queue = queue.Queue()
        self._syncer = threading.Thread(target=self._sync_worker, name="archive-sync", daemon=True)
        self.recovered: list[dict] = []       # what recovery found, appended as archive records
        try:
            self._recover()
        except OSError as exc:
            raise ArchiveError(f"cannot recover the archive in {directory}: "
                               f"{exc.strerror or exc} ({getattr(exc, 'filename', '')})") from None
        self._compressor.start()
        self._syncer.start()
        for record in self.recovered:
            self.append(record)
        self.sync()

    # -- start-up ------------------------------------------------------------------

    def _lock(self) -> int:
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ArchiveError(f"another agentwarden daemon is writing the archive {self.directory}") from None
        return fd

    def _clean_leftovers(self) -> None:
        """Temporary files and half-finished compressions of a crashed run."""
        names = set(os.listdir(self.directory))
        for name in names:
            match = SEGMENT_NAME.match(name)
            if name.endswith(".tmp"):
                os.unlink(self.directory / name)
            elif match and match.group(2) and name[:-len(match.group(2))] in names:
                os.unlink(self.directory / name)  # the plain copy is complete; compress again

    def _recover(self) -> None:
        self._clean_leftovers()
        try:
            head = read_head(self.directory)
        except ArchiveError as exc:
            head = None
            self.recovered.append(_archive_record("head-damaged", str(exc)))
        segments = list_segments(self.directory)
        last_seq, last_chain = -1, GENESIS
        while segments:
            last = segments[-1]
            try:
                reader = SegmentReader(load_segment(last))
            except NewerFormat as exc:
                raise ArchiveError(f"{last.path.name} {exc}: written by another agentwarden version; "
                                   "refusing to write to this archive") from None
            except TornHeader as exc:
                size = last.path.stat().st_size
                last.path.unlink()
                self.recovered.append(_archive_record(
                    "torn-header-removed", f"removed {last.path.name}: it {exc} (a crash while rotating)",
                    segment=last.path.name, bytes_cut=size))
                segments.pop()
                continue
            except ArchiveError as exc:
                aside = last.path.with_name(f"{last.path.name}.damaged-{time.time_ns()}")
                os.rename(last.path, aside)
                self.recovered.append(_archive_record(
                    "damaged-segment", f"set {last.path.name} aside as {aside.name}: it {exc}",
                    segment=last.path.name))
                segments.pop()
                continue
            last_seq, last_chain = reader.header.first_seq - 1, reader.header.prev_hash
            for entry in reader.entries():
                last_seq, last_chain = entry.seq, entry.chain
            tail = reader.tail
            appendable = last.compression is None
            if tail and tail.torn and appendable:
                with open(last.path, "r+b") as f:
                    f.truncate(tail.offset)
                    os.fsync(f.fileno())
                self.recovered.append(_archive_record(
                    "torn-tail-cut", f"cut {tail.detail} at byte {tail.offset} of {last.path.name} "
                    f"(a crash mid-write); the archive continues after seq {last_seq}",
                    segment=last.path.name, offset=tail.offset, bytes_cut=tail.length, last_seq=last_seq))
            elif tail:
                appendable = False
                self.recovered.append(_archive_record(
                    "damaged-tail", f"{last.path.name} has {tail.detail} at byte {tail.offset} "
                    f"({tail.length} bytes); left in place, writing continues in a new segment",
                    segment=last.path.name, offset=tail.offset, bytes=tail.length, last_seq=last_seq))
            if appendable:
                self._reopen(last.path, reader)
            break
        if head is not None and head.seq > last_seq:
            self.recovered.append(_archive_record(
                "lost-durable", f"the head file said seq {head.seq} was durable, but the archive ends "
                f"at seq {last_seq}: records {last_seq + 1}..{head.seq} are gone",
                head_seq=head.seq, last_seq=last_seq))
        self.seq, self.chain = last_seq + 1, last_chain
        self.written_seq, self.written_chain = last_seq, last_chain
        self.durable_seq, self.durable_chain = last_seq, last_chain
        for segment in list_segments(self.directory):
            if segment.compression is None and segment.path != self.segment_path \
                    and self.config.compress != "none":
                self._compress_queue.put(segment.path)
        for record in self.recovered:
            log.error("archive: %s", record["detail"])

    def _reopen(self, path: Path, reader: SegmentReader) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self.segment_path = path
        self.segment_created = reader.header.created
        self.header_size = reader.header_end
        self.size = self.synced_size = os.fstat(self.fd).st_size

    # -- appending -----------------------------------------------------------------

    def append(self, record: dict[str, Any], keep_body: bool = False) -> int | None:
        """Give the record its seq and chain it; None when it had to be dropped
        (the archive cannot be written and memory is full: counted in ``dropped``).
        keep_body: keep its packed form (without seq) for take_bodies."""
        if self.failure and self.pending_bytes > MAX_PENDING_BYTES:
            self.dropped += 1
            return None
        record.pop("seq", None)
        body = self._pack(record)
        seq = self.seq
        self.chain = chain_hash(self.key, self.chain, seq, body)
        envelope = self._pack([seq, body, self.chain])
        self.pending.append(envelope)
        self.pending_bytes += len(envelope)
        self.seq += 1
        record["seq"] = seq
        if keep_body:
            self.bodies[seq] = body
        if self.unsynced_since is None:
            self.unsynced_since = time.monotonic()
        return seq

    def take_bodies(self) -> dict[int, bytes]:
        bodies, self.bodies = self.bodies, {}
        return bodies

    def take_dropped(self) -> int:
        dropped, self.dropped = self.dropped, 0
        return dropped

    # -- writing -------------------------------------------------------------------

    def _fail(self, exc: OSError, doing: str) -> None:
        first = self.failure is None
        self.failure = f"{doing}: {exc.strerror or exc}"
        self.failure_errno = exc.errno
        self.retry_at = time.monotonic() + RETRY_INTERVAL
        self.counters["write_failures"] += 1
        if first:
            log.error("archive: %s", self.failure)

    @property
    def disk_full(self) -> bool:
        return self.failure is not None and self.failure_errno in DISK_FULL_ERRNOS

    def _write(self, data: bytes) -> None:
        try:
            _write_all(self.fd, data)
        except OSError as exc:
            if getattr(exc, "done", 0):  # never leave half a record behind
                try:
                    os.ftruncate(self.fd, self.size)
                except OSError:
                    pass
            raise
        self.size += len(data)
        self.counters["bytes_written"] += len(data)

    def _open_segment(self) -> None:
        first = self.written_seq + 1
        path = self.directory / segment_name(first)
        now = time.time_ns()
        header = encode_header(self.key, first, self.written_chain, self.host, self.boot_id, now)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, header)
            os.fsync(fd)
            fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        self.fd, self.segment_path, self.segment_created = fd, path, now
        self.header_size = self.size = self.synced_size = len(header)
        self.segments_opened += 1

    def _seal(self) -> None:
        """Make the active segment durable and close it; the next flush opens another."""
        self._wait_for_sync()
        self._fsync()
        os.close(self.fd)
        self.fd = None
        if self.config.compress != "none":
            self._compress_queue.put(self.segment_path)

    def flush(self) -> bool:
        """Write pending records to the OS (not yet durable). False while writing fails."""
        if not self.pending:
            return self.failure is None
        try:
            if self.fd is not None and self.size > self.header_size and \
                    self.size + self.pending_bytes > self.config.segment_bytes:
                self._seal()
            if self.fd is None:
                self._open_segment()
            data = b"".join(self.pending)
            self._write(data)
        except OSError as exc:
            self._fail(exc, f"cannot write the archive in {self.directory}")
            return False
        self.unsynced.append(data)
        self.unsynced_bytes += len(data)
        self.pending, self.pending_bytes = [], 0
        self.written_seq, self.written_chain = self.seq - 1, self.chain
        return True

    def _fsync(self) -> None:
        if self.fd is None or self.size == self.synced_size:
            return
        try:
            os.fsync(self.fd)
        except OSError:
            self._undo_unsynced()
            raise
        self._made_durable(self.size, len(self.unsynced), self.unsynced_bytes, self.written_seq, self.written_chain)

    def _made_durable(self, size: int, count: int, nbytes: int, seq: int, chain: bytes) -> None:
        """An fsync covered the segment up to size: the first count unsynced
        writes (nbytes) and the records up to seq are durable now."""
        self.counters["fsyncs"] += 1
        self.synced_size = size
        del self.unsynced[:count]
        self.unsynced_bytes -= nbytes
        self.durable_seq, self.durable_chain = seq, chain

    def _undo_unsynced(self) -> None:
        """After a failed fsync the kernel may have dropped the pages: cut back
        to what is known durable and write it again from memory later."""
        try:
            os.ftruncate(self.fd, self.synced_size)
        except OSError:
            pass
        self.size = self.synced_size
        self.pending = self.unsynced + self.pending
        self.pending_bytes = sum(len(p) for p in self.pending)
        self.unsynced, self.unsynced_bytes = [], 0
        self.written_seq, self.written_chain = self.durable_seq, self.durable_chain

    # -- fsync off the loop ------------------------------------------------------------

    def _sync_worker(self) -> None:
        while True:
            job = self._sync_queue.get()
            if job is None:
                return
            try:
                os.fsync(job.fd)
            except OSError as exc:
                job.error = exc
            finally:
                os.close(job.fd)
            job.seconds = time.monotonic() - job.started
            if job.error is None:
                self._write_head(job.seq, job.chain, job.segment)
            job.done.set()

    def sync_soon(self) -> bool:
        """The daemon loop's sync: write what is pending and start its fsync on
        the archive-sync thread, or take the outcome of the one in flight.
        Returns False while the archive is failing."""
        if self._sync_job is not None:
            if not self._sync_to_take():
                return self.failure is None
            try:
                self._wait_for_sync()
            except OSError as exc:
                self._fail(exc, f"cannot fsync the archive in {self.directory}")
                return False
            return True
        if self.failure:
            return self.sync()   # retried the plain way, RETRY_INTERVAL apart
        if self.pending and not self.flush():
            return False
        if self.fd is None or self.size == self.synced_size:
            return self.sync()   # nothing to fsync (at most a head to write)
        try:
            fd = os.dup(self.fd)
        except OSError as exc:
            self._fail(exc, f"cannot fsync the archive in {self.directory}")
            return False
        self._sync_job = _SyncJob(fd, self.size, self.written_seq, self.written_chain, len(self.unsynced),
                                  self.unsynced_bytes, self.segment_path.name if self.segment_path else "")
        self.unsynced_since = None   # every record written is covered; the next append starts the clock
        self._sync_queue.put(self._sync_job)
        return True

    def _sync_to_take(self) -> bool:
        """Whether the loop takes the fsync in flight now: it ended, or so much
        waits behind it that memory must not grow further (the loop then waits)."""
        return self._sync_job.done.is_set() or self.unsynced_bytes >= 2 * MAX_UNSYNCED_BYTES

    def _wait_for_sync(self) -> None:
        """Wait for the fsync in flight, if any, and take its outcome: what it
        covered is durable, or (raised) undone to be written again."""
        job, self._sync_job = self._sync_job, None
        if job is None:
            return
        job.done.wait()
        self.counters["background_fsyncs"] += 1
        self.counters["fsync_longest_ms"] = max(self.counters["fsync_longest_ms"], round(job.seconds * 1000))
        if job.error is not None:
            self._undo_unsynced()
            raise job.error
        self._made_durable(job.size, job.count, job.nbytes, job.seq, job.chain)

    def sync(self) -> bool:
        """Flush and fsync; then the head file names the new durable seq."""
        try:
            self._wait_for_sync()
        except OSError as exc:
            self._fail(exc, f"cannot fsync the archive in {self.directory}")
            return False
        before = self.durable_seq
        # Nothing pending, yet failing: a write already went through since
        # (say, after a full disk was freed); the fsync below settles it.
        if self.pending and not self.flush():
            return False
        try:
            self._fsync()
        except OSError as exc:
            self._fail(exc, f"cannot fsync the archive in {self.directory}")
            return False
        if self.failure:
            log.warning("archive: writing works again")
        self.failure = self.failure_errno = None
        self.unsynced_since = None
        if self.durable_seq != before or not (self.directory / HEAD_FILE).exists():
            self._write_head()
        return True

    def sync_due(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if self._sync_job is not None:
            return self._sync_to_take()
        if self.failure:
            return now >= self.retry_at
        return self.unsynced_since is not None and (now - self.unsynced_since >= self.config.sync_interval
                                                    or self.unsynced_bytes >= MAX_UNSYNCED_BYTES)

    def seconds_to_sync(self) -> float | None:
        """How long the daemon may sleep before sync is due (None: nothing to sync)."""
        if self._sync_job is not None:
            return 0.0 if self.sync_due() else SYNC_POLL
        if self.failure:
            return max(0.0, self.retry_at - time.monotonic())
        if self.unsynced_since is None:
            return None
        if self.unsynced_bytes >= MAX_UNSYNCED_BYTES:
            return 0.0
        return max(0.0, self.unsynced_since + self.config.sync_interval - time.monotonic())

    def _write_head(self, seq: int | None = None, chain: bytes | None = None, segment: str | None = None) -> None:
        """The head file names seq (default: durable_seq) and its chain; the
        archive-sync thread writes it for the fsync it made."""
        if seq is None:
            seq, chain = self.durable_seq, self.durable_chain
            segment = self.segment_path.name if self.segment_path else ""
        tmp = self.directory / (HEAD_FILE + ".tmp")
        data = encode_head(self.key, seq, chain, segment, time.time_ns())
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.directory / HEAD_FILE)
            fsync_dir(self.directory)
        except OSError as exc:
            # The head only guards against cutting records off the end; a stale
            # head is never wrong, merely less strict. Counted, retried next sync.
            self.counters["head_write_failures"] += 1
            log.warning("archive: cannot write the head file: %s", exc.strerror)
            try:
                tmp.unlink()
            except OSError:
                pass

    # -- rotation, compression, retention -----------------------------------------

    def rotate_if_old(self, now_ns: int | None = None) -> None:
        now_ns = time.time_ns() if now_ns is None else now_ns
        if self.fd is None or self.failure or self.size <= self.header_size:
            return
        if now_ns - self.segment_created >= self.config.segment_age * 1e9:
            try:
                self._seal()
            except OSError as exc:
                self._fail(exc, f"cannot seal the archive segment {self.segment_path}")

    def _compress_worker(self) -> None:
        # Compressing a sealed segment is the daemon's heaviest work (seconds
        # of CPU for a full one) and nothing waits for it: it takes a CPU only
        # when nothing else wants one, so the agents and the daemon's own
        # decisions never wait behind it. A segment waiting its turn stays on
        # disk as it was written.
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))   # 0: this thread
        except (AttributeError, OSError) as exc:
            log.warning("archive: compressing at normal priority (cannot lower it: %s)", exc)
        while True:
            path = self._compress_queue.get()
            if path is None:
                return
            try:
                self._compress(path)
            except Exception as exc:  # never let the thread die; the next start retries
                self.counters["compress_failures"] += 1
                log.warning("archive: cannot compress %s: %s", path.name, exc)

    def _compress(self, path: Path) -> None:
        """Compress a sealed segment piece by piece (a whole one in memory, with
        its compressed copy and the check's, was the daemon's largest peak),
        then check that the copy decompresses to the very bytes, again piece
        by piece, before it replaces the segment."""
        compression = self.config.compress
        suffix = next(s for s, c in COMPRESSED_SUFFIXES.items() if c == compression)
        try:
            source = open(path, "rb")
        except FileNotFoundError:
            return
        final = path.with_name(path.name + suffix)
        tmp = final.with_name(final.name + ".tmp")
        with source:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                try:
                    packer = compressor(compression)
                    while piece := source.read(COMPRESS_PIECE):
                        _write_all(fd, packer.compress(piece))
                    _write_all(fd, packer.flush())
                    os.fsync(fd)
                finally:
                    os.close(fd)
                source.seek(0)
                if not _decompresses_to(tmp, source, compression):
                    raise ArchiveError("the compressed copy does not decompress to the original")
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        with self._files_lock:
            if not path.exists():  # retention took it meanwhile
                tmp.unlink()
                return
            os.rename(tmp, final)
            fsync_dir(self.directory)
            path.unlink()
            fsync_dir(self.directory)
        self.counters["segments_compressed"] += 1

    def _header(self, segment: SegmentFile) -> Header:
        if segment.first_seq not in self._headers:
            self._headers[segment.first_seq] = read_header(segment)
        return self._headers[segment.first_seq]

    def apply_retention(self, now_ns: int | None = None) -> list[dict]:
        """Delete the oldest sealed segments beyond the age or size limits; each
        deletion is archived (and fsynced) first. Returns those records."""
        cfg = self.config
        if not (cfg.retain_age or cfg.retain_bytes) or self.failure:
            return []
        now_ns = time.time_ns() if now_ns is None else now_ns
        done: list[dict] = []
        with self._files_lock:
            segments = list_segments(self.directory)
            sizes = {s.first_seq: s.path.stat().st_size for s in segments}
            total = sum(sizes.values())
            for older, newer in zip(segments, segments[1:]):
                if older.base == self.segment_path:
                    break
                header, next_header = self._header(older), self._header(newer)
                too_old = cfg.retain_age and next_header.created < now_ns - cfg.retain_age * 1e9
                too_big = cfg.retain_bytes and total > cfg.retain_bytes
                if not (too_old or too_big):
                    break
                reason = "age" if too_old else "size"
                record = _archive_record(
                    "retention", f"deleted {older.path.name} (seq {header.first_seq}.."
                    f"{next_header.first_seq - 1}) by retention ({reason})",
                    segment=older.path.name, first_seq=header.first_seq,
                    last_seq=next_header.first_seq - 1, last_hash=next_header.prev_hash.hex(),
                    created=header.created, sealed=next_header.created,
                    bytes=sizes[older.first_seq], reason=reason)
                self.append(record)
                if not self.sync():
                    break  # not recorded durably: the segment stays
                older.path.unlink()
                fsync_dir(self.directory)
                self._headers.pop(older.first_seq, None)
                total -= sizes[older.first_seq]
                done.append(record)
                self.counters["segments_deleted"] += 1
                log.info("archive: %s", record["detail"])
        return done

    # -- state ---------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "state": "ok" if self.failure is None else ("disk-full" if self.disk_full else "failing"),
            "error": self.failure,
            "next_seq": self.seq,
            "written_seq": self.written_seq,
            "durable_seq": self.durable_seq,
            "durable_chain": self.durable_chain.hex(),
            "segment": self.segment_path.name if self.segment_path else None,
            "pending_records": len(self.pending),
            "sync_in_flight": self._sync_job is not None,
            "dropped": self.dropped,
            "keyed": bool(self.key),
            "key_id": key_id(self.key),
            "sync_interval": self.config.sync_interval,
            "counters": dict(self.counters),
        }

    def close(self) -> None:
        if not self.sync():
            log.error("archive: %d records could not be written before exit (%s)",
                      len(self.pending) + self.dropped, self.failure)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self._sync_queue.put(None)
        self._syncer.join(timeout=1)
        self._compress_queue.put(None)
        self._compressor.join(timeout=1)  # a compression still running resumes at the next start
        os.close(self._lock_fd)


