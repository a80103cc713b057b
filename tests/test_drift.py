"""Drift without a kernel: the policy's `files.track` and `change-ttl` (and
their errors with file and line), the content-addressed store (dedup, size
limit, atomic 0600 files), observations, the states of a change by table,
reverting in a real directory (bytes, mode, absence; symlinks and
directories refused, nothing written), diffs, the listing with baselines,
and how an expired change reaches the hooks and the journal."""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from agentwarden import drift, render
from agentwarden import policy as policy_mod
from agentwarden.settings import Settings
from conftest import wait_for
from daemon import drift as daemon_drift
from daemon import notify
from hooks import received, recorder

NS = 1_000_000_000


def load(tmp_path: Path, body: str) -> policy_mod.PolicySet:
    (tmp_path / "p.toml").write_text('[agent.coder]\nmode = "enforce"\non-violation = "kill"\n' + body)
    return policy_mod.load_policy([tmp_path / "p.toml"])


# ---- the policy ---------------------------------------------------------------------

def test_track_and_change_ttl_in_the_policy(tmp_path):
    plain = load(tmp_path, '[agent.coder.files]\nwrite-allow = ["/srv/**"]\n')
    coder = plain.agents["coder"]
    assert coder.tracks("/etc/nginx/nginx.conf") and coder.tracks("/etc")   # the default: /etc/**
    assert not coder.tracks("/srv/app.ini") and coder.change_ttl is None
    given = load(tmp_path, 'change-ttl = "7d"\n[agent.coder.files]\nwrite-allow = ["/srv/**"]\n'
                           'track = ["/srv/conf/**", "/opt/app/*.ini"]\n')
    coder = given.agents["coder"]
    assert coder.tracks("/srv/conf/a/b.yml") and coder.tracks("/opt/app/x.ini")
    assert not coder.tracks("/etc/hosts") and not coder.tracks("/opt/app/sub/x.ini")
    assert coder.change_ttl == 7 * 86400
    assert given.hash != plain.hash
    # A policy that says nothing of either keeps the hash it had before drift existed.
    assert load(tmp_path, '[agent.coder.files]\nwrite-allow = ["/srv/**"]\n').hash == plain.hash
    seconds = load(tmp_path, 'change-ttl = 90\n[agent.coder.files]\nwrite-allow = ["/srv/**"]\n')
    assert seconds.agents["coder"].change_ttl == 90


@pytest.mark.parametrize("body, line, message", [
    ('change-ttl = "soon"\n[agent.coder.files]\nwrite-allow = ["/a/**"]\n', 4,
     'change-ttl must be a positive duration (e.g. "7d", "12h", or seconds), not "soon"'),
    ('change-ttl = 0\n[agent.coder.files]\nwrite-allow = ["/a/**"]\n', 4, "change-ttl must be a positive"),
    ('[agent.coder.files]\nwrite-allow = ["/a/**"]\ntrack = ["relative/**"]\n', 6, "bad rule in files.track"),
    ('[agent.coder.files]\nwrite-allow = ["/a/**"]\ntrack = "/etc/**"\n', 6,
     'files.track must be a list of strings, not "/etc/**"'),
    ('[agent.coder.files]\nwrite-allow = ["/a/**"]\ntrack = [\n  "/etc/**",\n  7,\n]\n', 6,
     "files.track holds 7: rules are strings"),   # not a string: the key's line
    ('[agent.coder.files]\nwrite-allow = ["/a/**"]\ntrack = [\n  "/etc/**",\n  "etc/x",\n]\n', 8,
     'bad rule in files.track: "etc/x"'),
])
def test_bad_track_and_change_ttl_are_named_with_file_and_line(tmp_path, body, line, message):
    with pytest.raises(policy_mod.PolicyError) as caught:
        load(tmp_path, body)
    problem = caught.value.problems[0]
    assert (problem.line, problem.file) == (line, tmp_path / "p.toml"), str(problem)
    assert message in problem.message


# ---- the store ------------------------------------------------------------------------

