"""`agentwarden fleet archive`: the collector. Consumes the fleet's record
stream (a durable JetStream consumer) and writes each host's records into
``fleet_archive_dir/HOST/``, an archive in the format of segments.py that
`agentwarden log verify --archive DIR` checks like the host's own.

It writes what the host wrote: the host's segment headers, each record's
envelope (seq, body, chain hash) and the host's head file, byte for byte, so
the host's hash chain continues unbroken here, keyed or not (verifying a keyed
copy needs the host's key). Records are written in seq order, once each:

- a seq already written is a duplicate (a re-publish after an outage): acknowledged, counted;
- a seq ahead of the next one expected waits (unacknowledged) for the missing
  ones, which may still come (a re-publish); after ``gap_wait`` seconds it is
  written anyway, and `log verify` names the missing records.

A message is acknowledged only after its record is fsynced: a collector
killed at any point gets the rest again.
"""
from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from agentwarden import fleet
from agentwarden.archive.segments import (fsync_dir, HEAD_FILE, LOCK_FILE, ArchiveError, SegmentReader,
                                          TornHeader, decode_header, list_segments, load_segment,
                                          segment_name)
from agentwarden.wire import pack

log = logging.getLogger("agentwarden.fleet")

FETCH = 1000          # messages per fetch
ACK_WAIT = 5.0        # s before JetStream redelivers an unacknowledged message
# s a record waits for missing ones before they are taken as lost. Longer than ACK_WAIT, twice:
# a message delivered while the collector was away (a fetch that timed out, a reconnection) is
# in the stream and comes again only by redelivery; a re-publish of it is a duplicate to JetStream.
GAP_WAIT = 3 * ACK_WAIT


