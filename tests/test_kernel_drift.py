"""Configuration drift on the real kernel: real programs under `agentwarden
run` change tracked files (`sed -i` held and approved with --expires, `>>`,
truncate, mv, rm, chmod, chown); `agentwarden drift` lists each with its
content before and after, its attribution and state (active, expired,
reverted, diverged); revert restores bytes, mode and owner and refuses what it
must (diverged without --force, a directory or a symlink now, the store's
copy missing or corrupted, an unknown id) with one line and nothing written;
a change an agent makes outside sessions to a baselined file is shown as a
diff; the archive verifies after all of it."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import Warden, wait_for
from test_kernel_sessions import PY, SHELL, _name, holds, wait_hold  # noqa: F401

pytestmark = pytest.mark.kernel

TOOLS = ["/usr/bin/sed", "/usr/bin/truncate", "/usr/bin/mv", "/usr/bin/rm", "/usr/bin/chmod", "/usr/bin/chown",
         "/usr/bin/cat"]


def policy(agent: str, track: Path, *, write_allow=(), on_violation="hold", extra="") -> str:
    quoted = ", ".join(f'"{p}"' for p in write_allow)
    return (f'[agent.{agent}]\nmode = "enforce"\non-violation = "{on_violation}"\n{extra}'
            f'[agent.{agent}.exec]\nallow = [{", ".join(json.dumps(p) for p in SHELL + TOOLS)}]\n'
            f'[agent.{agent}.files]\nread-allow = ["/**"]\nwrite-allow = [{quoted}]\n'
            f'track = ["{track}/**"]\n')


@pytest.fixture
def tracked_agent(warden, agent_cgroup, tmp_path):
    """An agent (its cgroup tagged) and a tracked directory; policy(kwargs) sets its policy."""
    agent = _name("d")
    cg = agent_cgroup(agent)
    conf = tmp_path / "conf"
    conf.mkdir()

    def set_policy(**kwargs):
        warden.set_policy(agent, policy(agent, conf, **kwargs))
    return agent, cg, conf, set_policy


def run(warden: Warden, agent: str, command: list[str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "agentwarden", "run", "--agent", agent, *extra, "--", *command],
                            env=warden.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def drift_rows(warden: Warden, *args: str) -> list[dict]:
    out = warden.cli("drift", "--json", *args).stdout
    return [json.loads(line) for line in out.splitlines()]


def rows_of(warden: Warden, path: Path, *args: str) -> list[dict]:
    return [r for r in drift_rows(warden, *args) if r["path"] == str(path)]


def finished(warden: Warden, path: Path, count: int = 1) -> list[dict]:
    """The changes of path once their sessions ended (content after known)."""
    return wait_for(lambda: (lambda rows: rows if len(rows) >= count and all(r["after"] for r in rows) else None)(
        rows_of(warden, path)), timeout=20, what=f"{count} finished change(s) of {path}")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def facts(path: Path) -> tuple:
    st = os.lstat(path)
    return path.read_bytes(), st.st_mode & 0o7777, st.st_uid, st.st_gid


def sed_approved(warden: Warden, agent: str, target: Path, expires: str, reason: str) -> list[str]:
    """sed -i under run: its temp file and the rename over target are held; each approved."""
    proc = run(warden, agent, ["/usr/bin/sed", "-i", "s/safe/fast/", str(target)], "--task", "tune",
               "--on-behalf-of", "alice")
    approved = []
    while len(approved) < 2:
        [hold] = wait_hold(warden, agent)
        if approved:
            # An admin who takes a while over the rename: sed closed its temporary
            # file long ago, but a call of its session waits, so the temporary
            # file's change is not taken for finished (it would be a change of its own).
            time.sleep(2.5)
        warden.cli("approve", hold["id"], "--expires", expires, "--reason", reason)
        approved.append(hold["id"])
        wait_for(lambda: hold["id"] not in [h["id"] for h in holds(warden)], what="the approval")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return approved


def test_sed_approved_with_expiry_listed_expired_reverted_then_diverged(warden, tracked_agent):
    agent, _, conf, set_policy = tracked_agent
    set_policy()   # no write rule: sed's writes are held (on-violation = "hold")
    target = conf / "app.conf"
    old = b"# app\nmode=safe\nlevel=3\n"
    target.write_bytes(old)
    os.chmod(target, 0o640)
    os.chown(target, 1234, 5678)
    holds_ = sed_approved(warden, agent, target, "2s", "try fast mode")
    new = target.read_bytes()
    assert new == b"# app\nmode=fast\nlevel=3\n"

    [row] = finished(warden, target)
    assert row["state"] == "active", row
    assert row["agent"] == agent and row["person"] == "alice" and row["task"] == "tune"
    assert row["hold_id"] == holds_[1] and row["approvers"] == ["root"] and row["reason"] == "try fast mode"
    assert row["before"]["sha256"] == sha(old) and row["after"]["sha256"] == sha(new)
    assert row["syscalls"] == ["rename"] and row["policy_hash"].startswith("sha256:")
    # sed's temporary file came and went: no change of its own.
    assert [r["path"] for r in drift_rows(warden, "--agent", agent)] == [str(target)]
    text = warden.cli("drift", "show", row["id"]).stdout
    assert "-mode=safe" in text and "+mode=fast" in text, text

    # Two seconds after the approval: expired, reported in status and the archive.
    wait_for(lambda: rows_of(warden, target, "--expired"), timeout=15, what="the change to expire")
    status = wait_for(lambda: (lambda s: s if s["drift"]["expired"] >= 1 else None)(warden.status()),
                      what="status to count the expired change")
    assert "expired change" in status["status_line"] and "agentwarden drift --expired" in status["status_line"]
    assert "expired changes to review (agentwarden drift --expired)" in warden.cli("status").stdout
    line = warden.cli("drift", "--agent", agent).stdout
    assert f"{row['id']}  expired" in line and "approved by root (try fast mode)" in line, line

    # Revert: the exact bytes, mode and owner.
    done = warden.cli("drift", "revert", row["id"], "--reason", "no fast mode")
    assert done.stdout.startswith(f"{row['id']}: reverted {target}"), done.stdout
    assert facts(target) == (old, 0o640, 1234, 5678)
    [row] = rows_of(warden, target)
    assert row["state"] == "reverted" and row["admin"]["name"] == "root" and row["admin"]["uid"] == 0
    again = warden.cli("drift", "revert", row["id"], check=False)
    assert again.returncode == 1 and "already reverted by root" in again.stderr

    # A later approved edit, then someone else's: diverged; revert refuses without --force.
    sed_approved(warden, agent, target, "1h", "fast again")
    second = finished(warden, target, 2)[-1]
    assert second["state"] == "active"
    with open(target, "ab") as admin_edit:   # not an agent: this test process
        admin_edit.write(b"admin=1\n")
    edited = facts(target)
    [second] = [r for r in rows_of(warden, target) if r["id"] == second["id"]]
    assert second["state"] == "diverged"
    refused = warden.cli("drift", "revert", second["id"], check=False)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.startswith(f"agentwarden: error: {target} diverged: it changed since {second['id']}")
    assert "--force" in refused.stderr and refused.stderr.count("\n") == 1
    assert facts(target) == edited   # nothing written
    warden.cli("drift", "revert", second["id"], "--force")
    assert target.read_bytes() == old   # the content before the second sed: after the first revert

    warden.settle()
    records = [r for r in warden.records() if r["kind"] == "drift" and r.get("path") == str(target)]
    assert [r["state"] for r in records] == ["changed", "expired", "reverted", "changed", "reverted"]
    assert records[2]["admin"]["name"] == "root" and records[2]["admin"]["reason"] == "no fast mode"
    assert records[4]["admin"]["force"] is True

    # The auditor's views: changes only; a replay in readable lines with dates; the export's fields.
    found = warden.cli("log", "search", "--write", "--agent", agent).stdout.splitlines()
    assert found and all(" DRIFT " in line or " open " in line or " change " in line for line in found), found
    assert any(f"DRIFT {row['id']} changed: {target} by agent {agent} (for alice, task tune) [rename]" in line
               for line in found), found
    assert not any(" exec " in line for line in found)
    replay = warden.cli("log", "replay", row["session"]).stdout
    timeline = replay.split("timeline:", 1)[1].splitlines()
    today = time.strftime("%Y-%m-%d")
    # (An approved file change is performed by the supervisor, whose own record of it names
    # the hold: no separate RELEASE line; an approved exec would have one.)
    for word in ("HOLD", "SUPERVISION", "DRIFT"):
        lines = [line for line in timeline if f" {word} " in line]
        assert lines and all(f" {today} " in line for line in lines), (word, replay)
    assert "{'" not in replay, replay
    exported = [json.loads(line) for line in warden.cli("log", "export", "--kind", "drift", "--path",
                                                        str(target)).stdout.splitlines()]
    changed = [e for e in exported if e["state"] == "changed"][0]
    assert changed["before_sha256"] == sha(old) and changed["after_sha256"] == sha(new)
    assert changed["agent"] == agent and changed["person"] == "alice" and changed["approvers"] == ["root"]
    assert [e["admin_name"] for e in exported if e["state"] == "reverted"] == ["root", "root"]
    assert warden.cli("log", "verify").returncode == 0


def test_each_kind_of_change_appears_with_before_and_after(warden, tracked_agent):
    agent, _, conf, set_policy = tracked_agent
    set_policy(write_allow=[f"{conf}/**"], extra='change-ttl = "1h"\n')
    files = {name: conf / name for name in ("appended", "truncated", "moved", "removed", "modes", "owned")}
    for name, path in files.items():
        path.write_bytes(f"{name}=1\n".encode() * 10)
        os.chmod(path, 0o644)
    before = {name: facts(path) for name, path in files.items()}
    script = (f"echo x >> {files['appended']} && /usr/bin/truncate -s 3 {files['truncated']} && "
              f"/usr/bin/mv {files['moved']} {conf}/renamed && /usr/bin/rm {files['removed']} && "
              f"/usr/bin/chmod 600 {files['modes']} && /usr/bin/chown 4321:4321 {files['owned']}")
    proc = run(warden, agent, ["/bin/sh", "-c", script])
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    rows = {Path(r["path"]).name: r for r in wait_for(
        lambda: (lambda rows: rows if len(rows) >= 7 and all(r["after"] for r in rows) else None)(
            drift_rows(warden, "--agent", agent)), timeout=20, what="seven changes")}
    assert set(rows) == {*files, "renamed"} and len(drift_rows(warden, "--agent", agent)) == 7, rows.keys()
    assert rows["appended"]["after"]["size"] == rows["appended"]["before"]["size"] + 2
    assert rows["truncated"]["after"]["size"] == 3
    assert rows["moved"]["after"] == {"kind": "absent"} and rows["renamed"]["before"] == {"kind": "absent"}
    assert rows["renamed"]["after"]["sha256"] == rows["moved"]["before"]["sha256"]
    assert rows["removed"]["after"] == {"kind": "absent"} and rows["removed"]["before"]["kind"] == "file"
    assert (rows["modes"]["before"]["mode"], rows["modes"]["after"]["mode"]) == (0o644, 0o600)
    assert (rows["owned"]["before"]["uid"], rows["owned"]["after"]["uid"]) == (0, 4321)
    assert rows["appended"]["syscalls"] == ["openat"] and rows["modes"]["syscalls"] == ["fchmodat"]
    for row in rows.values():
        assert row["state"] == "active" and row["hold_id"] is None
        assert row["expires"] - row["time"] == pytest.approx(3600e9, abs=60e9)   # change-ttl

    # Every one reverts to exactly what it was (a removed file back, a new name gone).
    for name in ("appended", "truncated", "removed", "modes", "owned", "moved", "renamed"):
        warden.cli("drift", "revert", rows[name]["id"])
    assert {name: facts(path) for name, path in files.items()} == before
    assert not (conf / "renamed").exists()
    assert warden.cli("log", "verify").returncode == 0


def test_a_change_outside_sessions_to_a_baselined_file_shows_its_diff(warden, tracked_agent, tmp_path):
    agent, cg, conf, set_policy = tracked_agent
    set_policy(write_allow=[f"{conf}/**", "/dev/null"], on_violation="alert")
    by_agent, by_admin = conf / "pool.conf", conf / "hosts"
    by_agent.write_text("size=4\n")
    by_admin.write_text("127.0.0.1 localhost\n")
    out = warden.cli("drift", "baseline", str(by_agent), str(by_admin)).stdout
    assert f"{by_agent}: baseline sha256:" in out
    # The agent, not in a session: seen by the kernel's records alone.
    result = cg.run(["/bin/sh", "-c", f"echo size=64 >> {by_agent}"])
    assert result.returncode == 0, result.stderr
    [row] = wait_for(lambda: (lambda rows: rows if rows and rows[0]["after"] else None)(
        rows_of(warden, by_agent)), timeout=20, what="the outside change")
    assert row["source"] == "outside" and row["agent"] == agent and row["syscalls"] == ["openat"]
    assert row["before"]["sha256"] == sha(b"size=4\n") and row["after"]["sha256"] == sha(b"size=4\nsize=64\n")
    shown = warden.cli("drift", "show", row["id"]).stdout
    assert "+size=64" in shown and " size=4" in shown, shown
    # Root inside the agent's cgroup may not revert it: the supervisor refuses before anything is written.
    inside = cg.run([PY, "-m", "agentwarden", "drift", "revert", row["id"]], env=warden.env, text=True)
    assert inside.returncode == 1 and inside.stderr == (f"agentwarden: error: requests from inside agent "
                                                        f"{agent!r} are refused, even as root\n"), inside
    assert by_agent.read_text() == "size=4\nsize=64\n"
    # Someone who is no agent edits the other file: listed as diverged from its baseline.
    by_admin.write_text("127.0.0.1 localhost\n10.0.0.9 db\n")
    [admin_row] = rows_of(warden, by_admin)
    assert admin_row["state"] == "diverged" and admin_row["source"] == "baseline"
    assert "+10.0.0.9 db" in warden.cli("drift", "show", admin_row["id"]).stdout
    warden.cli("drift", "revert", admin_row["id"])
    assert by_admin.read_text() == "127.0.0.1 localhost\n" and not rows_of(warden, by_admin)
    warden.settle()
    states = [r["state"] for r in warden.records() if r["kind"] == "drift" and r.get("path") == str(by_agent)]
    assert states == ["baseline", "changed"]
    assert warden.cli("log", "verify").returncode == 0


def test_revert_refuses_bad_input_and_writes_nothing(warden, tracked_agent, tmp_path):
    agent, _, conf, set_policy = tracked_agent
    set_policy(write_allow=[f"{conf}/**"])
    names = ("now-dir", "now-link", "store-missing", "store-corrupt", "parent-link")
    for name in names:
        (conf / name).write_text(f"{name} before\n")
    proc = run(warden, agent, ["/bin/sh", "-c", " && ".join(f"echo after >> {conf / n}" for n in names)])
    assert proc.wait(timeout=30) == 0
    rows = {Path(r["path"]).name: r for r in wait_for(
        lambda: (lambda rows: rows if len(rows) == 5 and all(r["after"] for r in rows) else None)(
            drift_rows(warden, "--agent", agent)), timeout=20, what="five changes")}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("not to be touched\n")
    (conf / "now-dir").unlink()
    (conf / "now-dir").mkdir()
    (conf / "now-link").unlink()
    (conf / "now-link").symlink_to(elsewhere)
    objects = warden.settings.drift_dir / "objects"
    missing = rows["store-missing"]["before"]["sha256"]
    (objects / missing[:2] / missing[2:]).unlink()
    corrupt = rows["store-corrupt"]["before"]["sha256"]
    (objects / corrupt[:2] / corrupt[2:]).write_bytes(b"tampered\n")

    cases = {
        "c-0000000000": "no change 'c-0000000000' (see `agentwarden drift` for the ids)",
        "../etc/passwd": "no change '../etc/passwd' (ids look like c-1a2b3c4d5e: see `agentwarden drift`)",
        rows["now-dir"]["id"]: f"{conf / 'now-dir'} is now a directory; nothing written",
        rows["now-link"]["id"]: f"{conf / 'now-link'} is now a symlink (to {elsewhere}); not followed, "
                                "nothing written",
        rows["store-missing"]["id"]: f"the store's copy sha256:{missing[:12]} is missing",
        rows["store-corrupt"]["id"]: f"the store's copy sha256:{corrupt[:12]} is corrupted: its content hashes "
                                     f"to sha256:{sha(b'tampered' + bytes([10]))[:12]}",
    }
    snapshot = {p: (p.is_symlink(), p.is_dir(), p.read_bytes() if p.is_file() and not p.is_symlink() else None)
                for p in [*conf.iterdir(), elsewhere]}
    for change_id, message in cases.items():
        for force in ((), ("--force",)):
            result = warden.cli("drift", "revert", change_id, *force, check=False)
            assert result.returncode == 1 and result.stdout == "", (change_id, result)
            assert result.stderr.startswith(f"agentwarden: error: {message}"), (change_id, result.stderr)
            assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert {p: (p.is_symlink(), p.is_dir(), p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in [*conf.iterdir(), elsewhere]} == snapshot
    assert elsewhere.read_text() == "not to be touched\n"
    warden.settle()
    assert not [r for r in warden.records() if r["kind"] == "drift" and r["state"] == "reverted"
                and r.get("path", "").startswith(str(conf))], "a refused revert was archived"
    # A directory on the way that is now a symlink is not followed either.
    conf.rename(tmp_path / "conf-real")
    conf.symlink_to(tmp_path / "conf-real")
    result = warden.cli("drift", "revert", rows["parent-link"]["id"], check=False)
    assert result.returncode == 1 and result.stderr == (f"agentwarden: error: {conf} passes through a symlink; "
                                                        "not followed, nothing written\n")
    assert (tmp_path / "conf-real" / "parent-link").read_text() == "parent-link before\nafter\n"
    shown = warden.cli("drift", "show", "c-0000000000", check=False)
    assert shown.returncode == 1 and shown.stderr.startswith("agentwarden: error: no change 'c-0000000000'")
    assert warden.cli("log", "verify").returncode == 0


def test_an_expired_change_is_reported_and_reverted_where_the_daemon_sees_the_file_read_only(
        kernel, warden, agent_cgroup, tmp_path):
    """As under the packaged unit: the warden runs in a mount namespace of its
    own where the tracked directory is read-only (ProtectSystem=strict) and
    /run/systemd/journal is a socket of this test. sed -i under `run`, the
    agent's change-ttl runs out: the change is reported expired in status,
    the journal, notify_command, notify_webhook and the metrics, until the
    admin's `drift revert` -- written by the CLI in its own namespace --
    puts the bytes, mode and owner back and it is archived."""
    from hooks import Hook, received, recorder
    from test_kernel_journal import entries
    from test_kernel_observability import free_port, scrape
    conf, hooks, journal_dir = tmp_path / "conf", tmp_path / "hooks", tmp_path / "journal"
    for directory in (conf, hooks, journal_dir):
        directory.mkdir()
    target = conf / "pool.conf"
    old = b"# pool\nsize=4\n"
    target.write_bytes(old)
    os.chmod(target, 0o640)
    os.chown(target, 1234, 5678)
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(journal_dir / "socket"))
    webhook = Hook()
    port = free_port()
    env = {"AGENTWARDEN_NOTIFY_COMMAND": str(recorder(hooks)), "AGENTWARDEN_NOTIFY_WEBHOOK": webhook.url,
           "AGENTWARDEN_METRICS_LISTEN": f"127.0.0.1:{port}"}
    sandbox = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               f"mount -t tmpfs none /run && mkdir /run/systemd && ln -s {journal_dir} /run/systemd/journal && "
               f"mount --bind {conf} {conf} && mount -o remount,bind,ro {conf} {conf} && exec \"$@\"", "sh"]
    run_dir = Path(tempfile.mkdtemp(prefix="aw-", dir="/tmp"))   # short: its sockets' paths
    own = Warden(tmp_path, run_dir=run_dir / "run", env=env, wrapper=sandbox)
    try:
        own.metrics_url = f"http://127.0.0.1:{port}/metrics"
        agent = _name("ro")
        cg = agent_cgroup(agent, tag=False)
        cg.warden = own
        cg.tag()
        own.set_policy(agent, policy(agent, conf, write_allow=[f"{conf}/**"], extra='change-ttl = "2s"\n'))
        daemon = own.status()["daemon"]["pid"]
        denied = subprocess.run(["nsenter", "-t", str(daemon), "-m", "--", "/usr/bin/touch", str(conf / "x")],
                                capture_output=True, text=True)
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr, denied
        proc = run(own, agent, ["/usr/bin/sed", "-i", "s/size=4/size=64/", str(target)], "--task", "pool")
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
        [row] = finished(own, target)
        assert row["before"]["sha256"] == sha(old) and row["after"]["sha256"] == sha(b"# pool\nsize=64\n")

        # Expired: once to each channel, and in status and the metrics until an admin acts.
        [sent] = wait_for(lambda: [r for r in received(hooks / "out.jsonl") if r.get("kind") == "drift"],
                          timeout=20, what="the expired change at notify_command")
        assert sent["state"] == "expired" and sent["change_id"] == row["id"] and sent["agent"] == agent
        assert sent["text"].startswith(f"agentwarden on {sent['host']}: change {row['id']} expired: "
                                       f"{target} by agent {agent}")
        [posted] = wait_for(lambda: [b for b in webhook.bodies if b.get("kind") == "drift"], timeout=20,
                            what="the expired change at notify_webhook")
        assert (posted["state"], posted["change_id"]) == ("expired", row["id"])
        journaled: list[dict] = []

        def drift_entries() -> list[dict]:
            journaled.extend(entries(journal))
            return [e for e in journaled if e.get("AGENTWARDEN_RECORD") == "drift"]
        [logged] = wait_for(drift_entries, timeout=20, what="the expired change in the journal")
        assert (logged["AGENTWARDEN_STATE"], logged["AGENTWARDEN_CHANGE_ID"], logged["AGENTWARDEN_AGENT"],
                logged["AGENTWARDEN_PATH"], logged["PRIORITY"]) == ("expired", row["id"], agent, str(target), "4")
        assert sent["text"] == f"agentwarden on {sent['host']}: {logged['MESSAGE']}"
        status = wait_for(lambda: (lambda s: s if s["drift"]["expired"] == 1 else None)(own.status()),
                          what="status to count the expired change")
        assert "1 expired change to review" in status["status_line"]
        assert status["notify"]["pending"] == 0   # not taken for a hold
        metrics = wait_for(lambda: (lambda m: m if m.get("agentwarden_drift_expired_changes") == 1 else None)(
            scrape(own)), what="the metric to count the expired change")
        assert metrics['agentwarden_drift_changes_total{source="session"}'] >= 1

        # The daemon cannot write there; the admin's revert is written by the CLI.
        own.cli("drift", "revert", row["id"], "--reason", "back to 4")
        assert facts(target) == (old, 0o640, 1234, 5678)
        wait_for(lambda: own.status()["drift"]["expired"] == 0, what="the reverted change to leave status")
        wait_for(lambda: scrape(own).get("agentwarden_drift_expired_changes") == 0,
                 what="the reverted change to leave the metric")
        assert "expired change" not in own.status()["status_line"]
        own.settle()
        states = [(r["state"], (r.get("admin") or {}).get("name")) for r in own.records()
                  if r["kind"] == "drift" and r.get("path") == str(target)]
        assert states == [("changed", None), ("expired", None), ("reverted", "root")]
        assert len(received(hooks / "out.jsonl")) == 1   # reported once
        assert own.cli("log", "verify").returncode == 0
    finally:
        own.stop()
        webhook.close()
        journal.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def test_a_running_session_has_the_content_after_once_the_writer_closed_the_file(warden, tracked_agent, tmp_path):
    """A long session: sed -i's change of one file, and a file another of its
    processes keeps open for writing. The first has its content after within
    seconds while the session runs; the second only once its writer closed it."""
    agent, _, conf, set_policy = tracked_agent
    set_policy(write_allow=[f"{conf}/**"])
    edited, held = conf / "edited.conf", conf / "held.conf"
    edited.write_text("mode=safe\n")
    held.write_text("one\n")
    go_on, finish = tmp_path / "go-on", tmp_path / "finish"
    os.mkfifo(go_on)
    os.mkfifo(finish)
    script = (f"/usr/bin/sed -i s/safe/fast/ {edited} && exec 3>> {held} && echo two >&3 && "
              f"read line < {go_on} && echo three >&3 && exec 3>&- && read line < {finish}")
    proc = run(warden, agent, ["/bin/sh", "-c", script])
    [row] = finished(warden, edited)
    assert proc.poll() is None, "the session is still running"
    assert row["after"]["sha256"] == sha(b"mode=fast\n") and row["syscalls"] == ["rename"]
    assert not rows_of(warden, conf / f"{edited.name}.tmp") and len(drift_rows(warden, "--agent", agent)) == 2
    [open_row] = rows_of(warden, held)
    # Its writer still has it open: no content after, however long (the window
    # below is three of the supervisor's quiet periods).
    time.sleep(3)
    [open_row] = rows_of(warden, held)
    assert open_row["after"] is None and held.read_bytes() == b"one\ntwo\n"
    with open(go_on, "w") as fifo:
        fifo.write("go\n")
    [closed_row] = finished(warden, held)
    assert proc.poll() is None, "the session is still running"
    assert closed_row["id"] == open_row["id"] and closed_row["after"]["sha256"] == sha(b"one\ntwo\nthree\n")
    assert closed_row["before"]["sha256"] == sha(b"one\n")
    with open(finish, "w") as fifo:
        fifo.write("done\n")
    assert proc.wait(timeout=30) == 0
    warden.settle()
    # The session's end adds nothing: each change was recorded once.
    records = [r for r in warden.records() if r["kind"] == "drift" and r.get("session") == row["session"]]
    assert sorted((r["path"], r["state"]) for r in records) == [(str(edited), "changed"), (str(held), "changed")]