def test_the_store_keeps_each_content_once_0600_and_only_hashes_past_its_limit(tmp_path):
    store = drift.Store(tmp_path / "drift", max_bytes=100)
    first = store.put(b"a" * 50)
    assert store.put(b"a" * 50) == first == hashlib.sha256(b"a" * 50).hexdigest()
    objects = [p for p in (tmp_path / "drift" / "objects").rglob("*") if p.is_file()]
    assert len(objects) == 1 and stat.S_IMODE(objects[0].stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "drift" / "objects").stat().st_mode) == 0o700
    assert not [p for p in (tmp_path / "drift").rglob(".*tmp")]   # no temporary left
    small, big = tmp_path / "small", tmp_path / "big"
    small.write_bytes(b"x" * 100)
    big.write_bytes(b"y" * 101)
    seen_small, seen_big = drift.observe(str(small), store), drift.observe(str(big), store)
    assert seen_small["stored"] and store.get(seen_small["sha256"]) == b"x" * 100
    assert not seen_big["stored"] and seen_big["sha256"] == hashlib.sha256(b"y" * 101).hexdigest()
    with pytest.raises(drift.DriftError, match="is missing"):
        store.get(seen_big["sha256"])
    store.path(first).write_bytes(b"b" * 50)
    with pytest.raises(drift.DriftError, match="is corrupted: its content hashes to sha256:"):
        store.get(first)
    with pytest.raises(drift.DriftError, match="is not a sha256"):
        store.get("../../etc/passwd")


def test_observe_never_follows_the_last_symlink(tmp_path):
    (tmp_path / "real").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "dir").mkdir()
    assert drift.observe(str(tmp_path / "link")) == {
        "kind": "symlink", "target": str(tmp_path / "real"), **{k: v for k, v in drift.observe(
            str(tmp_path / "link")).items() if k in ("mode", "uid", "gid")}}
    assert drift.observe(str(tmp_path / "dir"))["kind"] == "directory"
    assert drift.observe(str(tmp_path / "none")) == {"kind": "absent"}


# ---- states ---------------------------------------------------------------------------

FILE_A = {"kind": "file", "sha256": "a" * 64, "size": 1, "mode": 0o644, "uid": 0, "gid": 0}
FILE_B = {**FILE_A, "sha256": "b" * 64}


@pytest.mark.parametrize("change, now, at, expected", [
    ({"after": FILE_A}, FILE_A, 5, "active"),
    ({"after": FILE_A, "expires": 10}, FILE_A, 5, "active"),
    ({"after": FILE_A, "expires": 10}, FILE_A, 10, "expired"),
    ({"after": FILE_A, "expires": 10}, FILE_B, 20, "diverged"),            # somebody changed it since
    ({"after": FILE_A}, {**FILE_A, "mode": 0o600}, 5, "diverged"),        # a chmod is a change too
    ({"after": FILE_A, "admin": {"state": "accepted"}}, FILE_B, 20, "accepted"),
    ({"after": FILE_A, "admin": {"state": "reverted"}}, FILE_B, 20, "reverted"),
    ({"after": None, "expires": 10}, None, 20, "expired"),                # still being written
    ({"after": {"kind": "absent"}}, {"kind": "absent"}, 5, "active"),
])
def test_the_state_of_a_change(change, now, at, expected):
    assert drift.state(change, now, at) == expected


# ---- reverting ------------------------------------------------------------------------

def recorded(tmp_path: Path, store: drift.Store, path: Path, edit) -> dict:
    before = drift.observe(str(path), store)
    edit()
    return {"id": drift.new_id(), "path": str(path), "before": before,
            "after": drift.observe(str(path), store), "admin": None}


