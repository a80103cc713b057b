"""Admins told of holds at once, on the real kernel: a real `agentwarden up` with
notify_command and notify_webhook set, real sessions, real holds answered from
the CLI; a real HTTP server on 127.0.0.1 as the webhook, a real program as the
command; `tail` showing holds."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import AgentCgroup, Warden, wait_for
from fakeprobe import Daemon, FakeProbe
from hooks import Hook, hold, received, recorder
from test_kernel_sessions import SHELL, _name, _policy, holds, start_run, wait_hold

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def hook():
    server = Hook()
    yield server
    server.close()


@pytest.fixture(scope="module")
def notified(kernel, tmp_path_factory, hook):
    """A warden that runs a recording command and POSTs to `hook` for each hold."""
    tmp = tmp_path_factory.mktemp("notify")
    command = recorder(tmp)
    w = Warden(tmp, env={"AGENTWARDEN_NOTIFY_COMMAND": f"{command} --from-agentwarden",
                         "AGENTWARDEN_NOTIFY_WEBHOOK": hook.url})
    w.notified = tmp / "out.jsonl"
    yield w
    w.stop()


@pytest.fixture
def held_agent(kernel, notified):
    """An agent whose /usr/bin/date execs are held (timeout: `extra`)."""
    made = []

    def make(extra: str = "") -> str:
        agent = _name("n")
        cg = AgentCgroup(kernel, notified, agent)
        made.append(cg)
        cg.tag()
        notified.set_policy(agent, _policy(agent, exec_allow=SHELL, exec_hold=["/usr/bin/date *"],
                                           extra=extra))
        return agent
    yield make
    for cg in made:
        cg.remove()


def states(records: list[dict], hold_id: str) -> list[str]:
    return [r["state"] for r in records if r.get("hold_id") == hold_id]


def wait_states(what: str, get, hold_id: str, wanted: list[str]) -> list[dict]:
    return wait_for(lambda: [r for r in get() if r.get("hold_id") == hold_id]
                    if states(get(), hold_id) == wanted else None, timeout=20,
                    what=f"{what} to receive {wanted} of {hold_id}")


def channel(warden: Warden, name: str) -> dict:
    return warden.status()["notify"]["channels"][name]


@pytest.mark.parametrize("answer", ["approve", "deny"])
def test_command_and_webhook_receive_each_hold_as_it_happens(notified, held_agent, hook, answer):
    agent = held_agent()
    proc = start_run(notified, agent, ["/bin/sh", "-c", "/usr/bin/date +ran-%Y; echo status=$?"],
                     "--task", "notify test", "--on-behalf-of", "alice")
    [pending] = wait_hold(notified, agent)
    hold_id = pending["id"]
    # Pending: the command and the webhook have it before anyone answers.
    [by_command] = wait_states("the command", lambda: received(notified.notified), hold_id, ["pending"])
    [by_hook] = wait_states("the webhook", lambda: hook.bodies, hold_id, ["pending"])
    assert proc.poll() is None
    for got in (by_command, by_hook):
        assert (got["agent"], got["on_behalf_of"], got["task"]) == (agent, "alice", "notify test")
        assert got["action"].startswith("exec /usr/bin/date +ran-")
        assert got["text"].startswith(f"agentwarden on ") and f"hold {hold_id} pending: agent {agent}" \
            in got["text"]
    # The units' status line names it, and without a journal the daemon's log has it.
    assert f"1 hold pending (oldest {hold_id} of {agent}, " in notified.status()["status_line"]
    assert f"hold {hold_id} pending: agent {agent}" in notified.output()

    notified.cli(answer, hold_id, "--reason", f"{answer} in test")
    out, err = proc.communicate(timeout=30)
    final = "approved" if answer == "approve" else "denied"
    assert ("ran-" in out) == (answer == "approve"), err
    _, by_command = wait_states("the command", lambda: received(notified.notified), hold_id,
                                ["pending", final])
    _, by_hook = wait_states("the webhook", lambda: hook.bodies, hold_id, ["pending", final])
    for got in (by_command, by_hook):
        assert f"{answer} in test" in got["reason"] and got["waited"] > 0
    assert hold_id not in notified.status()["status_line"]
    # What the hooks got is what the archive holds.
    notified.settle()
    archived = [r for r in notified.records() if r["kind"] == "hold" and r.get("hold_id") == hold_id]
    assert [(r["state"], r["seq"], r["time"]) for r in archived] == \
        [(r["state"], r["seq"], r["time"]) for r in received(notified.notified) if r["hold_id"] == hold_id]


def test_a_timed_out_hold_is_notified(notified, held_agent, hook):
    agent = held_agent(extra="hold-timeout = 1\n")
    proc = start_run(notified, agent, ["/bin/sh", "-c", "/usr/bin/date; echo status=$?"])
    out, _ = proc.communicate(timeout=30)
    assert "status=126" in out
    hold_id = wait_for(lambda: next((r["hold_id"] for r in received(notified.notified)
                                     if r["agent"] == agent), None), what="the pending hold")
    [_, timed_out] = wait_states("the command", lambda: received(notified.notified), hold_id,
                                 ["pending", "timed-out"])
    wait_states("the webhook", lambda: hook.bodies, hold_id, ["pending", "timed-out"])
    assert "no decision before the hold timeout" in timed_out["reason"]


def test_a_webhook_that_is_down_is_retried_and_counted_and_delays_no_approval(notified, held_agent, hook):
    agent = held_agent()
    before = channel(notified, "webhook")
    hook.down()
    try:
        proc = start_run(notified, agent, ["/bin/sh", "-c", "/usr/bin/date +ran-%Y"])
        [pending] = wait_hold(notified, agent)
        # The command still has it at once (its own thread).
        wait_states("the command", lambda: received(notified.notified), pending["id"], ["pending"])
        started = time.monotonic()
        notified.cli("approve", pending["id"])
        out, err = proc.communicate(timeout=30)
        answered = time.monotonic() - started
        assert "ran-" in out, err
        # The approval took what the CLI takes, not the webhook's retries
        # (0.5 + 1 + 2 s of backoff for the pending record alone).
        assert answered < 2.5, f"approve took {answered:.2f}s"
        webhook = wait_for(lambda: (lambda c: c if c["failed"] >= before["failed"] + 2 else None)(
            channel(notified, "webhook")), timeout=30, what="both records counted as failed")
        assert webhook["retries"] >= before["retries"] + 6
        assert "Connection refused" in webhook["last_error"]
        assert webhook["sent"] == before["sent"]
        assert not [h for h in holds(notified) if h["agent"] == agent]
        shown = notified.cli("status").stdout
        assert f"webhook {webhook['sent']} sent, {webhook['failed']} failed, 0 dropped (" in shown
    finally:
        hook.up()


def _tail(warden: Warden, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "agentwarden", "tail", *args], env=warden.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_tail_shows_holds_by_default_and_only_holds_with_holds(notified, held_agent, tmp_path):
    agent = held_agent()
    tails = {"default": _tail(notified, "--agent", agent), "holds": _tail(notified, "--holds")}
    lines: dict[str, list[str]] = {name: [] for name in tails}
    for name, tail in tails.items():
        threading.Thread(target=lambda n=name, t=tail: lines[n].extend(t.stdout), daemon=True).start()

    def on_both(text: str) -> bool:
        return all(any(text in line for line in list(lines[name])) for name in tails)

    stop = tmp_path / "stop"
    proc = start_run(notified, agent, ["/bin/sh", "-c", f"while [ ! -e {stop} ]; do /usr/bin/date +held; done"])
    try:
        # PUB/SUB joins asynchronously: deny holds until both tails show one.
        deadline = time.monotonic() + 60
        while True:
            [hold] = wait_hold(notified, agent)
            try:
                wait_for(lambda: on_both(f"HOLD {hold['id']} pending"), timeout=2, what="the tails")
                break
            except AssertionError:
                assert time.monotonic() < deadline, f"the tails never showed a hold: {lines}"
            notified.cli("deny", hold["id"])
            wait_for(lambda: hold["id"] not in [h["id"] for h in holds(notified)], what="the deny")
        stop.touch()
        notified.cli("approve", hold["id"], "--reason", "tail test")
        assert proc.wait(timeout=30) == 0
        wanted = f"HOLD {hold['id']} approved: agent {agent} pid {hold['pid']} exec /usr/bin/date +held"
        wait_for(lambda: on_both(wanted), what="the approval on both tails")
    finally:
        for tail in tails.values():
            tail.terminate()
            tail.wait(timeout=10)
    assert all(" HOLD " in line for line in lines["holds"] if line.strip())
    assert any(f" exec " in line and " HOLD " not in line for line in lines["default"])
    assert any(wanted in line and "; approved by root; root: tail test" in line for line in lines["holds"])


def _datagrams(sock: socket.socket) -> list[dict[str, str]]:
    """KEY=VALUE lines of each datagram waiting (sd_notify; the journal's native
    protocol, for values without a newline)."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(dict(line.split("=", 1) for line in sock.recv(1 << 16).decode().splitlines()))
    except BlockingIOError:
        return out


