"""Prometheus metrics (`metrics_listen`): the daemon's own counters, as a scrape reads them.

Nothing is counted twice: the collector turns the daemon's status snapshot --
its counters, the probe's and the supervisor's last health records, the
archive's state, the pending holds -- into metric families when it is scraped.
The snapshot is taken by the daemon's loop once per tick (`Daemon.tick`), so
the HTTP thread never reads structures the loop is changing; a scrape is at
most a tick old.

`Buckets` is a histogram small enough to travel in a health record: the
supervisor's handling times reach the daemon that way, and the daemon keeps the
waits of decided holds in one. prometheus_client is imported only when metrics
are on (Debian's python3-prometheus-client, a Recommends of the package).
"""
from __future__ import annotations

import bisect
import errno
import logging
import socket
import threading
import time
from typing import Any, Callable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from socketserver import ThreadingMixIn

from agentwarden import settings as settings_mod
from agentwarden.errors import AgentwardenError

log = logging.getLogger("agentwarden.daemon.metrics")

# Upper bounds in seconds. A supervisor round trip: notification readable to answered.
HANDLING_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 10e-3, 50e-3, 0.25, 1.0)
# A hold: pending to decided (an admin, a timeout, the session's end).
HOLD_WAIT_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
# Drop stages that always appear (0 until something is lost): kernel ring, probe, wire, daemon.
DROP_STAGES = ("kernel", "probe-backlog", "probe-decode", "transport", "daemon-ingest", "archive")
PROBE_SILENT_AFTER = 5.0   # seconds without a probe record before it counts as down (status line's)


