"""daemon/metrics.py in process: the histogram that travels in health records,
a real HTTP server on 127.0.0.1 scraped with urllib and parsed by the Prometheus
client's own parser, and the one-line errors. The kernel test
test_kernel_observability.py scrapes a real daemon after a real workload."""
from __future__ import annotations

import socket
import urllib.request

import pytest

from agentwarden import settings
from agentwarden.daemon.metrics import HOLD_WAIT_BUCKETS, Buckets, MetricsServer
from agentwarden.errors import AgentwardenError

pytest.importorskip("prometheus_client")   # Debian's python3-prometheus-client (scripts/setup.sh)
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


def snapshot(**over) -> dict:
    waits = Buckets(HOLD_WAIT_BUCKETS)
    for seconds in (0.5, 1.0, 7.0, 4000.0):
        waits.observe(seconds)
    base = {
        "taken": 1_796_000_000_000_000_000,
        "daemon": {"started": 1_795_999_000_000_000_000,
                   "counters": {"records_exec": 5, "records_open": 9, "events": 14, "messages": 3,
                                "decisions_allow": 12, "decisions_violation": 2, "violations": 2,
                                "holds_pending": 1, "holds_approved": 1},
                   "archive_state": {"counters": {"bytes_written": 4096, "fsyncs": 2}, "next_seq": 30,
                                     "durable_seq": 25, "pending_records": 0, "state": "ok"}},
        "probe": {"last_seen": 1_796_000_000_000_000_000 - 10**9,
                  "health": {"kernel_emitted": {"exec": 5, "open": 9}, "kernel_dropped": {"exec": 0, "open": 1},
                             "decoded": 14, "records_sent": 14, "decode_errors": 0, "backlog": 0,
                             "tagged_cgroups": 2, "kernel_fd_skipped": 40}},
        "drops": {"kernel": 1},
        "sessions": {"sessions": 1, "continued": 4, "refused": 1, "held": 1, "unreadable": 0,
                     "handling_histogram": {"bounds": [0.001, 0.01], "counts": [3, 2, 1], "sum": 0.5},
                     "fast_path": "running", "fast": {"answered": 7, "forwarded": 2}},
        "watch": {"state": "watching"},
        "notify": {"pending": 1},
        "hold_waits": waits.export(),
    }
    base.update(over)
    return base


def scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        body = response.read().decode()
    return {s.name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items())) + "}" if s.labels else ""):
            s.value for family in text_string_to_metric_families(body) for s in family.samples}


def test_buckets_count_each_observation_once_at_its_upper_bound():
    b = Buckets((1.0, 5.0))
    for seconds in (0.2, 1.0, 1.1, 5.0, 9.0):
        b.observe(seconds)
    assert b.export() == {"bounds": [1.0, 5.0], "counts": [2, 2, 1], "sum": pytest.approx(16.3)}


def test_a_scrape_reads_the_snapshot():
    current = {"snap": None}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = MetricsServer(f"127.0.0.1:{port}", lambda: current["snap"])
    try:
        url = f"http://127.0.0.1:{server.address[1]}/metrics"
        assert not [k for k in scrape(url) if k.startswith("agentwarden_")]   # no snapshot yet: nothing
        current["snap"] = snapshot()
        m = scrape(url)
        assert m['agentwarden_daemon_records_total{kind="exec"}'] == 5
        assert m['agentwarden_decisions_total{verdict="violation"}'] == 2
        assert m['agentwarden_hold_records_total{state="approved"}'] == 1 and m["agentwarden_holds_pending"] == 1
        assert m['agentwarden_kernel_dropped_records_total{kind="open"}'] == 1
        assert m["agentwarden_kernel_fd_records_skipped_total"] == 40
        assert m['agentwarden_dropped_records_total{stage="kernel"}'] == 1
        assert m['agentwarden_dropped_records_total{stage="transport"}'] == 0   # every stage, 0 until a loss
        assert m["agentwarden_archive_lag_records"] == 4 and m["agentwarden_archive_bytes_written_total"] == 4096
        assert (m['agentwarden_hold_wait_seconds_bucket{le="1.0"}'], m['agentwarden_hold_wait_seconds_bucket{le="15.0"}'],
                m['agentwarden_hold_wait_seconds_bucket{le="+Inf"}'], m["agentwarden_hold_wait_seconds_count"]) == (2, 3, 4, 4)
        assert m['agentwarden_session_round_trip_seconds_bucket{le="0.01"}'] == 5
        assert m["agentwarden_session_round_trip_seconds_sum"] == 0.5
        assert m['agentwarden_session_calls_total{outcome="held"}'] == 1
        assert m['agentwarden_fastpath_calls_total{counter="answered"}'] == 7
        assert m["agentwarden_probe_up"] == 0   # the snapshot's probe record is years old by now
        current["snap"] = snapshot(watch={"state": "lost"})
        assert scrape(url)["agentwarden_probe_up"] == 0
    finally:
        server.stop()


def test_one_line_errors():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(AgentwardenError, match=rf"^metrics_listen 127.0.0.1:{port}: cannot listen: "
                                                   "Address already in use$"):
            MetricsServer(f"127.0.0.1:{port}", lambda: None)
    for bad in ("9464", "localhost", "127.0.0.1:0x10", "127.0.0.1:70000", "[::1:9464"):
        with pytest.raises(settings.ConfigError, match=r'metrics_listen = .*: must be "HOST:PORT"'):
            settings.load(config="/dev/null", overrides=[f"metrics_listen={bad}"], environ={})
    assert settings.load(config="/dev/null", overrides=["metrics_listen=[::1]:9464"], environ={}).metrics_listen == "[::1]:9464"
