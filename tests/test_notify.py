"""Hold notifications (daemon/notify.py) with real processes and a real HTTP
server on 127.0.0.1: the command gets each hold as JSON on stdin, the webhook
the POSTs with `text`, failures are retried and counted, nothing blocks."""
from __future__ import annotations

import os
import time

import pytest

from agentwarden import render
from agentwarden.settings import ConfigError, Settings, load, notify_program_problem
from conftest import wait_for
from hooks import T, Hook, hold, received, recorder
from daemon import notify

@pytest.fixture
def hook():
    server = Hook()
    yield server
    server.close()


def alerts(tmp_path, **settings) -> notify.HoldAlerts:
    return notify.HoldAlerts(Settings(**settings), host="testhost",
                             journal_socket=str(tmp_path / "no-journal"))


def test_the_command_gets_each_hold_as_json_in_order(tmp_path):
    a = alerts(tmp_path, notify_command=f"{recorder(tmp_path)} --flag")
    for state in ("pending", "approved"):
        a.hold(hold(state, approvers=["root"] if state == "approved" else [],
                    reason="root: fine" if state == "approved" else None))
    out = tmp_path / "out.jsonl"
    got = wait_for(lambda: (lambda r: r if len(r) == 2 else None)(received(out)),
                   what="two deliveries")
    assert [g["state"] for g in got] == ["pending", "approved"]
    assert got[0]["hold_id"] == "h1-ab12" and got[0]["host"] == "testhost"
    assert got[1]["text"] == ("agentwarden on testhost: hold h1-ab12 approved: agent coder (for alice, "
                              "task fix #12) pid 4242 exec /usr/bin/date +%Y; waited 0.0s; approved "
                              "by root; root: fine")
    a.close()
    assert a.info()["channels"]["command"]["sent"] == 2


def test_a_failing_or_slow_command_is_counted_and_never_blocks_the_caller(tmp_path, monkeypatch):
    a = alerts(tmp_path, notify_command=str(recorder(tmp_path, exit_status=3)))
    a.hold(hold())
    wait_for(lambda: a.info()["channels"]["command"]["failed"] == 1, what="a failure counted")
    assert "exited with 3" in a.info()["channels"]["command"]["last_error"]
    a.close()

    monkeypatch.setattr(notify, "QUEUE_SIZE", 5)
    gate, here = tmp_path / "go", tmp_path / "slow"
    here.mkdir()
    slow = alerts(tmp_path, notify_command=str(recorder(here, wait_for_file=gate)), notify_timeout=30)
    slow.hold(hold(hold_id="h0-0000"))
    wait_for(lambda: slow.info()["channels"]["command"]["queued"] == 0, what="the first one to run")
    started = time.monotonic()
    for number in range(1, 15):  # 5 wait while the first runs; 9 are dropped
        slow.hold(hold(hold_id=f"h{number}-0000"))
    assert time.monotonic() - started < 0.5
    command = slow.info()["channels"]["command"]
    assert (command["queued"], command["dropped"], command["sent"]) == (5, 9, 0)
    gate.touch()
    wait_for(lambda: slow.info()["channels"]["command"]["sent"] == 6, what="the queue to drain")
    assert [r["hold_id"] for r in received(here / "out.jsonl")] == [f"h{n}-0000" for n in range(6)]
    slow.close()


def test_a_command_that_outlives_the_timeout_is_killed_and_counted(tmp_path):
    a = alerts(tmp_path, notify_command=str(recorder(tmp_path, wait_for_file=tmp_path / "never")),
               notify_timeout=0.2)
    a.hold(hold())
    wait_for(lambda: a.info()["channels"]["command"]["failed"] == 1, what="the timeout counted")
    assert "did not finish within 0.2s (killed)" in a.info()["channels"]["command"]["last_error"]
    a.close()


def test_the_webhook_gets_a_slack_style_text_and_every_field(tmp_path, hook):
    a = alerts(tmp_path, notify_webhook=hook.url)
    a.hold(hold())
    [body] = wait_for(lambda: hook.bodies, what="the POST")
    assert body["text"].startswith("agentwarden on testhost: hold h1-ab12 pending: agent coder")
    assert 'rule exec.hold "/usr/bin/date *" at p.toml:3; needs 1 approver(s)' in body["text"]
    assert {k: body[k] for k in hold()} == hold()
    a.close()
    assert a.info()["channels"]["webhook"]["sent"] == 1