class Buckets:
    """A histogram that fits in a msgpack map: counts per upper bound, sum, count."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)   # the last one: above every bound
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def export(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum}


def _histogram_buckets(exported: Any) -> tuple[list[tuple[str, float]], float] | None:
    """An exported Buckets as prometheus buckets (cumulative, +Inf last) and its sum."""
    if not isinstance(exported, dict) or len(exported.get("counts", ())) != len(exported.get("bounds", ())) + 1:
        return None
    buckets, total = [], 0
    for bound, count in zip(exported["bounds"] + [float("inf")], exported["counts"]):
        total += count
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
    return buckets, float(exported["sum"])


class Collector:
    """Reads the latest snapshot (`Daemon.metrics_snapshot`) when scraped."""

    def __init__(self, snapshot: Callable[[], dict | None]):
        self.snapshot = snapshot

    def describe(self):
        return []   # families vary with what the snapshot holds: no registration-time check

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)
        snap = self.snapshot()
        if snap is None:
            return
        now_ns = time.time_ns()
        daemon, probe = snap["daemon"], snap["probe"]
        counters = daemon["counters"]
        health = probe.get("health") or {}
        supervisor = snap.get("sessions") or {}

        def counter(name: str, doc: str, labels: tuple[str, ...] = (), values: Any = None):
            family = CounterMetricFamily(f"agentwarden_{name}", doc, labels=list(labels))
            for key, value in (values.items() if isinstance(values, dict) else [((), values)]):
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    family.add_metric([key] if labels and isinstance(key, str) else list(key), value)
            return family

        def gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None):
            family = GaugeMetricFamily(f"agentwarden_{name}", doc, labels=list(labels or {}))
            family.add_metric(list((labels or {}).values()), value)
            return family

        # -- events and drops, per stage -------------------------------------------
        yield counter("kernel_records", "records the BPF program put in the ring buffer, by kind",
                      ("kind",), health.get("kernel_emitted") or {})
        yield counter("kernel_dropped_records", "records the BPF program had no room for, by kind",
                      ("kind",), health.get("kernel_dropped") or {})
        yield counter("kernel_fd_records_skipped", "fd records the BPF program counted instead of sending "
                      "(closes and copies of read-only regular files, devices, pipes, sockets)", values=health.get("kernel_fd_skipped"))
        yield counter("kernel_folded_opens", "repeated opens the BPF program counted under an earlier "
                      "open's key instead of sending (the probe sends their counts)",
                      values=health.get("kernel_folded_opens"))
        yield counter("daemon_opens", "opens the daemon archived, a record of repeated opens counting "
                      "for as many", values=counters.get("opens", 0))
        yield counter("probe_records_decoded", "records the probe decoded", values=health.get("decoded"))
        yield counter("probe_records_sent", "records the probe sent to the daemon",
                      values=health.get("records_sent"))
        yield counter("probe_decode_errors", "records the probe could not decode",
                      values=health.get("decode_errors"))
        yield gauge("probe_backlog_records", "records waiting in the probe to be sent",
                    health.get("backlog", 0))
        yield counter("daemon_records", "records the daemon received from the probe and the supervisor, by kind", ("kind",),
                      {k[len("records_"):]: v for k, v in counters.items() if k.startswith("records_")})
        yield counter("daemon_messages", "messages (batches) the daemon received",
                      values=counters.get("messages", 0))
        yield counter("daemon_malformed_messages", "messages the daemon dropped as malformed",
                      values=counters.get("malformed", 0))
        yield counter("daemon_publish_dropped", "batches `tail` subscribers missed (PUB queue full)",
                      values=counters.get("publish_dropped", 0))
        drops = {stage: 0 for stage in DROP_STAGES}
        drops.update(snap.get("drops") or {})
        yield counter("dropped_records", "records lost, by the stage that lost them (gap records)",
                      ("stage",), drops)

        # -- archive -----------------------------------------------------------------
        archive = daemon["archive_state"]
        yield counter("archive_bytes_written", "bytes written to archive segments",
                      values=archive["counters"].get("bytes_written", 0))
        yield gauge("archive_lag_records", "records archived but not yet durable (fsynced)",
                    max(0, archive["next_seq"] - 1 - archive["durable_seq"]))
        yield gauge("archive_pending_records", "records waiting to be written (the disk is failing)",
                    archive["pending_records"])
        yield gauge("archive_ok", "1 while the archive is written, 0 while it fails", archive["state"] == "ok")
        yield counter("archive_fsyncs", "fsyncs of the archive", values=archive["counters"].get("fsyncs", 0))
        yield gauge("archive_fsync_longest_seconds", "the longest fsync of the archive (off the daemon's loop): a slow disk",
                    archive["counters"].get("fsync_longest_ms", 0) / 1000)

        # -- decisions and holds -----------------------------------------------------
        yield counter("decisions", "decided events (exec, open, change, side door, move), by verdict",
                      ("verdict",), {k[len("decisions_"):]: v for k, v in counters.items()
                                     if k.startswith("decisions_")})
        yield counter("violations", "violation records", values=counters.get("violations", 0))
        yield gauge("holds_pending", "holds waiting for an admin", snap["notify"]["pending"])
        yield counter("hold_records", "hold records, by state (pending, approval, approved, denied, "
                      "timed-out, abandoned)", ("state",),
                      {k[len("holds_"):]: v for k, v in counters.items() if k.startswith("holds_")})
        waits = _histogram_buckets(snap.get("hold_waits"))
        if waits:
            family = HistogramMetricFamily("agentwarden_hold_wait_seconds",
                                           "time from a hold's pending record to its decision")
            family.add_metric([], waits[0], waits[1])
            yield family

        # -- sessions: the supervisor and its fast path --------------------------------
        yield gauge("sessions", "sessions supervised now", supervisor.get("sessions", 0))
        yield counter("session_calls", "held-able syscalls of sessions the supervisor answered in "
                      "Python, by outcome", ("outcome",),
                      {k: supervisor.get(k, 0) for k in ("continued", "refused", "held", "unreadable")})
        handling = _histogram_buckets(supervisor.get("handling_histogram"))
        if handling:
            family = HistogramMetricFamily("agentwarden_session_round_trip_seconds",
                                           "a session's notification in the supervisor, readable to answered")
            family.add_metric([], handling[0], handling[1])
            yield family
        fast = supervisor.get("fast") if isinstance(supervisor.get("fast"), dict) else {}
        yield counter("fastpath_calls", "the compiled fast path's counters (answered in C, forwarded "
                      "to Python, ...)", ("counter",), fast)
        yield gauge("fastpath_running", "1 when the supervisor's compiled fast path runs",
                    supervisor.get("fast_path") == "running")

        # -- drift: changes of tracked files -------------------------------------------------
        drift = snap.get("drift") or {}
        yield counter("drift_changes", "changes of tracked files recorded, by where they were seen "
                      "(session: by the supervisor; outside: from the kernel's records)", ("source",),
                      {"session": supervisor.get("drift_changes", 0), "outside": drift.get("drift_changes", 0)})
        yield gauge("drift_expired_changes", "changes whose approval expired that no admin reverted or "
                    "accepted yet (agentwarden drift --expired)", drift.get("expired", 0))

        # -- health ------------------------------------------------------------------------
        last_seen = probe.get("last_seen") or 0
        age = (now_ns - last_seen) / 1e9 if last_seen else float("inf")
        lost = (snap.get("watch") or {}).get("state") == "lost"
        yield gauge("probe_up", "1 while the probe is heard from (a record in the last 5 s) and not lost",
                    1 if age < PROBE_SILENT_AFTER and not lost else 0)
        yield gauge("probe_last_heartbeat_age_seconds", "seconds since the daemon last heard from the probe",
                    age if last_seen else -1)
        yield gauge("probe_tagged_cgroups", "agent cgroups the probe watches", health.get("tagged_cgroups", 0))
        yield gauge("daemon_up", "1: the daemon answers (this scrape)", 1)
        yield gauge("daemon_start_time_seconds", "when the daemon started", daemon["started"] / 1e9)
        yield gauge("daemon_snapshot_age_seconds", "age of the snapshot this scrape reads",
                    (now_ns - snap["taken"]) / 1e9)
        yield counter("daemon_events", "events (exec, open, ...) the daemon archived",
                      values=counters.get("events", 0))


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # a scrape every 15 s is not news
        pass


class MetricsServer:
    """/metrics over HTTP from a thread; stop() closes it."""

    def __init__(self, listen: str, snapshot: Callable[[], dict | None]):
        try:
            from prometheus_client import CollectorRegistry, make_wsgi_app
        except ImportError:
            raise AgentwardenError("metrics_listen is set but python3-prometheus-client is not "
                                   "installed (apt install python3-prometheus-client)") from None
        host, port = settings_mod.parse_listen(listen)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Collector(snapshot))
        server_class = type("MetricsHTTPServer", (_ThreadingServer,),
                            {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
        try:
            self.httpd = make_server(host, port, make_wsgi_app(registry), server_class, _QuietHandler)
        except OSError as exc:
            hint = (" (the unit allows only AF_UNIX: add a drop-in with "
                    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6)") if exc.errno == errno.EAFNOSUPPORT else ""
            raise AgentwardenError(f"metrics_listen {listen}: cannot listen: "
                                   f"{exc.strerror or exc}{hint}") from None
        self.address = self.httpd.server_address
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        log.info("metrics at http://%s/metrics", listen)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