class HostArchive:
    """One host's central archive."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ArchiveError(f"another collector writes {directory}") from None
        self.fd: int | None = None
        self.segment_first = -1
        self.next_seq: int | None = None   # None: nothing written yet
        self.dirty = False
        self._recover()

    def _recover(self) -> None:
        """Where the last run stopped: cut an incomplete record at the end (a
        crash mid-write; its message was not acknowledged, so it comes again)."""
        for segment in reversed(list_segments(self.directory)):
            try:
                reader = SegmentReader(load_segment(segment))
            except TornHeader:
                segment.path.unlink()
                continue
            last = reader.header.first_seq - 1
            for entry in reader.entries():
                last = entry.seq
            if reader.tail:
                with open(segment.path, "r+b") as f:
                    f.truncate(reader.tail.offset)
                    os.fsync(f.fileno())
            self.next_seq = last + 1
            if segment.compression is None:
                self.fd = os.open(segment.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                self.segment_first = reader.header.first_seq
            return

    def write(self, shipped: fleet.Shipped) -> None:
        header = decode_header(msgpack.unpackb(shipped.segment_header, raw=False))
        if header.first_seq != self.segment_first:
            self._open(header.first_seq, shipped.segment_header)
        data = pack([shipped.seq, shipped.body, shipped.chain])
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self.next_seq = shipped.seq + 1
        self.dirty = True

    def _open(self, first_seq: int, header: bytes) -> None:
        if self.fd is not None:
            os.fsync(self.fd)
            os.close(self.fd)
        path = self.directory / segment_name(first_seq)
        exists = path.exists()
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        if not exists or os.fstat(self.fd).st_size == 0:
            os.write(self.fd, header)
            os.fsync(self.fd)
            fsync_dir(self.directory)
        self.segment_first = first_seq

    def sync(self, head: bytes | None) -> None:
        if self.fd is not None and self.dirty:
            os.fsync(self.fd)
            self.dirty = False
        if head is not None:
            tmp = self.directory / (HEAD_FILE + ".tmp")
            with open(tmp, "wb") as f:
                f.write(head)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.directory / HEAD_FILE)
            fsync_dir(self.directory)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        os.close(self._lock_fd)


@dataclass
class _Waiting:
    shipped: fleet.Shipped
    messages: list = field(default_factory=list)
    since: float = field(default_factory=time.monotonic)


class Collector:
    def __init__(self, root: Path, gap_wait: float = GAP_WAIT):
        self.root = root
        self.gap_wait = gap_wait
        self.hosts: dict[str, HostArchive] = {}
        self.waiting: dict[str, dict[int, _Waiting]] = {}
        self.counters: dict[str, int] = {"written": 0, "duplicates": 0, "malformed": 0, "gaps": 0,
                                         "missing": 0}

    def _host(self, name: str) -> HostArchive:
        if name not in self.hosts:
            if not name or "/" in name or name in (".", ".."):
                raise fleet.FleetError(f"host name {name!r} cannot name a directory")
            self.hosts[name] = HostArchive(self.root / name)
        return self.hosts[name]

    def take(self, messages: list) -> list:
        """Write what can be written; returns the messages to acknowledge now."""
        ack: list = []
        heads: dict[str, bytes] = {}
        for msg in messages:
            try:
                shipped = fleet.decode_shipped(msg.data)
                # NATS lets a host publish only below its own name: the record's claim must match.
                subject_host = msg.subject.split(".")[2] if msg.subject.count(".") >= 2 else None
                if subject_host != fleet.token(shipped.host):
                    raise fleet.FleetError(f"claims host {shipped.host!r} on another host's subject")
                archive = self._host(shipped.host)
            except fleet.FleetError as exc:
                self.counters["malformed"] += 1
                log.error("fleet archive: dropped a message on %s: %s", msg.subject, exc)
                ack.append(msg)
                continue
            expected = archive.next_seq if archive.next_seq is not None else 0
            if shipped.seq < expected:
                self.counters["duplicates"] += 1
                ack.append(msg)
                continue
            waiting = self.waiting.setdefault(shipped.host, {})
            if shipped.seq in waiting:
                self.counters["duplicates"] += 1   # acknowledged with the one written
            waiting.setdefault(shipped.seq, _Waiting(shipped)).messages.append(msg)
        for host, waiting in self.waiting.items():
            archive = self.hosts[host]
            while waiting:
                expected = archive.next_seq if archive.next_seq is not None else 0
                lowest = min(waiting)
                if lowest != expected:
                    if lowest < expected:       # a duplicate that waited
                        self.counters["duplicates"] += 1
                        ack.extend(waiting.pop(lowest).messages)
                        continue
                    if time.monotonic() - waiting[lowest].since < self.gap_wait:
                        break
                    self.counters["gaps"] += 1
                    self.counters["missing"] += lowest - expected
                    log.error("fleet archive: %s: records %d..%d never came; writing on from %d",
                              host, expected, lowest - 1, lowest)
                item = waiting.pop(lowest)
                archive.write(item.shipped)
                self.counters["written"] += 1
                ack.extend(item.messages)
                if item.shipped.head is not None:
                    heads[host] = item.shipped.head
        for host, archive in self.hosts.items():
            if archive.dirty or host in heads:
                archive.sync(heads.get(host))
        return ack

    def state(self) -> dict[str, Any]:
        return {"counters": dict(self.counters),
                "hosts": {h: a.next_seq for h, a in self.hosts.items()},
                "waiting": {h: len(w) for h, w in self.waiting.items() if w}}

    def close(self) -> None:
        for archive in self.hosts.values():
            archive.close()


async def ensure_fleet(js, replicas: int) -> None:
    """The stream and buckets, made when missing (the collector's and admins' accounts may)."""
    from nats.js import api
    try:
        await js.stream_info(fleet.STREAM)
    except Exception:
        await js.add_stream(api.StreamConfig(
            name=fleet.STREAM, subjects=[f"{fleet.RECORD_PREFIX}.>"], num_replicas=replicas,
            storage=api.StorageType.FILE, duplicate_window=fleet.DUPLICATE_WINDOW))
    for bucket in (fleet.HOLDS_BUCKET, fleet.HOSTS_BUCKET):
        try:
            await js.key_value(bucket)
        except Exception:
            await js.create_key_value(bucket=bucket, history=1, replicas=replicas)


async def run_collector(url: str, credentials: fleet.Credentials, root: Path, replicas: int,
                        stop: asyncio.Event, gap_wait: float = GAP_WAIT,
                        ready: asyncio.Event | None = None) -> Collector:
    nats = fleet.nats_module()
    from nats.js import api
    collector = Collector(root, gap_wait)
    said = {"error": None}

    async def on_error(exc):
        # nats-py calls this at every try (its default logs a traceback each
        # time): one line per cause, until it connects again.
        text = f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
        if text != said["error"]:
            said["error"] = text
            log.error("fleet archive: cannot reach %s (%s); retrying: check fleet_url (or --url) and "
                      "that the NATS server runs", url, text)

    async def on_connected():
        if said["error"] is not None:
            said["error"] = None
            log.info("fleet archive: connected to %s", url)

    nc = await nats.connect(fleet.servers(url), **fleet.connect_options(credentials),
                            name="agentwarden fleet archive", allow_reconnect=True,
                            max_reconnect_attempts=-1, reconnect_time_wait=0.5, connect_timeout=2,
                            error_cb=on_error, reconnected_cb=on_connected)
    await on_connected()
    js = nc.jetstream()
    while True:
        try:
            await ensure_fleet(js, replicas)
            sub = await js.pull_subscribe(
                f"{fleet.RECORD_PREFIX}.>", durable=fleet.COLLECTOR_DURABLE, stream=fleet.STREAM,
                config=api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT, ack_wait=ACK_WAIT,
                                          max_ack_pending=100_000,
                                          deliver_policy=api.DeliverPolicy.ALL))
            break
        except Exception as exc:
            log.error("fleet archive: cannot set up the consumer (%s); retrying", exc)
            await asyncio.sleep(1)
    if ready is not None:
        ready.set()
    try:
        while not stop.is_set():
            try:
                messages = await sub.fetch(FETCH, timeout=0.5)
            except Exception:   # a timeout with nothing to fetch, or NATS away: the waiting may be due
                messages = []
            for msg in await asyncio.to_thread(collector.take, messages):
                try:
                    await msg.ack()
                except Exception:   # redelivered later; written once all the same
                    pass
    finally:
        collector.close()
        try:
            await asyncio.wait_for(nc.close(), 2)
        except Exception:
            pass
    return collector