def test_a_real_daemon_tells_the_journal_and_the_status_line(kernel, tmp_path):
    """`agentwarden daemon` fed hold records over its ingest socket, in a mount
    namespace whose /run/systemd/journal is ours: libsystemd's own datagrams
    arrive with the structured fields, and sd_notify STATUS= names the hold."""
    journal_dir = tmp_path / "journal"
    journal_dir.mkdir()
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(journal_dir / "socket"))
    status = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    status.bind(str(tmp_path / "notify"))
    daemon = Daemon(tmp_path, env={"NOTIFY_SOCKET": str(tmp_path / "notify")}, wrapper=[
        "unshare", "--mount", "--propagation", "private", "sh", "-c",
        f"mount -t tmpfs none /run && mkdir /run/systemd && ln -s {journal_dir} /run/systemd/journal"
        ' && exec "$@"', "sh"])
    daemon.start()
    probe = FakeProbe(daemon.settings)
    try:
        probe.send([hold(time=time.time_ns())])
        entry = wait_for(lambda: _datagrams(journal), what="the journal entry")[0]
        assert entry["MESSAGE"].startswith("hold h1-ab12 pending: agent coder (for alice, task fix #12)")
        assert (entry["PRIORITY"], entry["SYSLOG_IDENTIFIER"], entry["AGENTWARDEN_HOLD_ID"],
                entry["AGENTWARDEN_STATE"], entry["AGENTWARDEN_AGENT"]) == (
                    "4", "agentwarden", "h1-ab12", "pending", "coder")
        assert wait_for(lambda: [m for m in _datagrams(status) if "1 hold pending (oldest h1-ab12 of "
                                 "coder, " in m.get("STATUS", "")], what="STATUS= naming the hold")
        probe.send([hold("approved", time=time.time_ns(), approvers=["root"], reason="root: ok")])
        entry = wait_for(lambda: _datagrams(journal), what="the second journal entry")[0]
        assert (entry["PRIORITY"], entry["AGENTWARDEN_STATE"], entry["AGENTWARDEN_APPROVERS"]) == (
            "5", "approved", "root")
        assert wait_for(lambda: [m for m in _datagrams(status) if "STATUS" in m
                                 and "pending" not in m["STATUS"]], what="STATUS= without it")
        channels = daemon.status()["notify"]["channels"]
        assert (channels["journal"]["sent"], channels["journal"].get("unavailable", 0)) == (2, 0)
    finally:
        probe.close()
        daemon.stop()
        journal.close()
        status.close()
