"""Naming the hold that let an action through: the daemon's matching of the
supervisor's release records to the kernel's exec/open records, and the
order the pair guarantees (no root, no kernel)."""
from __future__ import annotations

import collections
import copy
import os

import pytest

from agentwarden import wire
from agentwarden.daemon.archive import read_records
from agentwarden.daemon.main import Daemon
from agentwarden.daemon.releases import Releases
from agentwarden.settings import Settings
from test_wire import RECORDS


def release(tid=4242, event="exec", path="/usr/bin/git", hold_id="h1-ab12", remembered=False,
            flags=os.O_WRONLY | os.O_TRUNC):
    return {**RECORDS["release"], "tid": tid, "event": event, "paths": [path], "hold_id": hold_id,
            "flags": flags if event == "open" else 0,
            "remembered": remembered, "syscall": {"exec": "execve", "open": "openat"}.get(event, "rename")}


def exec_record(tid=4242, filename="/usr/bin/git"):
    return {**copy.deepcopy(RECORDS["exec"]), "tid": tid, "filename": filename}


def open_record(tid=4242, path="/etc/app.conf", flags=os.O_WRONLY | os.O_TRUNC):
    return {**copy.deepcopy(RECORDS["open"]), "tid": tid, "path": path, "flags": flags}


def test_a_release_names_the_next_matching_record_of_its_thread_once():
    counters = collections.Counter()
    releases = Releases(counters)
    releases.note(release())
    releases.note(release(event="open", path="/etc/app.conf", hold_id="h2-cd34", remembered=True))
    other_thread, other_file = exec_record(tid=1), exec_record(filename="/usr/bin/ls")
    reading = open_record(flags=os.O_RDONLY)     # a read of the same file: not what was held
    for record in (other_thread, other_file, reading):
        releases.annotate(record)
        assert "hold_id" not in record and "remembered_from" not in record
    first, again = exec_record(), exec_record()
    releases.annotate(first)
    releases.annotate(again)
    assert first["hold_id"] == "h1-ab12" and "hold_id" not in again
    write = open_record()
    releases.annotate(write)
    assert write["remembered_from"] == "h2-cd34" and "hold_id" not in write
    assert counters["releases_matched"] == 2 and releases.count == 0 and not releases.pending


def test_identical_calls_pair_in_order_and_a_thread_exit_drops_what_it_never_made():
    counters = collections.Counter()
    releases = Releases(counters)
    for hold_id in ("h1-a", "h2-b", "h3-c"):
        releases.note(release(hold_id=hold_id))
    releases.note(release(event=None, path="/etc/x"))   # a rename: no kernel record to name
    records = [exec_record(), exec_record()]
    for record in records:
        releases.annotate(record)
    assert [r["hold_id"] for r in records] == ["h1-a", "h2-b"]
    releases.annotate({**RECORDS["exit"], "tid": 7, "pid": 4242})   # its leader, thread 7 last
    assert counters["releases_unmatched"] == 1 and releases.count == 0


def test_at_most_max_pending_wait(monkeypatch):
    monkeypatch.setattr("agentwarden.daemon.releases.MAX_PENDING", 3)
    counters = collections.Counter()
    releases = Releases(counters)
    for tid in range(5):
        releases.note({**release(tid=tid), "time": tid})
    assert releases.count == 3 and sorted(releases.pending) == [2, 3, 4]
    assert counters["releases_unmatched"] == 2


@pytest.fixture
def daemon(tmp_path):
    settings = Settings(run_dir=tmp_path / "run", state_dir=tmp_path / "state", policy_dir=tmp_path / "policy",
                        admin_group="")
    settings.policy_dir.mkdir()
    d = Daemon(settings)
    yield d
    d.archive.close()
    for sock in (d.pull, d.pub, d.control, d.release_channel):
        sock.close()
    d.release_channel.theirs.close()


def test_the_daemon_reads_the_supervisors_releases_before_the_next_message(daemon):
    """What the pair guarantees: a release sent before the call continued is
    queued before the probe can have recorded the call; the daemon reads the
    pair before each message, so it names the hold whatever ZeroMQ delivers first."""
    daemon.release_channel.theirs.send(wire.encode_batch("supervisor-releases", 0, [release()]))
    daemon.handle_message(wire.encode_batch("probe", 0, [exec_record()]))
    daemon.archive.flush()
    archived = [r for r in read_records(daemon.settings.archive_dir) if r["kind"] in ("release", "exec")]
    assert [r["kind"] for r in archived] == ["release", "exec"]
    assert archived[1]["hold_id"] == "h1-ab12"
