"""The daemon's run loop: ingest batches, resolve, archive, republish, answer status."""
from __future__ import annotations

import collections
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import zmq

from agentwarden import cgroups, policy, sdnotify, wire
from agentwarden import settings as settings_mod
from agentwarden.errors import AgentwardenError
from agentwarden.settings import Settings

from .archive import ArchiveWriter
from .feed import Feed
from .freeze_guard import FreezeGuard
from .watch import WatchGuard
from .governor import Governor
from .metrics import HOLD_WAIT_BUCKETS, Buckets, MetricsServer
from .drift import ExpiredChanges, OutsideCapture
from .fleet import FleetShipper
from .notify import HoldAlerts
from .performed import Performed
from .priority import LANE_HWM, PriorityLane
from .releases import Channel, Releases
from .resolver import Resolver
from agentwarden.archive.segments import load_key
from .sessions import Sessions

log = logging.getLogger("agentwarden.daemon")

# Feed topics (feed.py): tail subscribes to events, the probe to the in-kernel deny rules.
# Batches (up to the probe's 4,096 records each) queued on the ingest socket:
# more waits in the kernel ring, whose drops are counted (memory, see probe/main.py).
INGEST_HWM = 4
MAX_MESSAGES_PER_WAKE = 4  # then answer control and supervisor: they must not wait
# The counters' names, made once rather than per record.
_RECORDS_OF = {kind: f"records_{kind}" for kind in wire.RECORD_FIELDS}
_DECISIONS_OF = {decision: f"decisions_{decision}" for decision in wire.DECISIONS}
TICK_INTERVAL = 1.0       # seconds between periodic duties
# Seconds between looks at the probe's life (two reads of /proc each) while
# messages keep the loop busy: its exit wakes the loop through its pidfd anyway,
# and a dying probe's PF_EXITING is seen at most this much later (dying takes it
# most of a second).
WATCH_CHECK_INTERVAL = 0.02
RETENTION_INTERVAL = 10.0  # seconds between retention checks
# After this many events, a tick that finds no message waiting gives the C
# heap's free pages back to the system: a burst's decoded batches leave them
# behind, scattered among live objects, where the heap's top cannot shrink.
TRIM_AFTER_EVENTS = 20_000


