"""How records look to a person (tail) and as JSON lines (tail --json)."""
from __future__ import annotations

import json
import os
import time
from typing import Any

from .wire import text

_ACCESS = {os.O_RDONLY: "r", os.O_WRONLY: "w", os.O_RDWR: "rw"}


def open_mode(flags: int) -> str:
    mode = _ACCESS.get(flags & 3, "?")
    if flags & os.O_CREAT:
        mode += "+create"
    if flags & os.O_TRUNC:
        mode += "+trunc"
    if flags & os.O_APPEND:
        mode += "+append"
    return mode


def _clock(ns: int) -> str:
    # Integer division: ns / 1e9 rounds x.9995... up to the next second.
    seconds, rest = divmod(ns, 1_000_000_000)
    return time.strftime("%H:%M:%S", time.localtime(seconds)) + f".{rest // 1_000_000:03d}"


def _result(record: dict[str, Any]) -> str:
    if record.get("error"):
        return f"-> {record['error']}"
    return "-> ok" if record["kind"] != "open" else f"-> fd {record['ret']}"


def hold_text(record: dict[str, Any]) -> str:
    """One line about a hold record, for tail, the journal and notification hooks:
    id, state, agent (and for whom), the action, how long it waited, who answered, why."""
    state = record["state"]
    who = ", ".join(f"{label} {record[key]}" for key, label in (("on_behalf_of", "for"),
                                                                ("task", "task")) if record.get(key))
    line = (f"{record['hold_id']} {state}: agent {record['agent']}" + (f" ({who})" if who else "")
            + f" pid {record['pid']} {record['action']}")
    if state == "pending":
        line += f"; rule {record['rule'] or 'none allows it'}; needs {record['required']} approver(s)"
    else:
        line += f"; waited {record['waited']:.1f}s"
    if record.get("approvers"):
        line += f"; approved by {', '.join(map(str, record['approvers']))}"
        if state == "approval":
            line += f" ({len(record['approvers'])} of {record['required']})"
    if record.get("reason"):
        line += f"; {record['reason']}"
    return line


def notify_status(info: dict[str, Any]) -> str:
    """The daemon's hold notifications (`agentwarden status`), in one line."""
    parts = []
    for name, c in info["channels"].items():
        part = f"{name} {c['sent']} sent"
        if c.get("unavailable"):
            part += f", {c['unavailable']} to the daemon's log (no journal)"
        part += f", {c['failed']} failed, {c['dropped']} dropped"
        notes = ([f"{c['retries']} retries"] if c.get("retries") else []) + (
            [f"last error: {c['last_error']}"] if c.get("last_error") else [])
        parts.append(part + (f" ({'; '.join(notes)})" if notes else ""))
    return f"{info['pending']} holds pending; " + "; ".join(parts)


def human(record: dict[str, Any]) -> str:
    kind = record["kind"]
    if kind == "hold":
        return f"{_clock(record['time'])} HOLD {hold_text(record)}"
    if kind == "gap":
        detail = f": {record['detail']}" if record.get("detail") else ""
        return f"{_clock(record['time'])} LOST {record['count']} records at stage {record['stage']}{detail}"
    if kind == "violation":
        return (f"{_clock(record['time'])} VIOLATION {record['agent']} pid {record['pid']} "
                f"{record['attempted']}: {record['decision']} "
                f"({record['rule'] or 'no rule allows it'}) -> {record['action_taken']}")
    if kind == "admin":
        return (f"{_clock(record['time'])} ADMIN {record['user']} {record['action']} "
                f"{record['agent']}: {record['result']}")
    if kind == "archive":
        return f"{_clock(record['time'])} ARCHIVE {record['event']}: {record['detail']}"
    if kind == "session":
        who = ", ".join(f"{k} {record[k]}" for k in ("person", "task", "user") if record.get(k))
        return (f"{_clock(record['time'])} SESSION {record['session']} {record['status']}: agent "
                f"{record['agent']}" + (f" ({who})" if who else "") + f" on {record['host']}")
    if kind == "policy":
        detail = f": {record['detail']}" if record.get("detail") else ""
        return f"{_clock(record['time'])} POLICY {record['status']} {record['policy_hash']}{detail}"
    agent = record.get("agent") or f"cgroup:{record.get('agent_cgroup_id')}"
    head = f"{_clock(record['time'])} {agent:<12} {kind:<5} pid {record['pid']:<7}"
    if kind == "exec":
        argv = " ".join(text(a) for a in record["argv"]) + (" …" if record["argv_truncated"] else "")
        shown = record.get("resolved_exec_path") or record.get("resolved_filename") or record["filename"]
        return f"{head} {text(shown)}  [{argv}] {_result(record)}"
    if kind in ("open", "chdir"):
        path = record.get("resolved_path") or record["path"]
        extra = f" {open_mode(record['flags'])}" if kind == "open" else ""
        return f"{head} {text(path)}{extra} {_result(record)}"
    if kind == "fork":
        return f"{head} child {record['child_pid']}"
    if kind == "exit":
        return f"{head} ({text(record['comm'])})"
    return f"{head} {record}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return text(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def as_json(record: dict[str, Any]) -> str:
    return json.dumps(record, default=_jsonable, sort_keys=True)
