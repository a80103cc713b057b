"""How things look to a person: records (tail) and as JSON lines (tail
--json), the daemon's status, pending holds, the settings in force, and the
banner of `up`. Pure functions: they return text, the CLI prints it."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .settings import Settings
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


def clock(ns: int) -> str:
    # Integer division: ns / 1e9 rounds x.9995... up to the next second.
    seconds, rest = divmod(ns, 1_000_000_000)
    return time.strftime("%H:%M:%S", time.localtime(seconds)) + f".{rest // 1_000_000:03d}"


def _result(record: dict[str, Any]) -> str:
    if record.get("error"):
        return f"-> {record['error']}"
    return "-> ok" if record["kind"] != "open" else f"-> fd {record['ret']}"


def human(record: dict[str, Any]) -> str:
    kind = record["kind"]
    if kind == "gap":
        detail = f": {record['detail']}" if record.get("detail") else ""
        return f"{clock(record['time'])} LOST {record['count']} records at stage {record['stage']}{detail}"
    if kind == "violation":
        return (f"{clock(record['time'])} VIOLATION {record['agent']} pid {record['pid']} "
                f"{record['attempted']}: {record['decision']} "
                f"({record['rule'] or 'no rule allows it'}) -> {record['action_taken']}")
    if kind == "admin":
        return (f"{clock(record['time'])} ADMIN {record['user']} {record['action']} "
                f"{record['agent']}: {record['result']}")
    if kind == "archive":
        return f"{clock(record['time'])} ARCHIVE {record['event']}: {record['detail']}"
    if kind == "session":
        who = ", ".join(f"{k} {record[k]}" for k in ("person", "task", "user") if record.get(k))
        return (f"{clock(record['time'])} SESSION {record['session']} {record['status']}: agent "
                f"{record['agent']}" + (f" ({who})" if who else "") + f" on {record['host']}")
    if kind == "policy":
        detail = f": {record['detail']}" if record.get("detail") else ""
        return f"{clock(record['time'])} POLICY {record['status']} {record['policy_hash']}{detail}"
    agent = record.get("agent") or f"cgroup:{record.get('agent_cgroup_id')}"
    head = f"{clock(record['time'])} {agent:<12} {kind:<5} pid {record['pid']:<7}"
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
    if kind == "move":
        where = "OUT of the agent's cgroups" if record["left"] else "within the agent"
        return f"{head} moved pid {record['moved_pid']} to {text(record['dst_path'])} ({where})"
    if kind == "fd":
        named = record.get("resolved_path")
        makes_one = record["syscall"] not in ("close", "close_range", "fcntl_setfd")
        result = f"-> fd {record['ret']}" if makes_one and not record["error"] else _result(record)
        return f"{head} {record['syscall']} {record['fd']}" + (f" ({text(named)})" if named else "") + f" {result}"
    return f"{head} {record}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return text(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def as_json(record: dict[str, Any]) -> str:
    return json.dumps(record, default=_jsonable, sort_keys=True)


def banner(settings: Settings, cgroup_root: Path) -> list[str]:
    """What `up` says once the probe is loaded: where things are, how to start."""
    return ["agentwarden is watching.",
            f"  archive:   {settings.archive_dir}",
            f"  sockets:   {settings.run_dir} (ingest.sock, events.sock, control.sock)",
            f"  cgroup v2: {cgroup_root}",
            "Put a shell under watch as agent 'demo' (in another terminal, as root):",
            f"  agentwarden tag demo --agent demo --create && echo $$ > {cgroup_root}/demo/cgroup.procs",
            "Then watch it: agentwarden tail --agent demo"]


def status(st: dict[str, Any], now_ns: int) -> list[str]:
    """The daemon's `status` answer; `now_ns` (unix ns) dates the probe's last contact."""
    lines = []
    d, p = st["daemon"], st["probe"]
    age = (now_ns - p["last_seen"]) / 1e9 if p["last_seen"] else None
    lines.append(f"daemon: up (pid {d['pid']}), {d['events_per_second']:.0f} events/s, "
                 f"{d['counters'].get('events', 0)} events, archive {d['archive']}")
    a = d.get("archive_state")
    if a:
        lines.append(f"archive: {a['state']}, durable up to seq {a['durable_seq']}"
                     + (f", {a['error']}; agents frozen: {', '.join(a['on_disk_full']['frozen']) or 'none'}"
                        if a["error"] else "") + ("" if a["keyed"] else " (not keyed)"))
    if age is None:
        lines.append("probe:  no contact yet")
    else:
        state = "up" if age < 5 else f"SILENT for {age:.0f}s"
        h = p["health"]
        lines.append(f"probe:  {state}, {h.get('tagged_cgroups', 0)} tagged cgroups, "
                     f"{h.get('decoded', 0)} records decoded")
    for cgid, info in sorted(p["tags"].items()):
        lines.append(f"  agent {info['agent']:<16} {info['path']} (id {cgid})")
    sup = st.get("sessions")
    if sup:
        fast = sup.get("fast_path")
        fast_note = (f"exec fast path running ({sup['fast']['continued']} calls answered, "
                     f"{sup['fast'].get('ruled', 0)} of them by the compiled rules; "
                     f"{sup['fast'].get('stashed', 0)} exec filenames from the kernel's copy)"
                     if fast == "running" else f"exec fast path off: {fast}")
        lines.append(f"sessions: {sup.get('sessions', 0)} running, {sup.get('holds', 0)} holds pending, "
                     f"{fast_note}")
    drops = st["drops"]
    lines.append("drops:  " + (", ".join(f"{k}={v}" for k, v in sorted(drops.items())) or "none"))
    return lines


def holds(pending: list[dict[str, Any]]) -> list[str]:
    """The supervisor's pending holds, three lines each."""
    if not pending:
        return ["no pending holds"]
    lines = []
    for h in pending:
        lines += [f"{h['id']}  agent {h['agent']}  session {h['session']}  for "
                  f"{h['on_behalf_of'] or '-'}  waiting {h['waited']:.0f}s "
                  f"(timeout in {h['timeout_in']:.0f}s)  approvals {len(h['approvals'])}/{h['required']}",
                  f"    {h['action']}",
                  f"    rule: {h['rule'] or 'no rule allows it'}"]
    return lines


def _toml_value(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def settings_toml(settings: Settings, files: list[Path]) -> list[str]:
    """The settings in force as TOML, each with where it comes from."""
    lines = ["# files read: " + (", ".join(map(str, files)) or "none")]
    for name, value in settings.values().items():
        line = f"{name} = {_toml_value(value)}"
        lines.append(f"{line:<46} # {settings.origins[name]}")
    return lines


def settings_json(settings: Settings, files: list[Path]) -> str:
    """The settings in force, their origins and the files read, as one JSON object."""
    return json.dumps({"settings": {k: v if isinstance(v, (int, float)) else str(v)
                                    for k, v in settings.values().items()},
                       "origins": dict(settings.origins),
                       "files": [str(f) for f in files]}, sort_keys=True)
