"""The daemon's run loop: ingest batches, resolve, archive, republish, answer status."""
from __future__ import annotations

import collections
import logging
import os
import signal
import time
from typing import Any

import zmq

from agentwarden import wire
from agentwarden.settings import Settings

from .archive import ArchiveWriter
from .resolver import Resolver

log = logging.getLogger("agentwarden.daemon")

EVENT_KINDS = ("exec", "open", "chdir", "fork", "exit")
MAX_MESSAGES_PER_WAKE = 64
SYNC_INTERVAL = 1.0  # seconds between fsyncs of the archive


class Daemon:
    def __init__(self, settings: Settings):
        self.settings = settings
        settings.prepare_run_dir()
        self.archive = ArchiveWriter(settings.archive_dir)
        self.resolver = Resolver()
        self.ctx = zmq.Context.instance()
        self.pull = self._bind(zmq.PULL, settings.ingest_endpoint)
        self.pull.setsockopt(zmq.RCVHWM, 10000)
        self.pub = self._bind(zmq.PUB, settings.events_endpoint)
        self.pub.setsockopt(zmq.SNDHWM, 10000)
        self.control = self._bind(zmq.REP, settings.control_endpoint)
        self.started = time.time_ns()
        self.counters: collections.Counter = collections.Counter()
        self.drops: collections.Counter = collections.Counter()  # stage -> records lost
        self.agents: dict[int, str] = {}       # tagged cgroup id -> agent name
        self.tags: dict[str, Any] = {}
        self.probe_health: dict[str, Any] = {}
        self.probe_last_seen = 0
        self.last_seq: dict[str, int] = {}
        self.pending_malformed = 0
        self.pending_malformed_detail = ""
        self.pub_seq = 0
        self.rate = 0.0
        self._rate_mark = (time.monotonic(), 0)
        self.stopping = False

    def _bind(self, kind: int, endpoint: str):
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        path = endpoint[len("ipc://"):]
        if os.path.exists(path):
            os.unlink(path)  # a stale socket from a previous run
        sock.bind(endpoint)
        os.chmod(path, 0o600)
        return sock

    def stop(self, *_):
        self.stopping = True

    # -- ingest ----------------------------------------------------------------

    def _gap(self, stage: str, count: int, detail: str) -> dict:
        return {"kind": "gap", "time": time.time_ns(), "stage": stage, "count": count,
                "detail": detail}

    def _check_sequence(self, batch: wire.Batch) -> list[dict]:
        last = self.last_seq.get(batch.source)
        self.last_seq[batch.source] = batch.seq
        if last is None or batch.seq == last + 1:
            return []
        if batch.seq > last + 1:
            missing = batch.seq - last - 1
            return [self._gap("transport", missing,
                              f"{missing} batches from {batch.source} never arrived "
                              f"(seq {last + 1}..{batch.seq - 1})")]
        return [self._gap("transport", 0, f"{batch.source} restarted (seq {last} -> {batch.seq})")]

    def handle_message(self, raw: bytes) -> None:
        self.counters["messages"] += 1
        try:
            batch = wire.decode_batch(raw)
        except wire.WireError as exc:
            self.counters["malformed"] += 1
            self.pending_malformed += 1
            self.pending_malformed_detail = str(exc)
            return
        out = self._check_sequence(batch)
        if batch.source == "probe":
            self.probe_last_seen = time.time_ns()
        out.extend(batch.records)
        for record in out:
            self.handle_record(record)
        self.archive.flush()
        self.publish(out)

    def handle_record(self, record: dict) -> None:
        kind = record["kind"]
        self.counters[f"records_{kind}"] += 1
        if kind in EVENT_KINDS:
            record["agent"] = self.agents.get(record["agent_cgroup_id"])
            self.resolver.annotate(record)
            self.counters["events"] += 1
        elif kind == "gap":
            self.drops[record["stage"]] += record["count"]
        elif kind == "tags":
            self.tags = record["agents"]
            for cgid, info in self.tags.items():
                if str(cgid).isdigit() and isinstance(info, dict) and isinstance(info.get("agent"), str):
                    self.agents[int(cgid)] = info["agent"]
        elif kind == "health" and record["stage"] == "probe":
            self.probe_health = record["counters"]
        self.archive.append(record)

    def publish(self, records: list[dict]) -> None:
        if not records:
            return
        try:
            self.pub.send(wire.encode_batch("daemon", self.pub_seq, records), zmq.NOBLOCK)
        except zmq.Again:
            self.counters["publish_dropped"] += 1
        self.pub_seq += 1

    # -- periodic --------------------------------------------------------------

    def tick(self) -> None:
        if self.pending_malformed:
            record = self._gap("daemon-ingest", self.pending_malformed,
                               f"malformed messages dropped; last: {self.pending_malformed_detail}")
            self.pending_malformed = 0
            self.handle_record(record)
            self.publish([record])
        self.archive.sync()
        now = time.monotonic()
        mark_time, mark_events = self._rate_mark
        if now > mark_time:
            self.rate = (self.counters["events"] - mark_events) / (now - mark_time)
        self._rate_mark = (now, self.counters["events"])

    # -- control ---------------------------------------------------------------

    def status(self) -> dict:
        return {
            "daemon": {"pid": os.getpid(), "started": self.started, "events_per_second": self.rate,
                       "counters": dict(self.counters), "archive": str(self.settings.archive_dir),
                       "archive_seq": self.archive.seq,
                       "sockets": {"ingest": self.settings.ingest_endpoint,
                                   "events": self.settings.events_endpoint,
                                   "control": self.settings.control_endpoint}},
            "probe": {"last_seen": self.probe_last_seen, "health": self.probe_health,
                      "tags": self.tags},
            "drops": dict(self.drops),
        }

    def handle_control(self) -> None:
        raw = self.control.recv()
        try:
            request = wire.decode_control(raw)
            if request["cmd"] == "status":
                reply = {"ok": True, "status": self.status()}
            else:
                reply = {"ok": False, "error": f"unknown command {request['cmd']!r}"}
        except wire.WireError as exc:
            self.counters["control_malformed"] += 1
            reply = {"ok": False, "error": str(exc)}
        self.control.send(wire.pack(reply))

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        next_tick = time.monotonic() + SYNC_INTERVAL
        while not self.stopping:
            ready = dict(poller.poll(200))
            if self.pull in ready:
                for _ in range(MAX_MESSAGES_PER_WAKE):
                    try:
                        raw = self.pull.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.handle_message(raw)
            if self.control in ready:
                self.handle_control()
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + SYNC_INTERVAL
                self.tick()
        # Drain what the probe already sent, then close the archive durably.
        while True:
            try:
                self.handle_message(self.pull.recv(zmq.NOBLOCK))
            except zmq.Again:
                break
        self.tick()
        self.archive.close()
        for sock in (self.pull, self.pub, self.control):
            sock.close()


def main(settings: Settings) -> None:
    daemon = Daemon(settings)
    signal.signal(signal.SIGTERM, daemon.stop)
    signal.signal(signal.SIGINT, daemon.stop)
    log.info("daemon running: archive %s", settings.archive_dir)
    daemon.run()
