"""The daemon's side of the fleet: ships every archived record to NATS
JetStream, keeps this host's pending holds in a KV bucket, and forwards signed
decisions to the supervisor. All of it runs in one thread with its own asyncio
loop; the daemon's loop only hands it hold records (a bounded queue, never
waiting) and reads its counters, so enforcement never waits on NATS.

The archive is the outbox: the shipper reads durable records (up to the head
file) from the segment files, publishes each with the message id host:seq
(JetStream drops a repeat), and keeps the last acknowledged seq in
``state_dir/fleet-acked.json``. After any outage -- NATS down, the daemon
killed -- it resumes after that seq; what it sends twice, JetStream and the
collector drop.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import msgpack

from agentwarden import fleet, session
from agentwarden.archive.segments import (FORMAT, HEAD_FILE, MAGIC, ArchiveError, list_segments,
                                          load_segment, read_head)
from agentwarden.errors import AgentwardenError
from agentwarden.settings import Settings
from agentwarden.wire import pack

log = logging.getLogger("agentwarden.daemon")

BATCH = 512                # records in flight at once
ACK_TIMEOUT = 5.0          # s to wait for JetStream's acknowledgements of a batch
IDLE_POLL = 0.05           # s between looks at the head file when all is shipped
RETRY_MAX = 2.0            # s: the longest wait between attempts while NATS fails
HOST_STATE_INTERVAL = 1.0  # s between updates of this host's entry in aw-hosts
HOLDS_QUEUE = 10_000
HOLD_KEYS_FILE = "fleet-holds.json"   # in state_dir: this host's keys in aw-holds, to delete after a restart
TERMINAL_HOLD_STATES = ("approved", "denied", "timed-out", "abandoned")


class OutboxReader:
    """Reads the archive's durable records in seq order, from any seq on,
    following rotation and compression; what retention deleted before it was
    shipped is skipped and counted."""

    def __init__(self, directory: Path, next_seq: int):
        self.directory = directory
        self.next_seq = next_seq
        self.skipped = 0
        self._file = None
        self._unpacker: msgpack.Unpacker | None = None
        self._segment_first = -1
        self._header = b""
        self._peeked: list | None = None

    def seek(self, seq: int) -> None:
        self.next_seq = seq
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self._unpacker, self._segment_first, self._peeked = None, None, -1, None

    def _open(self) -> bool:
        """Open the segment that holds next_seq; False when there is none yet."""
        self._close()
        segments = list_segments(self.directory)
        holding = [s for s in segments if s.first_seq <= self.next_seq]
        if not holding:
            if not segments:
                return False
            self.skipped += segments[0].first_seq - self.next_seq
            log.error("fleet: records %d..%d were deleted by retention before they were shipped",
                      self.next_seq, segments[0].first_seq - 1)
            self.next_seq = segments[0].first_seq
            holding = segments[:1]
        segment = holding[-1]
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=256 << 20)
        if segment.compression:
            self._unpacker.feed(load_segment(segment))
        else:
            try:
                self._file = open(segment.path, "rb")
            except FileNotFoundError:       # compressed meanwhile: read that
                self._unpacker.feed(load_segment(segment))
        self._segment_first = segment.first_seq
        header = self._next_object()
        if header is None:
            self._close()
            return False
        self._header = pack(header)
        return True

    def _next_object(self):
        while True:
            try:
                return self._unpacker.unpack()
            except msgpack.OutOfData:
                chunk = self._file.read(1 << 20) if self._file is not None else b""
                if not chunk:
                    return None
                self._unpacker.feed(chunk)

    def _later_segment_starts_here(self) -> bool:
        return any(s.first_seq == self.next_seq and s.first_seq > self._segment_first
                   for s in list_segments(self.directory))

    def read(self, limit: int) -> list[fleet.Shipped]:
        """Up to limit durable records from next_seq on (the last of them
        carrying the head file when it names that record)."""
        head = read_head(self.directory)
        if head is None or head.seq < self.next_seq:
            return []
        try:
            head_raw = (self.directory / HEAD_FILE).read_bytes()
        except FileNotFoundError:
            return []
        if head_raw != pack([MAGIC, FORMAT, head.body, head.mac]):   # rewritten meanwhile: next round
            return []
        out: list[fleet.Shipped] = []
        while len(out) < limit and self.next_seq <= head.seq:
            if self._unpacker is None and not self._open():
                break
            entry = self._peeked or self._next_object()
            self._peeked = None
            if entry is None:
                if self._later_segment_starts_here():
                    self._close()
                    continue
                break
            if not (isinstance(entry, list) and len(entry) == 3 and type(entry[0]) is int):
                raise ArchiveError(f"the archive has an object that is not a record at seq {self.next_seq}")
            seq, body, chain = entry
            if seq < self.next_seq:
                continue
            if seq > head.seq:
                self._peeked = entry
                break
            out.append(fleet.Shipped("", seq, body, chain, self._header,
                                     head_raw if seq == head.seq else None))
            self.next_seq = seq + 1
        return out


def load_acked(path: Path) -> int:
    try:
        return int(json.loads(path.read_text())["acked_seq"])
    except FileNotFoundError:
        return -1
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # Shipping again from the start is safe (duplicates are dropped), losing is not.
        log.error("fleet: %s is unreadable (%s); shipping again from the start", path, exc)
        return -1


def save_acked(path: Path, seq: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"acked_seq": seq, "time": time.time_ns()}))
    os.replace(tmp, path)


def load_hold_keys(path: Path) -> set[str]:
    try:
        keys = json.loads(path.read_text())["keys"]
        return {k for k in keys if isinstance(k, str)}
    except FileNotFoundError:
        return set()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.error("fleet: %s is unreadable (%s); pending holds of the last run may stay listed "
                  "in `fleet holds`", path, exc)
        return set()


def save_hold_keys(path: Path, keys: set[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"keys": sorted(keys)}))
    os.replace(tmp, path)


def hold_entry(host: str, record: dict) -> dict:
    """A pending hold as `fleet holds` shows it."""
    return {"host": host, "hold_id": record["hold_id"], "agent": record["agent"],
            "session": record["session"], "on_behalf_of": record["on_behalf_of"],
            "task": record["task"], "action": record["action"], "rule": record["rule"],
            "required": record["required"], "approvers": record["approvers"],
            "since": record["time"] if record["state"] == "pending" else record.get("since"),
            "state": record["state"]}


class _BucketWriter:
    """Puts and deletes of one KV bucket's keys as the JetStream publishes they are, so a host
    needs to publish only under its own keys: nats-py's js.key_value() first asks for the
    bucket's stream info, which would also let a host list every host's hold keys."""

    def __init__(self, js, bucket: str):
        self.js, self.prefix = js, f"$KV.{bucket}."

    async def put(self, key: str, value: bytes) -> None:
        await self.js.publish(self.prefix + key, value)

    async def delete(self, key: str) -> None:
        await self.js.publish(self.prefix + key, b"", headers={"KV-Operation": "DEL"})


class FleetShipper:
    def __init__(self, settings: Settings, archive_dir: Path):
        self.settings = settings
        self.host = settings.fleet_name
        self.archive_dir = archive_dir
        self.credentials = fleet.load_credentials(settings.fleet_credentials)
        self.nats = fleet.nats_module()
        self.state_file = settings.fleet_state_file
        self.acked_seq = load_acked(self.state_file)
        self.reader = OutboxReader(archive_dir, self.acked_seq + 1)
        self.holds: queue.Queue = queue.Queue(HOLDS_QUEUE)
        self.pending: dict[str, dict] = {}   # hold id -> entry, as last published
        # Written before a key is put: this host's account may not list the bucket (it would see
        # other hosts' holds), so a restarted daemon deletes the keys of its last run from here.
        self.hold_keys_file = self.state_file.with_name(HOLD_KEYS_FILE)
        self.hold_keys = load_hold_keys(self.hold_keys_file)
        # Every key is made here: the daemon's thread copies this dict while this one counts.
        self.counters: dict[str, int] = {"published": 0, "duplicates": 0, "publish_failures": 0,
                                         "holds_dropped": 0,
                                         "holds_published": 0, "decisions": 0, "decisions_refused": 0,
                                         "reconnects": 0}
        self.connected = False
        self.last_error: str | None = None
        self.last_ack_time = 0
        self.host_state: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._thread_main, name="fleet", daemon=True)

    # -- called from the daemon's loop (never waits) ------------------------------------

    def start(self) -> None:
        self._thread.start()

    def hold(self, record: dict) -> None:
        try:
            self.holds.put_nowait(dict(record))
        except queue.Full:
            self.counters["holds_dropped"] += 1

    def note(self, state: dict[str, Any]) -> None:
        """The daemon's figures for this host's entry in aw-hosts."""
        self.host_state = state

    def info(self, durable_seq: int) -> dict[str, Any]:
        return {"url": self.settings.fleet_url, "host": self.host, "connected": self.connected,
                "acked_seq": self.acked_seq, "lag": max(0, durable_seq - self.acked_seq),
                "last_ack": self.last_ack_time, "skipped": self.reader.skipped,
                "pending_holds": len(self.pending), "last_error": self.last_error,
                "counters": dict(self.counters)}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=3)

    # -- the thread -------------------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as exc:   # never take the daemon down; say why shipping stopped
            self.last_error = f"the fleet thread stopped: {exc.__class__.__name__}: {exc}"
            log.exception("fleet: thread stopped")

    async def _main(self) -> None:
        nc = await self._connect()
        if nc is None:
            return
        js = nc.jetstream()
        tasks = [asyncio.create_task(self._ship(js)), asyncio.create_task(self._publish_holds(js)),
                 asyncio.create_task(self._host_entry(js))]
        await nc.subscribe(fleet.decide_subject(self.host), cb=self._on_decision)
        while not self._stop.is_set():
            await asyncio.sleep(0.1)
            for task in tasks:
                if task.done() and task.exception():
                    raise task.exception()
        for task in tasks:
            task.cancel()
        try:
            await asyncio.wait_for(nc.close(), 2)
        except Exception:
            pass

    async def _connect(self):
        async def on_error(exc):
            self.last_error = f"{exc.__class__.__name__}: {exc}"

        async def on_disconnect():
            self.connected = False

        async def on_reconnect():
            self.connected = True
            self.counters["reconnects"] += 1

        delay = 0.2
        while not self._stop.is_set():
            try:
                nc = await self.nats.connect(
                    fleet.servers(self.settings.fleet_url), **fleet.connect_options(self.credentials),
                    name=f"agentwarden {self.host}",
                    allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                    connect_timeout=2, error_cb=on_error, disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect, ping_interval=5, max_outstanding_pings=2)
            except Exception as exc:   # nats-py raises several unrelated types
                self.last_error = f"cannot connect to {self.settings.fleet_url}: {exc}"
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX, delay * 2)
                continue
            self.connected = True
            self.last_error = None
            return nc
        return None

    async def _ship(self, js) -> None:
        delay = 0.1
        saved = self.acked_seq
        while not self._stop.is_set():
            try:
                batch = await asyncio.to_thread(self.reader.read, BATCH)
            except (ArchiveError, OSError) as exc:
                self.last_error = f"reading the archive: {exc}"
                self.reader.seek(self.acked_seq + 1)
                await asyncio.sleep(RETRY_MAX)
                continue
            if not batch:
                if saved != self.acked_seq:
                    await asyncio.to_thread(save_acked, self.state_file, self.acked_seq)
                    saved = self.acked_seq
                await asyncio.sleep(IDLE_POLL)
                continue
            try:
                futures = []
                for item in batch:
                    shipped = fleet.Shipped(self.host, item.seq, item.body, item.chain,
                                            item.segment_header, item.head)
                    record = fleet.decode_record(item.body)
                    subject = fleet.record_subject(self.host, record.get("agent"), record.get("kind", "-"))
                    futures.append(await js.publish_async(
                        subject, shipped.encode(),
                        headers={"Nats-Msg-Id": fleet.message_id(self.host, item.seq)}))
                acks = await asyncio.wait_for(asyncio.gather(*futures), ACK_TIMEOUT)
            except Exception as exc:   # timeouts, no responders, disconnects: all retried
                self.counters["publish_failures"] += 1
                self.last_error = f"publishing: {exc.__class__.__name__}: {exc}"
                self.reader.seek(self.acked_seq + 1)
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX, delay * 2)
                continue
            delay = 0.1
            self.counters["published"] += sum(1 for a in acks if not a.duplicate)
            self.counters["duplicates"] += sum(1 for a in acks if a.duplicate)
            self.acked_seq = batch[-1].seq
            self.last_ack_time = time.time_ns()
            self.last_error = None
            await asyncio.to_thread(save_acked, self.state_file, self.acked_seq)
            saved = self.acked_seq

    def _holds_bucket(self, js) -> "_BucketWriter":
        return _BucketWriter(js, fleet.HOLDS_BUCKET)

    async def _until_done(self, operation, what: str) -> bool:
        """Retry operation() while NATS is away; False when the shipper stops first."""
        while not self._stop.is_set():
            try:
                await operation()
                return True
            except Exception as exc:   # NATS away: local approvals work meanwhile; retried in order
                self.last_error = f"{what}: {exc.__class__.__name__}"
                await asyncio.sleep(0.5)
        return False

    async def _save_hold_keys(self) -> None:
        await asyncio.to_thread(save_hold_keys, self.hold_keys_file, set(self.hold_keys))

    async def _publish_holds(self, js) -> None:
        kv = self._holds_bucket(js)
        # Holds of an earlier run of this daemon ended with it (sessions fail closed).
        prefix = fleet.token(self.host) + "."
        for key in sorted(self.hold_keys):
            # Keys under another name (fleet_host changed) are not this account's to delete.
            if key.startswith(prefix) and not await self._until_done(partial(kv.delete, key),
                                                                     f"deleting hold key {key}"):
                return
            self.hold_keys.discard(key)
        await self._save_hold_keys()
        while not self._stop.is_set():
            try:
                record = await asyncio.to_thread(self.holds.get, True, 0.2)
            except queue.Empty:
                continue
            key = fleet.hold_key(self.host, record["hold_id"])
            if record["state"] in TERMINAL_HOLD_STATES:
                self.pending.pop(record["hold_id"], None)
            else:
                entry = hold_entry(self.host, record)
                entry["since"] = self.pending.get(record["hold_id"], entry)["since"]
                self.pending[record["hold_id"]] = entry
            if record["hold_id"] in self.pending:
                if key not in self.hold_keys:
                    self.hold_keys.add(key)
                    await self._save_hold_keys()
                value = json.dumps(self.pending[record["hold_id"]]).encode()
                done = await self._until_done(partial(kv.put, key, value), f"publishing hold {record['hold_id']}")
            else:
                done = await self._until_done(partial(kv.delete, key), f"publishing hold {record['hold_id']}")
                if done and key in self.hold_keys:
                    self.hold_keys.discard(key)
                    await self._save_hold_keys()
            if done:
                self.counters["holds_published"] += 1

    async def _host_entry(self, js) -> None:
        kv = _BucketWriter(js, fleet.HOSTS_BUCKET)
        while not self._stop.is_set():
            try:
                state = {"host": self.host, "time": time.time_ns(), "acked_seq": self.acked_seq,
                         "last_ack": self.last_ack_time,
                         "pending_holds": len(self.pending), "counters": dict(self.counters),
                         **self.host_state}
                state["lag"] = max(0, state.get("durable_seq", -1) - self.acked_seq)
                await kv.put(fleet.token(self.host), json.dumps(state).encode())
            except Exception:   # NATS away: the next turn tries again
                pass
            await asyncio.sleep(HOST_STATE_INTERVAL)

    async def _on_decision(self, msg) -> None:
        """A signed decision: the supervisor checks the signature against
        fleet_admin_keys, applies or refuses it, and records either."""
        self.counters["decisions"] += 1
        try:
            reply = await asyncio.to_thread(session.admin_request, self.settings,
                                            {"cmd": "decide", "signed": msg.data})
        except AgentwardenError as exc:
            self.counters["decisions_refused"] += 1
            reply = {"ok": False, "error": str(exc)}
        if msg.reply:
            await msg.respond(pack(reply))
