"""Telling admins about holds at once, where they are: the journal, the units'
status line, a command (`notify_command`) and a webhook (`notify_webhook`);
and violations to the journal, with their fields (agentwarden/journal.py).

The daemon hands every hold record it archives to `HoldAlerts.hold()`, which
only updates the pending holds (for the status line) and puts the record on
each channel's bounded queue. Each channel delivers from its own thread, one
record at a time and in order, so a slow command or a webhook that is down
delays neither the daemon's loop nor the other channels, and never a decision
(those are the supervisor's, another process). A record that finds its queue
full is dropped; every drop, failure and retry is counted (`agentwarden status`)
and logged.
"""
from __future__ import annotations

import logging
import queue
import shlex
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable

from agentwarden import journal, render, settings as settings_mod
from agentwarden.settings import Settings

log = logging.getLogger("agentwarden.daemon.notify")

QUEUE_SIZE = 256            # records waiting per channel; more are dropped (counted)
WEBHOOK_RETRIES = 3         # attempts after the first one fails
WEBHOOK_BACKOFF = 0.5       # seconds before the first retry, doubling after each
CLOSE_GRACE = 2.0           # seconds a stopping daemon gives the channels to finish
JOURNAL_SOCKET = journal.JOURNAL_SOCKET
OUTPUT_KEPT = 200           # characters of a failed command's stderr in the log
# syslog priorities: an admin is needed (warning), or one answered (notice).
PRIORITY = {"pending": 4, "timed-out": 4, "abandoned": 5}
NOTICE = 5
WARNING = 4   # a violation's priority
# Violations reach the journal at most this often per agent (a burst, then a
# steady rate); the rest are counted and summed up in one entry a second. The
# archive has every one; the journal is for people. (A flood of violations, an
# agent with no policy whose every open is one, would otherwise flood journald
# and starve the daemon.)
VIOLATIONS_BURST = 20
VIOLATIONS_PER_SECOND = 5.0


class DeliveryFailed(Exception):
    """One delivery that did not happen (said in one line), and whether to try again."""

    def __init__(self, message: str, retry: bool = False):
        super().__init__(message)
        self.retry = retry


def payload(record: dict[str, Any], host: str) -> dict[str, Any]:
    """What the command reads and the webhook receives: the hold record's fields,
    with a one-line `text` (Slack's field; other chat tools read it too) and the host."""
    return {**record, "host": host, "text": f"agentwarden on {host}: {render.alert_text(record)}"}


class Channel:
    """One way out: a bounded queue and the thread that empties it."""

    def __init__(self, name: str, deliver: Callable[[dict], str | None], *more_counters: str,
                 log_drops: bool = True):
        self.name = name
        self.log_drops = log_drops   # False where a flood of records would make a flood of lines
        self._deliver = deliver   # returns None, or a counter to bump instead of "sent"
        # Every key from the start: `info()` copies them while the thread counts.
        self.counters = dict.fromkeys(("sent", "failed", "dropped", *more_counters), 0)
        self.last_error: str | None = None
        self._queue: queue.Queue = queue.Queue(QUEUE_SIZE)
        self._thread = threading.Thread(target=self._run, name=f"notify-{name}", daemon=True)
        self._thread.start()

    def count(self, name: str) -> None:
        self.counters[name] += 1

    def submit(self, item: dict) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.count("dropped")
            if self.log_drops:
                log.error("notify %s: %d records waiting; dropped hold %s %s", self.name,
                      self._queue.qsize(), item.get("hold_id"), item.get("state"))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self.count(self._deliver(item) or "sent")
            except DeliveryFailed as exc:
                self.count("failed")
                self.last_error = str(exc)
                log.warning("notify %s: hold %s %s not delivered: %s", self.name,
                            item.get("hold_id"), item.get("state"), exc)

    def close(self, deadline: float) -> None:
        """Deliver what is queued until the deadline (monotonic); what is left is dropped."""
        try:
            self._queue.put(None, timeout=max(0.0, deadline - time.monotonic()))
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            left = self._queue.qsize()
            self.counters["dropped"] += left
            log.error("notify %s: stopping with %d hold records undelivered", self.name, left)

    def info(self) -> dict:
        return {**self.counters, "queued": self._queue.qsize(), "last_error": self.last_error}


class PendingHolds:
    """The holds waiting for an admin, from the hold records: for the status line."""

    def __init__(self):
        self._since: dict[str, tuple[int, str]] = {}  # hold id -> (pending since, ns; agent)

    def update(self, record: dict) -> None:
        if record["state"] in ("pending", "approval"):
            since = record["time"] - int(record["waited"] * 1e9)
            self._since.setdefault(record["hold_id"], (since, record["agent"]))
        else:
            self._since.pop(record["hold_id"], None)

    def __len__(self) -> int:
        return len(self._since)

    def summary(self, now_ns: int) -> str:
        """'2 holds pending (oldest h3-1a2b of coder, 40s)', or '' when none."""
        if not self._since:
            return ""
        oldest, (since, agent) = min(self._since.items(), key=lambda item: item[1][0])
        count = len(self._since)
        return (f"{count} hold{'s' if count > 1 else ''} pending (oldest {oldest} of {agent}, "
                f"{max(0, now_ns - since) / 1e9:.0f}s)")