def test_revert_restores_bytes_mode_and_absence_and_refuses_what_it_must(tmp_path):
    store = drift.Store(tmp_path / "drift", 1 << 20)
    target = tmp_path / "app.conf"
    target.write_bytes(b"debug=false\n")
    target.chmod(0o640)
    change = recorded(tmp_path, store, target, lambda: (target.write_bytes(b"debug=true\n"), target.chmod(0o666)))
    now = drift.revert(store, change, force=False)
    assert target.read_bytes() == b"debug=false\n" and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert drift.same(now, change["before"])
    assert [p.name for p in tmp_path.iterdir() if "aw-revert" in p.name] == []

    created = tmp_path / "new.conf"
    change = recorded(tmp_path, store, created, lambda: created.write_text("x"))
    drift.revert(store, change, force=False)
    assert not created.exists()

    # Diverged: refused unless forced.
    change = recorded(tmp_path, store, target, lambda: target.write_bytes(b"debug=true\n"))
    target.write_bytes(b"debug=maybe\n")
    with pytest.raises(drift.DriftError, match="diverged: it changed since"):
        drift.revert(store, change, force=False)
    assert target.read_bytes() == b"debug=maybe\n"
    drift.revert(store, change, force=True)
    assert target.read_bytes() == b"debug=false\n"

    # Now a symlink, or a directory: refused even with --force, nothing written.
    change = recorded(tmp_path, store, target, lambda: target.write_bytes(b"debug=true\n"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("keep")
    target.unlink()
    target.symlink_to(elsewhere)
    with pytest.raises(drift.DriftError, match=f"is now a symlink \\(to {elsewhere}\\); not followed"):
        drift.revert(store, change, force=True)
    assert elsewhere.read_text() == "keep" and target.is_symlink()
    target.unlink()
    target.mkdir()
    with pytest.raises(drift.DriftError, match="is now a directory; nothing written"):
        drift.revert(store, change, force=True)

    # Content larger than the store keeps: the hash alone, not restorable.
    small = drift.Store(tmp_path / "small", max_bytes=4)
    big = tmp_path / "big"
    big.write_bytes(b"0123456789")
    change = recorded(tmp_path, small, big, lambda: big.write_bytes(b"x"))
    with pytest.raises(drift.DriftError, match="only the hash of the before content was kept"):
        drift.revert(small, change, force=False)
    assert big.read_bytes() == b"x"


def test_a_diff_for_text_sizes_and_hashes_for_binary(tmp_path):
    store = drift.Store(tmp_path / "drift", 1 << 20)
    path = tmp_path / "f"
    path.write_text("a\nb\n")
    before = drift.observe(str(path), store)
    path.write_text("a\nc\n")
    after = drift.observe(str(path), store)
    lines = drift.diff(store, str(path), before, after)
    assert "-b" in lines and "+c" in lines and " a" in lines
    path.write_bytes(b"\0\1")
    binary = drift.diff(store, str(path), before, drift.observe(str(path), store))
    assert binary[-1] == "(binary, or content not kept: sizes and hashes only)"


def test_listing_filters_and_shows_baselines_that_changed(tmp_path):
    index = drift.Index(tmp_path / "drift")
    conf = tmp_path / "c"
    conf.write_text("1")
    facts = drift.observe(str(conf))
    index.save({"id": "c-0000000001", "time": 10 * NS, "path": str(conf), "agent": "coder", "source": "session",
                "before": {"kind": "absent"}, "after": facts, "expires": 20 * NS, "admin": None})
    index.save({"id": "c-0000000002", "time": 30 * NS, "path": str(conf), "agent": "other", "source": "session",
                "before": facts, "after": facts, "expires": None, "admin": {"state": "accepted", "name": "root"}})
    rows = drift.listing(index, now_ns=25 * NS)
    assert [(r["id"], r["state"]) for r in rows] == [("c-0000000001", "expired"), ("c-0000000002", "accepted")]
    assert [r["id"] for r in drift.listing(index, agent="coder", now_ns=25 * NS)] == ["c-0000000001"]
    assert [r["id"] for r in drift.listing(index, since_ns=20 * NS, now_ns=25 * NS)] == ["c-0000000002"]
    assert [r["id"] for r in drift.listing(index, expired_only=True, now_ns=25 * NS)] == ["c-0000000001"]
    hosts = tmp_path / "hosts"
    hosts.write_text("a\n")
    index.save_baseline({"id": "c-b", "time": 5 * NS, "path": str(hosts), "before": drift.observe(str(hosts))})
    assert len(drift.listing(index, now_ns=25 * NS)) == 2   # as recorded: not listed
    hosts.write_text("b\n")
    [row] = [r for r in drift.listing(index, now_ns=25 * NS) if r["path"] == str(hosts)]
    assert row["state"] == "diverged" and row["id"].startswith("b-")
    assert drift.find(index, row["id"])["path"] == str(hosts)
    line = render.drift_row(row)
    assert f"{row['id']}  diverged  {hosts}  outside sessions" in line


# ---- expiry reported ------------------------------------------------------------------

def test_an_expired_change_reaches_the_command_and_the_journal_fields(tmp_path):
    record = daemon_drift.record_of(
        {"id": "c-1a2b3c4d5e", "path": "/etc/app.conf", "agent": "coder", "session": "s-1", "person": "alice",
         "task": "tune", "syscalls": ["rename"], "hold_id": "h2-ab12", "approvers": ["root"],
         "reason": "try it", "policy_hash": "sha256:x", "source": "session", "before": FILE_A,
         "after": FILE_B, "expires": 10 * NS, "admin": None}, "expired", 11 * NS)
    alerts = notify.HoldAlerts(Settings(notify_command=str(recorder(tmp_path))), host="testhost",
                               journal_socket=str(tmp_path / "no-journal"))
    alerts.hold(record)
    [got] = wait_for(lambda: received(tmp_path / "out.jsonl"), what="the delivery")
    assert got["kind"] == "drift" and got["change_id"] == "c-1a2b3c4d5e" and got["host"] == "testhost"
    assert got["text"].startswith("agentwarden on testhost: change c-1a2b3c4d5e expired: /etc/app.conf by "
                                  "agent coder (for alice, task tune) [rename] sha256:aaaaaaaa -> sha256:bbbbbbbb; "
                                  "hold h2-ab12 approved by root: try it; expires ")
    assert got["text"].endswith("review it: agentwarden drift show c-1a2b3c4d5e")
    assert len(alerts.pending) == 0   # not a hold
    alerts.close()
    fields = notify.journal_fields(record, render.alert_text(record))
    assert fields["AGENTWARDEN_RECORD"] == "drift" and fields["PRIORITY"] == "4"
    assert fields["AGENTWARDEN_CHANGE_ID"] == "c-1a2b3c4d5e" and fields["AGENTWARDEN_PATH"] == "/etc/app.conf"
    expired = daemon_drift.ExpiredChanges()
    expired.update(record)
    assert "1 expired change to review (oldest c-1a2b3c4d5e of /etc/app.conf" in expired.summary()
    expired.update({**record, "state": "reverted"})
    assert len(expired) == 0 and expired.summary() == ""


def test_index_entries_are_atomic_0600_and_ids_are_checked(tmp_path):
    index = drift.Index(tmp_path / "drift")
    index.save({"id": "c-0000000001", "time": 1, "path": "/x"})
    entry = tmp_path / "drift" / "changes" / "c-0000000001.json"
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    for bad in ("../x", ".hidden", ""):
        with pytest.raises(drift.DriftError, match="ids look like"):
            index.load(bad)
    with pytest.raises(drift.DriftError, match="no change 'c-9'"):
        index.load("c-9")
    assert os.listdir(tmp_path / "drift" / "changes") == ["c-0000000001.json"]


def test_outside_sessions_a_write_is_kept_when_its_writer_closes_the_fd(tmp_path):
    """The daemon's capture from the kernel's records (records as the daemon
    has them, resolved), here fed by hand: before is the baseline, after is
    taken at the writer's close; a session's own records are the supervisor's."""
    settings = Settings(state_dir=tmp_path / "state")
    emitted: list[dict] = []
    capture = daemon_drift.OutsideCapture(settings, emitted.append)
    coder = load(tmp_path, f'[agent.coder.files]\nwrite-allow = ["/**"]\ntrack = ["{tmp_path}/etc/**"]\n'
                 ).agents["coder"]
    conf = tmp_path / "etc" / "pool.conf"
    conf.parent.mkdir()
    conf.write_text("size=4\n")
    capture.index.save_baseline({"id": "c-base", "time": 1, "path": str(conf),
                                 "before": drift.observe(str(conf), capture.store)})
    task = {"time": 5, "pid": 42, "agent": "coder", "session": "coder-1"}
    opened = {**task, "kind": "open", "syscall": "openat", "resolved_path": str(conf),
              "flags": os.O_WRONLY | os.O_APPEND, "ret": 3}
    assert capture.wants(opened) and not capture.wants({**opened, "flags": os.O_RDONLY})
    capture.event(opened, coder, False, "sha256:p")
    conf.write_text("size=4\nsize=64\n")
    closed = {**task, "kind": "fd", "syscall": "close", "fd": 3, "arg": 0, "ret": 0}
    assert capture.wants(closed)
    capture.event(closed, coder, False, "sha256:p")
    [record] = emitted
    assert record["state"] == "changed" and record["source"] == "outside" and record["agent"] == "coder"
    assert record["before"]["sha256"] == hashlib.sha256(b"size=4\n").hexdigest()
    assert record["after"]["sha256"] == hashlib.sha256(b"size=4\nsize=64\n").hexdigest()
    assert "+size=64" in drift.diff(capture.store, str(conf), record["before"], record["after"])
    # Under a `run` session, an untracked path, a failed open: nothing here.
    capture.event({**opened, "ret": 4}, coder, True, "sha256:p")
    capture.event({**opened, "resolved_path": str(tmp_path / "other"), "ret": 5}, coder, False, "sha256:p")
    capture.event({**opened, "ret": -13}, coder, False, "sha256:p")
    assert not capture.writing and len(emitted) == 1
    # A change call is kept at once: an unlink leaves the file absent.
    conf.unlink()
    capture.event({**task, "kind": "change", "syscall": "unlinkat", "resolved_path": str(conf), "ret": 0},
                  coder, False, "sha256:p")
    assert emitted[-1]["after"] == {"kind": "absent"} and emitted[-1]["syscalls"] == ["unlinkat"]


def test_a_session_change_keeps_its_first_before_and_the_first_approval(tmp_path):
    """The supervisor's capture (its calls as reader.Request has them): a
    write then an approved rename of the same file in one session is one
    change, with the content before the first and the approval of the second;
    a temporary file created and renamed away leaves nothing."""
    from types import SimpleNamespace
    from daemon.supervisor.reader import Request
    settings = Settings(state_dir=tmp_path / "state")
    emitted: list[dict] = []
    capture = daemon_drift.SessionCapture(settings, emitted.append)
    coder = load(tmp_path, f'change-ttl = "1h"\n[agent.coder.files]\nwrite-allow = ["/**"]\n'
                           f'track = ["{tmp_path}/etc/**"]\n').agents["coder"]
    conf, temp = tmp_path / "etc" / "app.conf", tmp_path / "etc" / "sedX"
    conf.parent.mkdir()
    conf.write_text("mode=safe\n")
    session = SimpleNamespace(id="s-1", agent="coder", on_behalf_of="alice", user="root", task="tune")

    def request(syscall, *paths):
        return Request(syscall, ("file", syscall, paths), [
            {"kind": "open", "resolved_path": str(p), "flags": os.O_WRONLY | os.O_CREAT} for p in paths],
            None, syscall=syscall)

    capture.before(session, coder, request("openat", conf), policy_hash="sha256:p")   # allowed
    conf.write_text("mode=fast\n")
    capture.before(session, coder, request("openat", temp), policy_hash="sha256:p")
    temp.write_text("mode=fastest\n")
    hold = SimpleNamespace(id="h2-ab12", approvals={0: {"name": "root", "reason": "try it"}},
                           policy_hash="sha256:p", change_expires=2.0)
    capture.before(session, coder, request("rename", temp, conf), hold)
    temp.rename(conf)
    assert [r for r in drift.listing(capture.index) if r["after"] is None]   # listed while being made
    capture.session_ended(session)
    [record] = emitted
    assert record["path"] == str(conf) and record["syscalls"] == ["openat", "rename"]
    assert record["before"]["sha256"] == hashlib.sha256(b"mode=safe\n").hexdigest()
    assert record["after"]["sha256"] == hashlib.sha256(b"mode=fastest\n").hexdigest()
    assert record["hold_id"] == "h2-ab12" and record["approvers"] == ["root"] and record["reason"] == "try it"
    assert 0 < record["expires"] - record["time"] <= 2 * NS   # from the approval: --expires beats change-ttl
    assert capture.counters["drift_transient"] == 1 and [r["path"] for r in drift.listing(capture.index)] == [
        str(conf)]
    capture.expire(record["expires"])
    assert emitted[-1]["state"] == "expired" and capture.counters["drift_expired"] == 1
    capture.expire(record["expires"] + NS)
    assert len(emitted) == 2   # reported once


def test_a_revert_is_granted_to_one_process_and_archived_once_the_file_is_as_before(tmp_path):
    """The supervisor's side of `drift revert`: it checks and grants (nothing
    written), the admin's process writes, then reports; only a report from the
    same pid and uid with the file as before is archived. A grant whose
    process never reported lapses: archived (unreported) if the file is as
    before, else forgotten. A failed revert archives nothing."""
    from types import SimpleNamespace
    from daemon.supervisor.reader import Request
    settings = Settings(state_dir=tmp_path / "state")
    emitted: list[dict] = []
    capture = daemon_drift.SessionCapture(settings, emitted.append)
    coder = load(tmp_path, f'[agent.coder.files]\nwrite-allow = ["/**"]\ntrack = ["{tmp_path}/etc/**"]\n'
                 ).agents["coder"]
    (tmp_path / "etc").mkdir()
    session = SimpleNamespace(id="s-1", agent="coder", on_behalf_of="", user="root", task="", cgroup=tmp_path)
    changes = {}
    for name in ("a.conf", "b.conf", "c.conf"):
        path = tmp_path / "etc" / name
        path.write_text("old\n")
        capture.before(session, coder, Request("openat", ("file", "openat", (str(path),)), [
            {"kind": "open", "resolved_path": str(path), "flags": os.O_WRONLY | os.O_TRUNC}], None,
            syscall="openat"))
        path.write_text("new\n")
    capture.session_ended(session)
    for record in emitted:
        changes[Path(record["path"]).name] = record["change_id"]
    root = {"uid": 0, "name": "root", "reason": "undo", "time": 1}
    a = tmp_path / "etc" / "a.conf"

    granted = capture.grant_revert(changes["a.conf"], False, root, pid=4242)
    assert a.read_text() == "new\n"   # checked, not written
    with pytest.raises(drift.DriftError, match="is being reverted by root .pid 4242"):
        capture.grant_revert(changes["a.conf"], False, root, pid=4343)
    with pytest.raises(drift.DriftError, match="is being reverted"):
        capture.accept(changes["a.conf"], root)
    with pytest.raises(drift.DriftError, match="no revert was granted to this process"):
        capture.reverted(granted["token"], 4343, 0, None)   # another process
    with pytest.raises(drift.DriftError, match="no revert was granted to this process"):
        capture.reverted(granted["token"], 4242, 1000, None)   # another user
    with pytest.raises(drift.DriftError, match="is not as before .* not archived as reverted"):
        capture.reverted(granted["token"], 4242, 0, None)   # says done, but wrote nothing
    granted = capture.grant_revert(changes["b.conf"], False, root, pid=4242)
    drift.revert(capture.store, granted["change"], False)
    done = capture.reverted(granted["token"], 4242, 0, None)
    assert done["admin"]["state"] == "reverted" and emitted[-1]["state"] == "reverted"
    assert emitted[-1]["change_id"] == changes["b.conf"] and emitted[-1]["admin"]["name"] == "root"

    # Failed: nothing archived. Lapsed: the written one archived, unreported.
    count = len(emitted)
    granted = capture.grant_revert(changes["c.conf"], False, root, pid=4242)
    assert capture.reverted(granted["token"], 4242, 0, "cannot write: Read-only file system")["admin"] is None
    assert len(emitted) == count
    granted = capture.grant_revert(changes["c.conf"], False, root, pid=4242)
    drift.revert(capture.store, granted["change"], False)
    capture.tick()
    assert len(emitted) == count   # not yet lapsed
    [grant] = capture.grants.values()
    grant["until"] -= daemon_drift.REVERT_GRANT_SECONDS + 1
    capture.tick()
    assert emitted[-1]["state"] == "reverted" and emitted[-1]["change_id"] == changes["c.conf"]
    assert emitted[-1]["admin"]["unreported"] is True and not capture.grants


def test_without_openat2_the_directory_is_walked_without_following_symlinks(tmp_path):
    """Where a seccomp filter bars openat2 (systemd-nspawn's: ENOSYS), the
    parent is opened one component at a time with O_NOFOLLOW: the same
    directory, and the same refusal of a symlink on the way."""
    from agentwarden.drift import restore
    (tmp_path / "real" / "etc").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "file").write_text("x")
    fd = restore._walk(str(tmp_path / "real" / "etc"))
    try:
        assert os.path.samestat(os.fstat(fd), os.stat(tmp_path / "real" / "etc"))
    finally:
        os.close(fd)
    with pytest.raises(drift.DriftError, match="passes through a symlink; not followed, nothing written"):
        restore._walk(str(tmp_path / "link" / "etc"))
    with pytest.raises(drift.DriftError, match="Not a directory; nothing written"):
        restore._walk(str(tmp_path / "file" / "etc"))
    with pytest.raises(drift.DriftError, match="No such file or directory; nothing written"):
        restore._walk(str(tmp_path / "missing"))
