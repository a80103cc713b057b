"""The fleet's parts without NATS: signed decisions and admin key lists, the
outbox reader on a real archive (rotation, compression, a key), and the
collector's central archive (order, duplicates, gaps) as `log verify` sees it.
The whole path over a real cluster is in test_kernel_fleet.py."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest

from agentwarden import fleet
from agentwarden.archive.segments import read_items
from agentwarden.archive.verify import verify
from agentwarden.daemon.archive import ArchiveWriter
from agentwarden.daemon.fleet import OutboxReader
from agentwarden.daemon.fleet_collector import Collector
from agentwarden.settings import ArchiveSettings

KEY = bytes(range(32))


@pytest.fixture
def admins(tmp_path):
    lines = [fleet.generate_key(n, tmp_path / f"{n}.key") for n in ("alice", "bob")]
    fleet.generate_key("mallory", tmp_path / "mallory.key")
    listed = tmp_path / "admins"
    listed.write_text("# who may answer holds here\n" + "\n".join(lines) + "\n")
    return tmp_path, fleet.load_admin_keys(listed)


def test_a_host_accepts_decisions_signed_by_its_admins_only(admins):
    keys, accepted = admins
    alice = fleet.load_admin_key(keys / "alice.key")
    decision, name = fleet.verify_decision(fleet.sign_decision(alice, "web-1", "h1-ab", "approve", "ok"),
                                           accepted, "web-1")
    assert (name, decision.verdict, decision.hold_id, decision.reason) == ("alice", "approve", "h1-ab", "ok")

    def refused(raw, host="web-1", now=None):
        with pytest.raises(fleet.FleetError) as exc:
            fleet.verify_decision(raw, accepted, host, now)
        return str(exc.value)

    mallory = fleet.load_admin_key(keys / "mallory.key")
    assert "not in this host's fleet_admin_keys" in refused(fleet.sign_decision(mallory, "web-1", "h1-ab",
                                                                                "approve", None))
    assert "meant for host 'web-1'" in refused(fleet.sign_decision(alice, "web-1", "h1-ab", "deny", None),
                                               host="web-2")
    assert "older than" in refused(fleet.sign_decision(alice, "web-1", "h1-ab", "deny", None,
                                                       now=time.time() - 3600))
    # A changed decision (deny turned into approve) no longer matches its signature.
    outer = msgpack.unpackb(fleet.sign_decision(alice, "web-1", "h1-ab", "deny", None))
    payload = msgpack.unpackb(outer["payload"])
    forged = msgpack.packb({"payload": msgpack.packb({**payload, "verdict": "approve"}),
                            "signature": outer["signature"]})
    assert "does not match" in refused(forged)
    assert "not a signed decision" in refused(b"\x93garbage")


def test_admin_key_files_say_what_is_wrong_in_one_line(tmp_path):
    bad = tmp_path / "admins"
    bad.write_text("alice ssh-ed25519 AAAA\n")
    with pytest.raises(fleet.FleetError, match=r"admins:1: expected `NAME ed25519:BASE64`"):
        fleet.load_admin_keys(bad)
    assert fleet.load_admin_keys(tmp_path / "missing") == {}   # none configured: nothing accepted
    with pytest.raises(fleet.FleetError, match="is not an admin key"):
        (tmp_path / "x.key").write_text("nonsense")
        fleet.load_admin_key(tmp_path / "x.key")
    fleet.generate_key("alice", tmp_path / "a.key")
    with pytest.raises(fleet.FleetError, match="exists"):
        fleet.generate_key("alice", tmp_path / "a.key")
    creds = tmp_path / "creds.toml"
    creds.write_text('user = "web-1"\n')
    with pytest.raises(fleet.FleetError, match='needs user = "NAME" and password'):
        fleet.load_credentials(creds)


def test_fleet_settings_are_checked_in_one_line():
    from agentwarden import settings
    with pytest.raises(settings.ConfigError, match="fleet_url = 'http://nats:4222': .* must be nats://HOST:PORT"):
        settings.load(overrides=["fleet_url=http://nats:4222"], environ={})
    with pytest.raises(settings.ConfigError, match="fleet_admin_keys = 'admins': must be an absolute path"):
        settings.load(overrides=["fleet_admin_keys=admins"], environ={})
    loaded = settings.load(overrides=["fleet_url=nats://a:4222,nats://b:4222", "fleet_host=web-3"], environ={})
    assert fleet.servers(loaded.fleet_url) == ["nats://a:4222", "nats://b:4222"]
    assert loaded.fleet_name == "web-3" and loaded.fleet_credentials is None


def test_subjects_are_one_token_per_name():
    assert fleet.record_subject("web-1.example.com", "claude code", "exec") == \
        "aw.rec.web-1_example_com.claude_code.exec"
    assert fleet.record_subject("h", None, "health") == "aw.rec.h.-.health"
    assert fleet.records_filter(agent="a") == "aw.rec.*.a.*"


def write_archive(directory: Path, count: int) -> ArchiveWriter:
    """A keyed archive of count records in small segments, xz-compressed when sealed."""
    writer = ArchiveWriter(directory, ArchiveSettings(segment_bytes=4096, compress="xz"), KEY,
                           host="web-1", boot="boot")
    for i in range(count):
        writer.append({"kind": "gap", "time": i, "stage": "test", "count": i, "detail": "x" * 40})
        if i % 50 == 49:
            writer.sync()
    writer.sync()
    return writer


@dataclass
class Message:
    data: bytes
    subject: str = "aw.rec.web-1.-.gap"


def shipped_messages(archive: Path, start: int = 0) -> list[Message]:
    reader = OutboxReader(archive, start)
    out = []
    while batch := reader.read(64):
        out += [Message(fleet.Shipped("web-1", s.seq, s.body, s.chain, s.segment_header, s.head).encode())
                for s in batch]
    return out


def test_the_outbox_reads_every_durable_record_across_rotation_and_compression(tmp_path):
    writer = write_archive(tmp_path / "archive", 600)
    time.sleep(0.5)   # let the writer compress some sealed segments: the reader follows either way
    messages = shipped_messages(tmp_path / "archive")
    seqs = [fleet.decode_shipped(m.data).seq for m in messages]
    assert seqs == list(range(writer.durable_seq + 1))
    assert len({fleet.decode_shipped(m.data).segment_header for m in messages}) > 3
    # Not yet durable: not shipped.
    writer.append({"kind": "gap", "time": 0, "stage": "test", "count": 0, "detail": None})
    writer.flush()
    assert OutboxReader(tmp_path / "archive", writer.durable_seq + 1).read(10) == []
    writer.sync()
    [last] = OutboxReader(tmp_path / "archive", writer.durable_seq).read(10)
    assert last.seq == writer.durable_seq and last.head is not None
    # Resuming from any seq.
    assert [s.seq for s in OutboxReader(tmp_path / "archive", 123).read(3)] == [123, 124, 125]
    writer.close()


def test_the_central_archive_continues_the_hosts_chain_once_in_order(tmp_path):
    writer = write_archive(tmp_path / "archive", 400)
    messages = shipped_messages(tmp_path / "archive")
    # Out of order, and much of it twice (re-published after an outage).
    delivered = messages + random.Random(7).sample(messages, 150)
    random.Random(8).shuffle(delivered)
    collector = Collector(tmp_path / "central", gap_wait=3600)
    acked = []
    for i in range(0, len(delivered), 37):
        acked += collector.take(delivered[i:i + 37])
    assert len(acked) == len(delivered) and collector.counters["duplicates"] == 150
    collector.close()
    central = tmp_path / "central" / "web-1"
    report = verify(central, KEY)
    assert report.ok, report.problem
    assert report.last_seq == writer.durable_seq and report.keyed
    local = {i.seq: i.chain for i in read_items(tmp_path / "archive")}
    assert {i.seq: i.chain for i in read_items(central)} == local
    assert not verify(central, bytes(32)).ok   # the host's key, not any key
    writer.close()


def test_a_gap_in_the_central_archive_names_the_missing_records(tmp_path):
    writer = write_archive(tmp_path / "archive", 300)
    messages = [m for m in shipped_messages(tmp_path / "archive")
                if not 200 <= fleet.decode_shipped(m.data).seq <= 209]
    collector = Collector(tmp_path / "central", gap_wait=0)
    collector.take(messages[:200])
    # Seq 210 on waits while 200..209 may still come; with gap_wait over, it is written.
    collector.take(messages[200:])
    assert collector.counters["gaps"] == 1 and collector.counters["missing"] == 10
    collector.close()
    report = verify(tmp_path / "central" / "web-1", KEY)
    assert not report.ok and "200..209" in str(report.problem)
    writer.close()


def test_a_host_cannot_write_another_hosts_central_archive(tmp_path):
    """NATS keeps host web-2 to aw.rec.web-2.>; a record claiming web-1 there is refused."""
    writer = write_archive(tmp_path / "archive", 20)
    messages = shipped_messages(tmp_path / "archive")
    collector = Collector(tmp_path / "central")
    acked = collector.take([Message(m.data, subject="aw.rec.web-2.-.gap") for m in messages])
    assert len(acked) == 20 and collector.counters["malformed"] == 20
    assert not (tmp_path / "central" / "web-1").exists()
    collector.close()
    writer.close()


def test_fleet_status_line():
    from agentwarden import render
    line = render.fleet_status({"connected": False, "url": "nats://n1:4222", "host": "web-3", "acked_seq": 41,
                                "lag": 7, "pending_holds": 1, "skipped": 0, "last_error": "publishing: TimeoutError"})
    assert line == ("NOT CONNECTED to nats://n1:4222 as web-3, acknowledged up to seq 41, lag 7 records, "
                    "1 holds published; last error: publishing: TimeoutError")


def test_a_collector_restarted_mid_segment_goes_on_where_it_stopped(tmp_path):
    writer = write_archive(tmp_path / "archive", 200)
    messages = shipped_messages(tmp_path / "archive")
    first = Collector(tmp_path / "central")
    first.take(messages[:77])
    first.close()
    # What it had written comes again (never acknowledged), then the rest.
    second = Collector(tmp_path / "central")
    second.take(messages[70:])
    assert second.counters["duplicates"] == 7
    second.close()
    assert verify(tmp_path / "central" / "web-1", KEY).ok
    writer.close()


def test_the_collector_says_once_it_cannot_reach_nats_and_stops_on_sigterm_while_connecting(tmp_path):
    """No NATS server on the port: one line saying so (not a traceback per retry),
    and SIGTERM ends it at once, with the archive directory untouched."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    with socket.socket() as s:   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    creds = tmp_path / "collector.creds.toml"
    creds.write_text('user = "collector"\npassword = "secret"\n')
    (tmp_path / "config.toml").write_text("")   # not the host's config
    env = {**os.environ, "AGENTWARDEN_CONFIG": str(tmp_path / "config.toml")}
    proc = subprocess.Popen([sys.executable, "-m", "agentwarden", "fleet", "archive", "--dir", str(tmp_path / "central"),
                             "--url", f"nats://127.0.0.1:{port}", "--credentials", str(creds)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)   # several reconnect tries (every 0.5 s)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=5)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and not out
    assert err.count("cannot reach") == 1, err
    assert "stopped before it could connect" in err
    assert not (tmp_path / "central").exists() or not any((tmp_path / "central").iterdir())


def test_the_permissions_in_docs_fleet_md_are_those_the_tests_run():
    """docs/fleet.md shows each role's NATS permissions; tests/fleet_cluster.py
    makes the servers the tests prove them on: the same subjects."""
    import re

    import fleet_cluster
    text = (Path(__file__).resolve().parent.parent / "docs" / "fleet.md").read_text()

    def subjects(block: str) -> dict[str, set[str]]:
        return {kind: set(re.findall(r'"([^"]+)"', found))
                for kind, found in re.findall(r"(publish|subscribe): \{ allow: \[(.*?)\] \}", block, re.S)}
    for user, made in (("web-3", fleet_cluster.host_permissions("web-3")),
                       ("alice", fleet_cluster.admin_permissions("alice")),
                       ("collector", fleet_cluster.collector_permissions("collector"))):
        shown = text[text.index(f'{{ user: "{user}"'):]
        shown = shown[:shown.find("{ user:", 1)]   # up to the next user (the last: to the end)
        assert subjects(shown) == subjects(made), user