def journal_fields(record: dict, text: str) -> dict[str, Any]:
    """The journal entry of a hold (or an expired change, a `drift` record): a
    message and structured AGENTWARDEN_* fields."""
    if record.get("kind") == "drift":
        drift_keys = ("change_id", "state", "path", "agent", "session", "person", "task", "hold_id",
                      "policy_hash", "expires", "seq")
        return {"MESSAGE": text, "PRIORITY": str(WARNING), "SYSLOG_IDENTIFIER": journal.IDENTIFIER,
                **journal.fields(record="drift", **{key: record.get(key) for key in drift_keys})}
    keys = ("hold_id", "state", "agent", "session", "on_behalf_of", "task", "pid", "action",
            "rule", "policy_hash", "required", "reason", "waited", "seq", "approvers")
    return {"MESSAGE": f"hold {text}", "PRIORITY": str(PRIORITY.get(record["state"], NOTICE)),
            "SYSLOG_IDENTIFIER": journal.IDENTIFIER,
            **journal.fields(record="hold", **{key: record.get(key) for key in keys})}


class AgentRateLimit:
    """A token bucket per agent: `allow(agent)` says whether one more entry may go now."""

    def __init__(self, burst: int = VIOLATIONS_BURST, rate: float = VIOLATIONS_PER_SECOND,
                 clock: Callable[[], float] = time.monotonic):
        self.burst, self.rate, self.clock = burst, rate, clock
        self._buckets: dict[str, tuple[float, float]] = {}   # agent -> (tokens, when)

    def allow(self, agent: str) -> bool:
        now = self.clock()
        tokens, then = self._buckets.get(agent, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[agent] = (tokens - 1.0 if allowed else tokens, now)
        return allowed

    def forget_full(self) -> None:
        """Drop the buckets that have refilled: agents that went quiet cost nothing."""
        now = self.clock()
        self._buckets = {agent: (tokens, then) for agent, (tokens, then) in self._buckets.items()
                         if tokens + (now - then) * self.rate < self.burst}


def suppressed_fields(counts: dict[str, int]) -> dict[str, Any]:
    """One entry for the violations the rate limit kept from the journal."""
    total = sum(counts.values())
    listed = ", ".join(f"{agent} {n}" for agent, n in sorted(counts.items(), key=lambda item: -item[1])[:10])
    return {"MESSAGE": f"{total} more violations not sent to the journal (more than "
                       f"{VIOLATIONS_PER_SECOND:g}/s per agent; the archive has each): {listed}",
            "PRIORITY": str(WARNING), "SYSLOG_IDENTIFIER": journal.IDENTIFIER,
            **journal.fields(record="violations-suppressed", count=total,
                             agents=sorted(counts))}


def violation_fields(violation: dict) -> dict[str, Any]:
    """The journal entry of a violation: VERDICT is the policy's decision."""
    return {"MESSAGE": f"violation: agent {violation['agent']} {violation['attempted']}: "
                       f"{violation['reason']}; {violation['action_taken']}",
            "PRIORITY": str(WARNING), "SYSLOG_IDENTIFIER": journal.IDENTIFIER,
            **journal.fields(record="violation", agent=violation["agent"], session=violation.get("session"),
                             verdict=violation["decision"], rule=violation.get("rule"),
                             event=violation["event"], pid=violation["pid"], action=violation["action"],
                             action_taken=violation["action_taken"], mode=violation["mode"],
                             policy_hash=violation["policy_hash"], seq=violation.get("event_seq"))}


class HoldAlerts:
    def __init__(self, settings: Settings, host: str | None = None,
                 journal_socket: str = JOURNAL_SOCKET):
        self.host = host or socket.gethostname()
        self.timeout = settings.notify_timeout
        self.journal_socket = journal_socket
        self.pending = PendingHolds()
        self._stop = threading.Event()
        self.channels = {"journal": Channel("journal", self._to_journal, "unavailable")}
        # Violations apart: a flood of them must not crowd holds out of the journal's queue.
        self.violations = Channel("violations", self._violation_to_journal, "unavailable",
                                  "suppressed", log_drops=False)
        self.violation_limit = AgentRateLimit()
        self._suppressed: dict[str, int] = {}   # agent -> violations kept from the journal since the last tick
        self._command = shlex.split(settings.notify_command)
        self.command_problem = settings_mod.notify_program_problem(settings.notify_command)
        if self.command_problem:   # still tried each time (it may come back); each failure counted
            log.error("%s: holds will not reach it", self.command_problem)
        if self._command:
            self.channels["command"] = Channel("command", self._run_command)
        self._webhook = settings.notify_webhook
        if self._webhook:
            self.channels["webhook"] = Channel("webhook", self._post, "retries")

    def hold(self, record: dict) -> None:
        """From the daemon's loop, for each hold record (and each expired
        change's `drift` record): never blocks."""
        if record.get("kind") != "drift":
            self.pending.update(record)
        item = dict(record)
        for channel in self.channels.values():
            channel.submit(item)

    def violation(self, record: dict) -> None:
        """From the daemon's loop, for each violation record: never blocks."""
        if self.violation_limit.allow(record["agent"]):
            self.violations.submit(dict(record))
        else:
            self.violations.count("suppressed")
            self._suppressed[record["agent"]] = self._suppressed.get(record["agent"], 0) + 1

    def tick(self) -> None:
        """From the daemon's loop, once a second: what the rate limit kept back, in one entry."""
        if self._suppressed:
            self.violations.submit({"suppressed": self._suppressed})
            self._suppressed = {}
        self.violation_limit.forget_full()

    def info(self) -> dict:
        return {"pending": len(self.pending), "command_problem": self.command_problem,
                "channels": {name: c.info() for name, c in self.channels.items()},
                "violations": self.violations.info(),
                "journal_available": self._journal_available()}

    def close(self, grace: float = CLOSE_GRACE) -> None:
        self._stop.set()   # no more retries: deliver or fail what is queued
        deadline = time.monotonic() + grace
        for channel in [*self.channels.values(), self.violations]:
            channel.close(deadline)

    # -- the channels (each called from its own thread) -----------------------

    def _journal_available(self) -> bool:
        return journal.available(self.journal_socket)

    def _to_journal(self, record: dict) -> str | None:
        drift = record.get("kind") == "drift"
        text = render.alert_text(record) if drift else render.hold_text(record)
        if not self._journal_available():
            # No journal here (not under systemd): the daemon's log has it instead.
            log.log(logging.WARNING if record["state"] in ("pending", "expired") else logging.INFO,
                    "%s" if drift else "hold %s", text)
            return "unavailable"
        self._send(journal_fields(record, text))
        return None

    def _violation_to_journal(self, record: dict) -> str | None:
        entry = suppressed_fields(record["suppressed"]) if "suppressed" in record else violation_fields(record)
        if not self._journal_available():
            log.warning("%s", entry["MESSAGE"])
            return "unavailable"
        self._send(entry)
        return None

    @staticmethod
    def _send(entry: dict[str, str]) -> None:
        entry = dict(entry)
        try:
            journal.send(entry.pop("MESSAGE"), int(entry.pop("PRIORITY")), entry,
                         entry.pop("SYSLOG_IDENTIFIER"))
        except OSError as exc:
            raise DeliveryFailed(f"journal: {exc.strerror or exc}") from None

    def _body(self, record: dict) -> bytes:
        return render.as_json(payload(record, self.host)).encode()

    def _run_command(self, record: dict) -> None:
        data = self._body(record)
        try:
            done = subprocess.run(self._command, input=data, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, timeout=self.timeout, close_fds=True)
        except subprocess.TimeoutExpired:
            raise DeliveryFailed(f"{self._command[0]} did not finish within {self.timeout:g}s "
                                 "(killed)") from None
        except OSError as exc:
            raise DeliveryFailed(f"cannot run {self._command[0]}: {exc.strerror}") from None
        if done.returncode != 0:
            said = done.stderr.decode(errors="replace").strip()[-OUTPUT_KEPT:]
            raise DeliveryFailed(f"{self._command[0]} exited with {done.returncode}"
                                 + (f": {said}" if said else ""))

    def _post(self, record: dict) -> None:
        data = self._body(record)
        wait = WEBHOOK_BACKOFF
        for attempt in range(WEBHOOK_RETRIES + 1):
            try:
                return post_json(self._webhook, data, self.timeout)
            except DeliveryFailed as exc:
                if not exc.retry or attempt == WEBHOOK_RETRIES or self._stop.wait(wait):
                    raise DeliveryFailed(f"{exc} (after {attempt + 1} attempt(s))") from None
                self.channels["webhook"].count("retries")
                wait *= 2


def post_json(url: str, data: bytes, timeout: float) -> None:
    """One POST; DeliveryFailed says why, and whether another attempt may succeed
    (network errors, timeouts, 5xx, 408 and 429: yes; another 4xx: no)."""
    request = urllib.request.Request(url, data=data, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "agentwarden"})
    # A webhook's path is often its secret (Slack's are): logs and status name the host only.
    parts = urllib.parse.urlsplit(url)
    where = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "") + "/…"
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        raise DeliveryFailed(f"{where}: HTTP {exc.code} {exc.reason}",
                             retry=exc.code >= 500 or exc.code in (408, 429)) from None
    except urllib.error.URLError as exc:
        raise DeliveryFailed(f"{where}: {exc.reason}", retry=True) from None
    except (OSError, ValueError) as exc:  # timeouts, resets, a bad reply
        raise DeliveryFailed(f"{where}: {exc}", retry=True) from None