def test_the_webhook_retries_with_backoff_then_counts_the_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(notify, "WEBHOOK_BACKOFF", 0.01)
    flaky = Hook(statuses=[503, 502, 200])
    try:
        a = alerts(tmp_path, notify_webhook=flaky.url)
        a.hold(hold())
        wait_for(lambda: flaky.bodies, what="the POST after two retries")
        assert a.info()["channels"]["webhook"]["retries"] == 2
        a.close()
    finally:
        flaky.close()
    # A server that is down: 1 + WEBHOOK_RETRIES attempts, then one failure.
    down = Hook()
    down.down()
    a = alerts(tmp_path, notify_webhook=down.url)
    a.hold(hold())
    webhook = wait_for(lambda: (lambda w: w if w["failed"] == 1 else None)(
        a.info()["channels"]["webhook"]), what="the failure counted")
    assert webhook["retries"] == notify.WEBHOOK_RETRIES and webhook["sent"] == 0
    assert f"(after {notify.WEBHOOK_RETRIES + 1} attempt(s))" in webhook["last_error"]
    a.close()
    # A 4xx other than 408/429 will not change: no retry.
    refused = Hook(statuses=[404])
    try:
        a = alerts(tmp_path, notify_webhook=refused.url)
        a.hold(hold())
        wait_for(lambda: a.info()["channels"]["webhook"]["failed"] == 1, what="the 404 counted")
        assert a.info()["channels"]["webhook"]["retries"] == 0
        a.close()
    finally:
        refused.close()


def test_without_a_journal_socket_holds_go_to_the_log_and_are_counted(tmp_path, caplog):
    a = alerts(tmp_path)
    with caplog.at_level("INFO", logger="agentwarden.daemon.notify"):
        a.hold(hold())
        a.close()
    journal = a.info()["channels"]["journal"]
    assert (journal["unavailable"], journal["sent"], a.info()["journal_available"]) == (1, 0, False)
    assert "hold h1-ab12 pending: agent coder" in caplog.text


def test_journal_fields():
    fields = notify.journal_fields(hold("approved", approvers=["root", "alice"], seq=7), "text")
    assert fields["PRIORITY"] == "5" and notify.journal_fields(hold(), "x")["PRIORITY"] == "4"
    assert fields["AGENTWARDEN_HOLD_ID"] == "h1-ab12" and fields["AGENTWARDEN_STATE"] == "approved"
    assert fields["AGENTWARDEN_AGENT"] == "coder" and fields["AGENTWARDEN_APPROVERS"] == "root,alice"
    assert fields["AGENTWARDEN_SEQ"] == "7" and "AGENTWARDEN_REASON" not in fields


def test_pending_holds_for_the_status_line():
    pending = notify.PendingHolds()
    assert pending.summary(T) == ""
    pending.update(hold(hold_id="h1-aaaa"))
    pending.update(hold(hold_id="h2-bbbb", time=T + 10 * 10**9))
    pending.update(hold("approval", hold_id="h1-aaaa", time=T + 5 * 10**9, waited=5.0))
    assert pending.summary(T + 40 * 10**9) == "2 holds pending (oldest h1-aaaa of coder, 40s)"
    pending.update(hold("denied", hold_id="h1-aaaa"))
    assert pending.summary(T + 40 * 10**9) == "1 hold pending (oldest h2-bbbb of coder, 30s)"
    pending.update(hold("timed-out", hold_id="h2-bbbb"))
    assert len(pending) == 0