def _heap_trimmer():
    """glibc's malloc_trim, or None under another libc."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class Daemon:
    def __init__(self, settings: Settings):
        self.settings = settings
        settings.prepare_run_dir()
        self.governor = Governor([settings.policy_dir], self._agent_cgroup_path, self._is_session)
        try:
            loaded = self.governor.load()
        except policy.PolicyError as exc:
            raise AgentwardenError(f"refusing to start with a broken policy: {exc}") from None
        key = load_key(settings.archive.key_file, settings.archive.key_file_required)
        self.archive = ArchiveWriter(settings.archive_dir, settings.archive, key)
        if not key:
            log.warning("the archive is not keyed (no %s): its hash chain shows accidents and "
                        "naive edits, not a rewrite by root", settings.archive.key_file)
        self.sessions = Sessions(self.archive.host, self.archive.boot_id)
        self.disk_guard = FreezeGuard(settings.archive.on_disk_full)
        # A few missed health records before silence counts: a busy probe is late, not gone.
        self.watch = WatchGuard(self._agent_cgroups_now, max(5.0, 5 * settings.health_interval),
                                settings.state_dir / "watch-frozen.json")
        self.outbox: list[dict] = []   # records the daemon archived itself, published with the next batch
        self.archive.append(self._policy_record("loaded" if loaded else "none", None))
        self.archive.flush()
        self._segments_stated = self.archive.segments_opened
        self._next_retention = 0.0
        self.resolver = Resolver()
        self.ctx = zmq.Context.instance()
        self.pull = self._bind(zmq.PULL, settings.ingest_endpoint, {zmq.RCVHWM: INGEST_HWM})
        self.pub = self._bind(zmq.XPUB, settings.events_endpoint, {zmq.SNDHWM: 10000})
        self.feed = Feed(self.pub)
        self.listened = False   # someone subscribed to the events at the batch's start (feed.py)
        self.control = self._bind(zmq.REP, settings.control_endpoint)
        self._priority_sock = self._bind(zmq.PULL, settings.priority_endpoint, {zmq.RCVHWM: LANE_HWM})
        PriorityLane.restrict(settings.priority_endpoint)

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
        self._trim_heap = _heap_trimmer()
        self._trimmed_at = 0   # events counted at the last trim
        self.rate = 0.0
        self._rate_mark = (time.monotonic(), 0)
        self.stopping = False
        self.exit_code = 0
        self.supervisor_health: dict[str, Any] = {}
        self.supervisor: subprocess.Popen | None = None
        self.release_channel = Channel()   # the supervisor's `release` records, in order (releases.py)
        self.releases = Releases(self.counters)
        self.performed = Performed()   # the supervisor's performed calls, each to its place
        # Exec records decided and acted on ahead of the in-order stream (priority.py).
        self.priority = PriorityLane(self._priority_sock, self.governor, self.agents, self._is_session,
                                     self.counters)
        self.notifier = sdnotify.Notifier()  # systemd readiness, watchdog, status
        # Sessions' listeners kept by the service manager (systemd's fd store,
        # or `up`) while this process was gone: the supervisor resumes them.
        self.inherited = sdnotify.listen_fds()
        self.alerts = HoldAlerts(settings, self.archive.host)  # holds: journal, status line, hooks
        self.hold_waits = Buckets(HOLD_WAIT_BUCKETS)   # pending to decided, of the hold records seen
        # Metrics read a snapshot the loop takes each tick: never what the loop is changing.
        self.metrics_snapshot: dict | None = None
        self.metrics: MetricsServer | None = None
        self.metrics_error: str | None = None
        if settings.metrics_listen:
            try:
                self.metrics = MetricsServer(settings.metrics_listen, lambda: self.metrics_snapshot)
            except AgentwardenError as exc:   # observability must not stop enforcement
                self.metrics_error = str(exc)
                log.error("%s; running without metrics", exc)
        self._drift_out: list[dict] = []   # drift records an event caused, archived after it
        self.drift = OutsideCapture(settings, self._drift_out.append)   # agents' changes outside sessions
        self.expired_changes = ExpiredChanges(settings)   # drift: expired, not yet answered
        # The fleet (NATS): its own thread reads the archive as its outbox; None without fleet_url.
        self.fleet = FleetShipper(settings, settings.archive_dir) if settings.fleet_url else None

    def _bind(self, kind: int, endpoint: str, options: dict[int, int] | None = None):
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        # Before bind: a bound socket's connections take the options it had
        # then (a high-water mark set after bind left ingest at ZeroMQ's 1,000
        # batches, up to a gigabyte under a flood).
        for option, value in (options or {}).items():
            sock.setsockopt(option, value)
        path = endpoint[len("ipc://"):]
        if os.path.exists(path):
            os.unlink(path)  # a stale socket from a previous run
        sock.bind(endpoint)
        self.settings.restrict_socket(path)
        return sock

    def stop(self, *_):
        self.stopping = True

    def _is_session(self, cgroup_id: int) -> bool:
        info = self.tags.get(str(cgroup_id))
        return isinstance(info, dict) and bool(info.get("session"))

    def _agent_cgroup_path(self, cgroup_id: int) -> Path | None:
        info = self.tags.get(str(cgroup_id))
        return Path(info["path"]) if isinstance(info, dict) and isinstance(info.get("path"), str) else None

    def _agent_cgroups_now(self) -> dict:
        """Every agent cgroup in this instance's scope: the probe's last word and
        what is on disk now (the probe may be gone)."""
        found = {key: info for key, info in self.tags.items() if isinstance(info, dict)}
        try:
            on_disk = cgroups.scan_tagged(cgroups.cgroup2_root(), self.settings.agents_slice,
                                          scope=self.settings.cgroup_scope)
        except AgentwardenError as exc:
            log.error("cannot scan for agent cgroups: %s", exc)
            on_disk = {}
        for cgroup_id, tagged in on_disk.items():
            found.setdefault(str(cgroup_id), {"path": str(tagged.path)})
        return found

    # -- policy ----------------------------------------------------------------

    def _policy_record(self, status: str, detail: str | None) -> dict:
        current = self.governor.policy
        return {"kind": "policy", "time": time.time_ns(), "status": status,
                "policy_hash": current.hash if current else None,
                "files": [str(f) for f in current.files] if current else [], "detail": detail}

    def reload_policy(self) -> dict:
        try:
            self.governor.load()
        except policy.PolicyError as exc:
            self._record(self._policy_record("refused", "; ".join(str(p) for p in exc.problems)))
            return {"ok": False, "error": f"new policy refused, the old one stays in force: {exc}",
                    "problems": [str(p) for p in exc.problems]}
        self._record(self._policy_record("loaded" if self.governor.policy else "none", None))
        self._archive_own(self.sessions.restate(self._policy_hash()))
        self.publish_kernel_rules()
        return {"ok": True, "policy_hash": self.governor.policy.hash if self.governor.policy else None}

    def publish_kernel_rules(self) -> None:
        rules = [{"agent": r.agent, "path": r.path, "exact": r.exact, "applies": r.applies,
                  "rule": r.rule} for r in self.governor.kernel_rules()]
        current = self.governor.policy
        message = wire.encode_kernel_rules(current.hash if current else None, rules,
                                           self.governor.kernel_sidedoors(),
                                           self.governor.kernel_kill_agents(),
                                           self.governor.acting_agents())
        try:
            self.pub.send_multipart([wire.TOPIC_KERNEL_RULES, message], zmq.NOBLOCK)
        except zmq.Again:
            self.counters["publish_dropped"] += 1

    def _record(self, record: dict) -> None:
        """Archive and publish one record the daemon makes itself."""
        self.handle_record(record)
        self.archive.flush()
        self.publish([record])
        self.check_archive()

    def _archive_own(self, records: list[dict]) -> None:
        """Archive records the daemon makes about itself; they go out with the next publish."""
        for record in records:
            self.archive.append(record)
            self.outbox.append(record)

    def _policy_hash(self) -> str | None:
        return self.governor.policy.hash if self.governor.policy else None

    # -- ingest ----------------------------------------------------------------

    def _gap(self, stage: str, count: int, detail: str) -> dict:
        return {"kind": "gap", "time": time.time_ns(), "stage": stage, "count": count,
                "detail": detail}

    def _check_sequence(self, batch: wire.Batch) -> list[dict]:
        last = self.last_seq.get(batch.source)
        self.last_seq[batch.source] = batch.seq
        if last is None and batch.seq > 0 and batch.source == "probe":
            # The probe ran before this daemon: what it had sent the previous
            # daemon and that one had not archived is gone, and no one counted it.
            return [self._gap("transport", 0,
                              f"the daemon started while the probe was running (its batch seq {batch.seq}): "
                              "batches it sent the previous daemon and that one had not archived are "
                              "lost, not counted")]
        if last is None or batch.seq == last + 1:
            return []
        if batch.seq > last + 1:
            missing = batch.seq - last - 1
            return [self._gap("transport", missing,
                              f"{missing} batches from {batch.source} never arrived "
                              f"(seq {last + 1}..{batch.seq - 1})")]
        return [self._gap("transport", 0, f"{batch.source} restarted (seq {last} -> {batch.seq})")]

    def drain_releases(self) -> None:
        """The supervisor's releases queued now, before any message ingested
        after them (see releases.py)."""
        for raw in self.release_channel.receive():
            self._handle_batch(raw)

    def handle_message(self, raw: bytes) -> None:
        self.drain_releases()
        self._handle_batch(raw)

    def _handle_batch(self, raw: bytes) -> None:
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
        if batch.source == "probe" and not self.performed.waiting:
            out.extend(batch.records)   # no performed record waits for its place among them
        else:
            for record in batch.records:
                if self.performed.wanted(record, batch.source):
                    self.performed.hold(record)   # until its place in its task's records (performed.py)
                    continue
                out.extend(self.performed.before(record))
                out.append(record)
        del batch   # its records live in out alone (see _handle_records)
        self._handle_records(out)

    def _handle_records(self, out: list[dict]) -> None:
        """Handle, archive and publish out's records. While nobody listens to
        the feed, out is emptied as they are handled: each record is freed
        once archived, so a flood's batch is never held whole and enriched."""
        self.listened = self.feed.listened()
        pending = out[::-1]
        if not self.listened:
            out.clear()   # no one to publish to: each record goes with its turn
        with self.governor.batch():
            while pending:
                violation = self.handle_record(pending.pop())
                if violation and self.listened:
                    out.append(violation)   # archived already; published after the batch's records
                self.priority.between_records()   # an exec to kill must not wait for this batch
        self.archive.flush()
        if self.listened:
            self.publish(out)
        else:
            self._skip_publish()
        if self.archive.sync_due():
            self.sync_archive()   # a flood reaches the unsynced bound before sync_interval
        else:
            self.check_archive()

    def handle_record(self, record: dict) -> dict | None:
        """Archive one record (after enriching it); returns the violation it
        caused, already archived, or None."""
        kind = record["kind"]
        counters = self.counters
        counters[_RECORDS_OF.get(kind) or f"records_{kind}"] += 1
        if kind == "violation":
            counters["violations"] += 1   # the supervisor's, for a session call it refused
        violation = None
        own: list[dict] = []   # records the daemon makes because of this one
        if kind in wire.EVENT_KINDS:
            record["agent"] = self.agents.get(record["agent_cgroup_id"])
            record["session"] = self.sessions.session_of(record["agent_cgroup_id"])
            self.resolver.annotate(record)
            self.releases.annotate(record)
            counters["events"] += 1
            if kind == "open":   # a record of repeated opens stands for `count` of them
                counters["opens"] += record.get("count", 1)
            if kind in wire.DECIDED_KINDS:
                violation = (self.priority.judge_in_order if kind == "exec" else self.governor.judge)(record)
                verdict = record.get("verdict")
                if verdict:
                    decision = verdict["decision"]
                    counters[_DECISIONS_OF.get(decision) or f"decisions_{decision}"] += 1
            self._drift_event(record)
        elif kind == "gap":
            self.drops[record["stage"]] += record["count"]
        elif kind == "release":
            self.releases.note(record)
        elif kind == "tags":
            self.tags = record["agents"]
            for cgid, info in self.tags.items():
                if str(cgid).isdigit() and isinstance(info, dict) and isinstance(info.get("agent"), str):
                    self.agents[int(cgid)] = info["agent"]
            own = self.sessions.update(self.tags, self._policy_hash())
        elif kind == "health" and record["stage"] == "probe":
            self.probe_health = record["counters"]
            own = self._watch_records(self.watch.heard(record))
        elif kind == "health" and record["stage"] == "supervisor":
            self.supervisor_health = record["counters"]
        # An event's packed body is kept for the feed only while someone listens.
        self.archive.append(record, keep_body=self.listened and kind in wire.EVENT_KINDS)
        if kind == "hold":
            self.counters[f"holds_{record['state']}"] += 1
            if record["state"] not in ("pending", "approval"):
                self.hold_waits.observe(float(record["waited"]))
            self.alerts.hold(record)   # queued for the journal and hooks; never waits
            if self.fleet:
                self.fleet.hold(record)
            self.notifier.alive(self.status_line())
        elif kind == "drift":
            self.expired_changes.update(record)
            if record["state"] == "expired":
                self.alerts.hold(record)   # the same channels as holds
                self.notifier.alive(self.status_line())
        if self._drift_out:
            own, self._drift_out[:] = own + self._drift_out, []
        if own:
            self._archive_own(own)
        if violation:
            violation["event_seq"] = record.get("seq")
            violation["session"] = record.get("session")
            self.counters["violations"] += 1
            self.archive.append(violation)
            self.alerts.violation(violation)   # the journal, with its fields; never waits
            if violation["action_taken"].startswith("froze"):
                self.disk_guard.forget([record["agent_cgroup_id"]])  # the policy froze it: stays frozen
        return violation

    def _drift_event(self, record: dict) -> None:
        """An agent's change outside `run` sessions (inside one, the supervisor
        captured it before it went through)."""
        if not self.drift.wants(record):
            return   # most events: one dict lookup
        policy = self.governor.policy
        agent = record.get("agent")
        tags = self.tags.get(str(record.get("cgroup_id"))) if isinstance(self.tags, dict) else None
        in_session = bool(isinstance(tags, dict) and tags.get("instance"))
        try:
            self.drift.event(record, policy.agents.get(agent) if policy and agent else None, in_session,
                             policy.hash if policy else None)
        except OSError as exc:   # the state directory: counted, the event is archived anyway
            self.drift.counters["drift_errors"] += 1
            log.error("drift: %s", exc)

    def _watch_records(self, records: list[dict]) -> list[dict]:
        for record in records:
            (log.error if record["state"] == "lost" else log.warning)("watch: %s", record["detail"])
        return records

    def check_watch(self) -> None:
        if self.watch.exited():
            self.drain_ingest()   # the probe's last words say whether it was asked to stop
        behind = bool(self.pull.getsockopt(zmq.EVENTS) & zmq.POLLIN)
        records = self._watch_records(self.watch.check(behind))
        for record in records:
            self._record(record)

    def drain_ingest(self) -> None:
        while True:
            try:
                self.handle_message(self.pull.recv(zmq.NOBLOCK))
            except zmq.Again:
                return

    def publish(self, records: list[dict]) -> None:
        bodies = self.archive.take_bodies()
        if self.outbox:
            records, self.outbox = records + self.outbox, []
        if not records:
            return
        if not self.feed.listened():
            self.counters["publish_skipped"] += 1   # no subscriber: nothing to pack (feed.py)
            return
        # An event is published as archived, plus its seq: its packed body is
        # reused (nothing changes an event after it is archived).
        packed = [wire.pack_with_last(body, "seq", record["seq"])
                  if (body := bodies.get(record.get("seq"))) is not None else wire.pack(record)
                  for record in records]
        try:
            self.pub.send_multipart([wire.TOPIC_EVENTS, wire.encode_packed_batch("daemon", self.pub_seq, packed)],
                                    zmq.NOBLOCK)
            self.counters["published"] += 1
        except zmq.Again:
            self.counters["publish_dropped"] += 1
        self.pub_seq += 1

    def _skip_publish(self) -> None:
        """Nobody listened when the batch began: nothing of it is packed."""
        self.archive.take_bodies()
        self.outbox = []
        self.counters["publish_skipped"] += 1

    # -- periodic --------------------------------------------------------------

    def tick(self) -> None:
        if self.pending_malformed:
            record = self._gap("daemon-ingest", self.pending_malformed,
                               f"malformed messages dropped; last: {self.pending_malformed_detail}")
            self.pending_malformed = 0
            self._record(record)
        self.publish_kernel_rules()  # again each second: a probe that (re)connects gets them
        self.archive.rotate_if_old()
        self.sync_archive()
        if self.disk_guard.active and self.archive.failure:
            applied = self.disk_guard.apply(self.tags)  # agents tagged since the disk filled
            if applied:
                log.error("archive still failing; applied %s to new agents: %s",
                          self.disk_guard.policy, applied)
        new_segment = self.archive.segments_opened != self._segments_stated
        if new_segment:
            # Restate the policy and sessions in force, so that the new segment
            # stays attributable when retention deletes the older ones.
            self._segments_stated = self.archive.segments_opened
            self._archive_own([self._policy_record("in-force", "restated at a new archive segment")]
                              + self.sessions.restate(self._policy_hash()))
        if new_segment or time.monotonic() >= self._next_retention:
            self._next_retention = time.monotonic() + RETENTION_INTERVAL
            self.outbox.extend(self.archive.apply_retention())
        self.publish([])
        self.feed.listened()   # subscriptions read while idle too: their queue stays short
        self._trim_after_burst()
        self.alerts.tick()
        now = time.monotonic()
        mark_time, mark_events = self._rate_mark
        if now > mark_time:
            self.rate = (self.counters["events"] - mark_events) / (now - mark_time)
        self._rate_mark = (now, self.counters["events"])
        if self.fleet:
            self.fleet.note({"durable_seq": self.archive.durable_seq, "drops": dict(self.drops),
                             "events_per_second": self.rate, "probe": self.status_line()})
        self.notifier.alive(self.status_line())
        if self.metrics:
            self.metrics_snapshot = {**self.status(), "hold_waits": self.hold_waits.export(),
                                     "taken": time.time_ns()}

    def _trim_after_burst(self) -> None:
        events = self.counters["events"]
        if self._trim_heap is None or events - self._trimmed_at < TRIM_AFTER_EVENTS \
                or self.pull.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            return
        self._trim_heap(0)
        self._trimmed_at = events
        self.counters["heap_trims"] += 1

    def status_line(self) -> str:
        age = (time.time_ns() - self.probe_last_seen) / 1e9
        probe = "no contact yet" if not self.probe_last_seen else "up" if age < 5 else f"silent for {age:.0f}s"
        if self.watch.state == "lost":
            probe = "LOST: agents frozen"
        holds = self.alerts.pending.summary(time.time_ns())
        expired = self.expired_changes.summary()
        return (f"{self.counters['events']} events archived, {self.rate:.0f}/s; probe {probe}"
                + (f"; {holds}" if holds else "") + (f"; {expired}" if expired else ""))

    # -- archive ---------------------------------------------------------------

    def sync_archive(self) -> None:
        self.archive.sync_soon()   # the fsync runs on the archive's own thread: enforcement never waits on the disk
        self.check_archive()

    def check_archive(self) -> None:
        """Fail closed while the archive cannot be written; recover when it can."""
        failure = self.archive.failure
        if failure and not self.disk_guard.active:
            taken = self.disk_guard.engage(self.tags)
            event = "disk-full" if self.archive.disk_full else "write-failed"
            record = {"kind": "archive", "time": time.time_ns(), "event": event,
                      "detail": f"{failure}; on-disk-full policy {self.disk_guard.policy}: {taken}",
                      "error": failure, "policy": self.disk_guard.policy, "action_taken": taken}
            log.error("ARCHIVE %s: %s", event.upper(), record["detail"])
            self.archive.append(record)  # kept in memory until it can be written
            self.publish([record])
        elif not failure and self.disk_guard.active:
            seconds, taken = self.disk_guard.release()
            dropped = self.archive.take_dropped()
            records = []
            if dropped:
                records.append(self._gap("archive", dropped, "records that did not fit in memory "
                                         "while the archive could not be written"))
            records.append({"kind": "archive", "time": time.time_ns(), "event": "disk-ok",
                            "detail": f"the archive is written again after {seconds:.1f}s; {taken}",
                            "seconds": seconds, "dropped": dropped, "action_taken": taken})
            for record in records:
                self.archive.append(record)
            log.warning("archive: %s", records[-1]["detail"])
            self.archive.flush()
            self.publish(records)

    # -- control ---------------------------------------------------------------

    def status(self) -> dict:
        return {
            "daemon": {"pid": os.getpid(), "started": self.started, "events_per_second": self.rate,
                       "counters": dict(self.counters), "archive": str(self.settings.archive_dir),
                       "decision_cache": self.governor.cache_state(),
                       "cgroup_scope": self.settings.cgroup_scope,
                       "archive_seq": self.archive.seq,
                       "archive_state": {**self.archive.state(), "on_disk_full": self.disk_guard.state()},
                       "sockets": {"ingest": self.settings.ingest_endpoint,
                                   "events": self.settings.events_endpoint,
                                   "control": self.settings.control_endpoint}},
            "probe": {"last_seen": self.probe_last_seen, "health": self.probe_health,
                      "tags": self.tags},
            "drops": dict(self.drops),
            "policy": {"policy_hash": self.governor.policy.hash if self.governor.policy else None,
                       "agents": sorted(self.governor.policy.agents) if self.governor.policy else [],
                       "kernel_rules": len(self.governor.kernel_rules())},
            "sessions": self.supervisor_health,
            "watch": self.watch.info(),
            "notify": self.alerts.info(),
            "metrics": {"listen": self.settings.metrics_listen, "error": self.metrics_error},
            "drift": {**self.drift.counters, "expired": len(self.expired_changes)},
            "fleet": self.fleet.info(self.archive.durable_seq) if self.fleet else None,
            "status_line": self.status_line(),
        }

    def handle_control(self) -> None:
        raw = self.control.recv()
        try:
            request = wire.decode_control(raw)
            if request["cmd"] == "status":
                reply = {"ok": True, "status": self.status()}
            elif request["cmd"] == "reload":
                reply = self.reload_policy()
            elif request["cmd"] == "admin":
                reply = self.admin_record(request)
            else:
                reply = {"ok": False, "error": f"unknown command {request['cmd']!r}"}
        except wire.WireError as exc:
            self.counters["control_malformed"] += 1
            reply = {"ok": False, "error": str(exc)}
        self.control.send(wire.pack(reply))

    def admin_record(self, request: dict) -> dict:
        record = {"kind": "admin", "time": time.time_ns(), **{
            k: request.get(k) for k in ("action", "agent", "uid", "user", "result")}}
        try:
            wire.validate_record(record)
        except wire.WireError as exc:
            return {"ok": False, "error": str(exc)}
        record["sessions"] = self.sessions.of_agent(record["agent"])
        # An admin decided about these agents: the disk-full guard leaves them alone.
        decided = [cgid for cgid, name in self.agents.items() if record["agent"] in ("*", name)]
        self.disk_guard.forget(decided)
        self.watch.forget(decided)
        self._record(record)
        return {"ok": True}

    def _sessions_open(self) -> bool:
        """Whether the supervisor takes sessions (its socket accepts): the
        service is ready only then, or an agent@ unit started right after it
        would find nothing listening. A supervisor that died counts as an
        answer (the loop stops for it)."""
        if self.supervisor.poll() is not None:
            return True
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(str(self.settings.sessions_socket))
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        # Its own process (see supervisor/__init__.py); it dies with this one.
        self.ready_sent = False
        self.supervisor = subprocess.Popen(
            [sys.executable, "-m", "agentwarden.daemon.supervisor", *settings_mod.flag_args(),
             "--release-fd", str(self.release_channel.theirs.fileno()),
             *(f"--listener={name}={fd}" for name, fd in self.inherited)],
            pass_fds=[self.release_channel.theirs.fileno(), *(fd for _, fd in self.inherited)])
        self.release_channel.handed_over()
        if self.fleet:
            self.fleet.start()
        sdnotify.fds_close([fd for _, fd in self.inherited])   # the supervisor's now (and the store's)
        poller.register(self.release_channel.fileno(), zmq.POLLIN)
        poller.register(self.priority.sock, zmq.POLLIN)
        next_tick = time.monotonic() + TICK_INTERVAL
        watched_fd = None   # the probe's pidfd in the poller: its exit wakes this loop at once
        next_watch = 0.0
        while not self.stopping:
            if self.watch.fileno() != watched_fd:
                if watched_fd is not None:
                    poller.unregister(watched_fd)
                watched_fd = self.watch.fileno()
                if watched_fd is not None:
                    poller.register(watched_fd, zmq.POLLIN)
            to_sync = self.archive.seconds_to_sync()
            ready = dict(poller.poll(200 if to_sync is None else min(200, int(to_sync * 1000) + 1)))
            if self.priority.sock in ready:
                self.priority.drain()   # first: an exec to kill waits for nothing
            if self.release_channel.fileno() in ready:
                self.drain_releases()
            if self.pull in ready:
                for _ in range(MAX_MESSAGES_PER_WAKE):
                    try:
                        raw = self.pull.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.handle_message(raw)
            if self.control in ready:
                self.handle_control()
            if self.supervisor.poll() is not None:
                # Its listeners are closed: sessions fail closed. Stop, so that
                # the service manager restarts the whole daemon.
                log.error("the session supervisor died (exit %s); stopping", self.supervisor.returncode)
                self.exit_code = 1
                self.stopping = True
            if not self.ready_sent and self._sessions_open():
                self.ready_sent = True
                self.notifier.ready(self.status_line())
            now = time.monotonic()
            if now >= next_watch or (watched_fd is not None and watched_fd in ready):
                next_watch = now + WATCH_CHECK_INTERVAL
                self.check_watch()
            if self.archive.sync_due():
                self.sync_archive()  # bounded loss: at most sync_interval after the first unsynced record
            self.notifier.alive()
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + TICK_INTERVAL
                self.tick()
        if self.supervisor.poll() is None:
            self.supervisor.terminate()
            try:
                self.supervisor.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.supervisor.kill()
        # Drain what the probe already sent, then close the archive durably.
        self.notifier.stopping("draining and closing the archive")
        self.drain_ingest()
        self.drain_releases()
        self._handle_records(self.performed.remaining())
        self.tick()
        self.alerts.close()
        if self.metrics:
            self.metrics.stop()
        self.archive.close()
        if self.fleet:
            self.fleet.stop()   # after the last sync: what it had not shipped, the next start ships
        for sock in (self.pull, self.pub, self.control, self.release_channel, self.priority):
            sock.close()


def main(settings: Settings) -> None:
    daemon = Daemon(settings)
    signal.signal(signal.SIGTERM, daemon.stop)
    signal.signal(signal.SIGINT, daemon.stop)
    log.info("daemon running: archive %s", settings.archive_dir)
    daemon.run()   # READY once its supervisor takes sessions
    if daemon.exit_code:
        raise SystemExit(daemon.exit_code)