def test_tail_shows_a_hold_readably(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        line = render.human(hold("denied", waited=12.25, reason="root: not on a Friday"))
    finally:
        monkeypatch.undo()
        time.tzset()
    assert line == ("22:13:20.000 HOLD h1-ab12 denied: agent coder (for alice, task fix #12) pid 4242 "
                    "exec /usr/bin/date +%Y; waited 12.2s; root: not on a Friday")


@pytest.mark.parametrize("key, value, message", [
    ("notify_command", "'unclosed", "cannot be split into words"),
    ("notify_webhook", "hooks.example.com/x", "must be an http:// or https:// URL"),
    ("notify_webhook", "ftp://example.com/x", "must be an http:// or https:// URL"),
    ("notify_webhook", "http://", "must be an http:// or https:// URL"),
    ("notify_webhook", "http://example.com:port/", "is not a URL"),
    ("notify_timeout", "0", "between 0.1 and 60 seconds"),
])
def test_bad_notify_settings_are_one_clear_line(key, value, message):
    with pytest.raises(ConfigError) as exc:
        load(config=os.devnull, environ={}, overrides=[f"{key}={value}"])
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_a_missing_hook_program_is_the_daemons_problem_not_the_clis():
    # Every command loads the settings; `approve` must work though the hook was removed.
    for line, message in (("/no/such/program --x", "the program '/no/such/program' is not an executable file"),
                          ("no-such-program-here", "the program 'no-such-program-here' is not found on PATH")):
        settings = load(config=os.devnull, environ={}, overrides=[f"notify_command={line}"])
        assert message in notify_program_problem(settings.notify_command)
    assert notify_program_problem("true --quiet") is None and notify_program_problem("") is None


def test_good_notify_settings(tmp_path):
    s = load(config=os.devnull, environ={"AGENTWARDEN_NOTIFY_WEBHOOK": "https://hooks.example.com/T/B"},
             overrides=["notify_command=true --quiet", "notify_timeout=2s"])
    assert (s.notify_command, s.notify_webhook, s.notify_timeout) == (
        "true --quiet", "https://hooks.example.com/T/B", 2.0)


def violation(agent: str = "coder", pid: int = 42) -> dict:
    return {"kind": "violation", "time": T, "agent": agent, "pid": pid, "comm": "cat", "event": "open",
            "event_seq": 3, "attempted": "read /etc/shadow", "decision": "violation", "rule": None,
            "reason": "matches no allow rule", "policy_hash": "sha256:ab", "mode": "enforce",
            "action": "alert", "action_taken": "none (alert)", "session": "coder-1"}


def test_violations_reach_the_journal_at_a_bounded_rate_per_agent_and_the_rest_are_summed_up(tmp_path, caplog):
    a = alerts(tmp_path)
    with caplog.at_level("INFO", logger="agentwarden.daemon.notify"):
        for pid in range(notify.VIOLATIONS_BURST + 30):   # a flood from one agent, at once
            a.violation(violation(pid=pid))
        a.violation(violation("reviewer"))                # another agent is not crowded out
        a.tick()
        a.close()
    channel = a.info()["violations"]
    assert (channel["unavailable"], channel["suppressed"], channel["dropped"]) == (
        notify.VIOLATIONS_BURST + 1 + 1, 30, 0)   # the burst, reviewer's, and the summary entry
    assert caplog.text.count("violation: agent coder read /etc/shadow") == notify.VIOLATIONS_BURST
    assert "violation: agent reviewer read /etc/shadow" in caplog.text
    assert "30 more violations not sent to the journal (more than 5/s per agent; the archive has each): coder 30" \
        in caplog.text
    assert "violations: 0 to the journal, 22 to the daemon's log, 0 dropped" in render.notify_status(a.info())


def test_the_rate_limit_refills():
    now = [0.0]
    limit = notify.AgentRateLimit(burst=2, rate=1.0, clock=lambda: now[0])
    assert [limit.allow("a") for _ in range(3)] == [True, True, False]
    now[0] = 0.5
    assert not limit.allow("a") and limit.allow("b")
    now[0] = 1.6
    assert limit.allow("a") and not limit.allow("a")
    now[0] = 10.0
    limit.forget_full()
    assert limit._buckets == {}


def test_violation_fields():
    fields = notify.violation_fields(violation())
    assert fields["MESSAGE"] == "violation: agent coder read /etc/shadow: matches no allow rule; none (alert)"
    assert (fields["PRIORITY"], fields["AGENTWARDEN_AGENT"], fields["AGENTWARDEN_VERDICT"],
            fields["AGENTWARDEN_SESSION"], fields["AGENTWARDEN_SEQ"]) == ("4", "coder", "violation", "coder-1", "3")
    assert "AGENTWARDEN_RULE" not in fields
