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
    """A record's time of day (tail)."""
    # Integer division: ns / 1e9 rounds x.9995... up to the next second.
    seconds, rest = divmod(ns, 1_000_000_000)
    return time.strftime("%H:%M:%S", time.localtime(seconds)) + f".{rest // 1_000_000:03d}"


def _shown(record: dict[str, Any], key: str) -> str:
    """A path of a record, resolved when it could be, else as given."""
    resolved = record.get(f"resolved_{key}")
    return text(resolved if resolved is not None else record[key])


def change(record: dict[str, Any]) -> str:
    """What a `change` record did: "rename /a -> /b", "chmod 0o755 /x", ..."""
    syscall = record["syscall"]
    if syscall.startswith("symlink"):   # path is the link's content, path2 the link
        return f"{syscall} {_shown(record, 'path2')} -> {text(record['path'])}"
    shown = _shown(record, "path") or f"fd {record['dirfd']}"
    if record["path2"] or syscall.startswith(("rename", "link")):
        return f"{syscall} {shown} -> {_shown(record, 'path2')}"
    if "chmod" in syscall or "mkdir" in syscall:
        return f"{syscall} {shown} mode {record['mode']:#o}"
    if "chown" in syscall:
        return f"{syscall} {shown} to {record['new_uid']}:{record['new_gid']}"
    if "truncate" in syscall:
        return f"{syscall} {shown} to {record['length']} bytes"
    return f"{syscall} {shown}"


def sidedoor(record: dict[str, Any]) -> str:
    """What a `sidedoor` record did: "io_uring_setup (side door io_uring)"."""
    path = _shown(record, "path") if record["path"] else ""
    return f"{record['syscall']}" + (f" {path}" if path else "") + f" (side door {record['door']})"


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


def short_hash(facts: dict[str, Any] | None) -> str:
    """A drift observation in a few characters: sha256:1a2b3c4d, absent, ..."""
    if not facts:
        return "?"
    if facts.get("kind") == "file":
        return f"sha256:{facts['sha256'][:8]}"
    return facts.get("kind", "?")


def drift_text(record: dict[str, Any]) -> str:
    """One line about a `drift` record (a change to a tracked file), for tail,
    replay, the journal and notification hooks."""
    state = record["state"]
    line = f"{record['change_id']} {state}: {record['path']!s}"
    if state == "baseline":
        return line + f" recorded as {short_hash(record.get('before'))} by {(record.get('admin') or {}).get('name')}"
    line += f" by agent {record.get('agent') or '?'}"
    who = ", ".join(f"{label} {record[key]}" for key, label in (("person", "for"), ("task", "task"))
                    if record.get(key))
    if who:
        line += f" ({who})"
    line += f" [{','.join(record.get('syscalls') or ())}] {short_hash(record.get('before'))} -> " \
            f"{short_hash(record.get('after'))}"
    if record.get("hold_id"):
        line += f"; hold {record['hold_id']}"
    if record.get("approvers"):
        line += f" approved by {', '.join(map(str, record['approvers']))}"
    if record.get("reason"):
        line += f": {record['reason']}"
    if record.get("expires"):
        line += f"; expires {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(record['expires'] / 1e9))}"
    if record.get("admin") and state in ("reverted", "accepted"):
        line += f"; {state} by {record['admin'].get('name')}"
        if record["admin"].get("reason"):
            line += f": {record['admin']['reason']}"
    if state == "expired":
        line += "; review it: agentwarden drift show " + record["change_id"]
    return line


def _when(ns: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9)) if ns else "-"


def drift_row(row: dict[str, Any]) -> str:
    """One changed file in `agentwarden drift`: when, id, state, path, agent,
    person, task, approver and reason, before -> after, expiry."""
    parts = [_when(row["time"]), row["id"], f"{row['state']:<8}", str(row["path"]),
             f"agent {row.get('agent') or '-'}" if row["source"] != "baseline" else "outside sessions"]
    for key, label in (("person", "for"), ("task", "task")):
        if row.get(key):
            parts.append(f"{label} {row[key]}")
    if row.get("approvers"):
        parts.append(f"approved by {', '.join(map(str, row['approvers']))}"
                     + (f" ({row['reason']})" if row.get("reason") else ""))
    elif row.get("hold_id"):
        parts.append(f"remembered approval of {row['hold_id']}" if row.get("remembered") else f"hold {row['hold_id']}")
    after = "(being written)" if row.get("after") is None and row["source"] == "session" else short_hash(row.get("after"))
    parts.append(f"{short_hash(row.get('before'))} -> {after}")
    if row.get("expires"):
        parts.append(f"expires {_when(row['expires'])}")
    if row.get("admin") and row["state"] in ("reverted", "accepted"):
        parts.append(f"by {row['admin'].get('name')}")
    return "  ".join(parts)


def alert_text(record: dict[str, Any]) -> str:
    """What the journal and hooks say of a hold or drift record."""
    if record.get("kind") == "drift":
        return f"change {drift_text(record)}"
    return f"hold {hold_text(record)}"


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
    problem = f"; {info['command_problem']}" if info.get("command_problem") else ""
    v = info.get("violations")
    violations = (f"; violations: {v['sent']} to the journal" + (f", {v['unavailable']} to the daemon's log"
                  if v.get("unavailable") else "") + f", {v['dropped']} dropped") if v else ""
    return f"{info['pending']} holds pending; " + "; ".join(parts) + problem + violations


def dated(ns: int) -> str:
    """A record's time with its date, for the archive's views (log show, replay)."""
    seconds, rest = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) + f".{rest // 1_000_000:03d}"


def human(record: dict[str, Any], with_date: bool = False) -> str:
    """One line per record: tail's (the time of day), or with its date (log show, search, replay)."""
    kind = record["kind"]
    at = dated if with_date else clock
    if kind == "supervision":
        return (f"{at(record['time'])} SUPERVISION {record['session']} {record['state']}: agent "
                f"{record['agent']} (for {record.get('on_behalf_of') or 'unknown'}, task "
                f"{record.get('task') or 'unknown'}, user {record.get('user')}) pid {record['pid']} on {record['host']}")
    if kind == "release":
        how = f"remembered approval of {record['hold_id']}" if record["remembered"] else f"hold {record['hold_id']}"
        paths = " -> ".join(text(p) for p in record["paths"])
        return (f"{at(record['time'])} RELEASE {record['agent']} tid {record['tid']} {record['syscall']} "
                f"{paths}: let through by {how}")
    if kind == "drift":
        return f"{at(record['time'])} DRIFT {drift_text(record)}"
    if kind == "hold":
        return f"{at(record['time'])} HOLD {hold_text(record)}"
    if kind == "gap":
        detail = f": {record['detail']}" if record.get("detail") else ""
        return f"{at(record['time'])} LOST {record['count']} records at stage {record['stage']}{detail}"
    if kind == "violation":
        return (f"{at(record['time'])} VIOLATION {record['agent']} pid {record['pid']} "
                f"{record['attempted']}: {record['decision']} "
                f"({record['rule'] or 'no rule allows it'}) -> {record['action_taken']}")
    if kind == "admin":
        return (f"{at(record['time'])} ADMIN {record['user']} {record['action']} "
                f"{record['agent']}: {record['result']}")
    if kind == "archive":
        return f"{at(record['time'])} ARCHIVE {record['event']}: {record['detail']}"
    if kind == "fleet":
        return f"{at(record['time'])} FLEET {record['event']}: {record['detail']}"
    if kind == "session":
        who = ", ".join(f"{k} {record[k]}" for k in ("person", "task", "user") if record.get(k))
        return (f"{at(record['time'])} SESSION {record['session']} {record['status']}: agent "
                f"{record['agent']}" + (f" ({who})" if who else "") + f" on {record['host']}")
    if kind == "policy":
        detail = f": {record['detail']}" if record.get("detail") else ""
        return f"{at(record['time'])} POLICY {record['status']} {record['policy_hash']}{detail}"
    agent = record.get("agent") or f"cgroup:{record.get('agent_cgroup_id')}"
    head = f"{at(record['time'])} {agent:<12} {kind:<5} pid {str(record.get('pid', '-')):<7}"
    if kind == "exec":
        argv = " ".join(text(a) for a in record["argv"]) + (" …" if record["argv_truncated"] else "")
        shown = record.get("resolved_exec_path") or record.get("resolved_filename") or record["filename"]
        return f"{head} {text(shown)}  [{argv}] {_result(record)}"
    if kind in ("open", "chdir"):
        path = record.get("resolved_path") or record["path"]
        extra = f" {open_mode(record['flags'])}" if kind == "open" else ""
        if record.get("count"):   # repeated opens, folded in the kernel
            extra += f" ×{record['count']} until {at(record['last_time'])}"
        return f"{head} {text(path)}{extra} {_result(record)}"
    if kind == "fork":
        return f"{head} child {record['child_pid']}"
    if kind == "exit":
        return f"{head} ({text(record['comm'])})"
    if kind == "change":
        return f"{head} {change(record)} {_result(record)}"
    if kind == "sidedoor":
        return f"{head} {sidedoor(record)} {_result(record)}"
    if kind == "move":
        where = "OUT of the agent's cgroups" if record["left"] else "within the agent"
        if record.get("born_by_clone3"):
            return (f"{head} pid {record['moved_pid']} born by clone3 in cgroup id "
                    f"{record['dst_cgroup_id']} ({where})")
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


def banner(settings: Settings, cgroup_root: Path, flags: list[str] = ()) -> list[str]:
    """What `up` says once the probe is loaded: where things are, the settings
    not at their defaults, how to start (with the flags other commands need)."""
    scope = settings.cgroup_scope
    demo = f"{scope}/demo" if scope else "demo"
    again = " ".join(flags) + " " if flags else ""
    changed = [f"{name} = {_toml_value(value)} ({settings.origins.get(name, 'default')})"
               for name, value in settings.values().items()
               if settings.origins.get(name, "default") != "default"]
    return ["agentwarden is watching.",
            f"  archive:   {settings.archive_dir}",
            f"  sockets:   {settings.run_dir} (ingest.sock, events.sock, control.sock)",
            f"  cgroup v2: {cgroup_root}",
            f"  scope:     {cgroup_root / scope if scope else 'every agent cgroup'}"
            + (f" (cgroup_scope {scope!r}: agents elsewhere are not watched)" if scope else ""),
            "  settings:  " + ("; ".join(changed) if changed else "all defaults (agentwarden config)"),
            *([f"  flags:     {' '.join(flags)} (give them to every other command too)"] if flags else []),
            "Put a shell under watch as agent 'demo' (in another terminal, as root):",
            f"  agentwarden {again}tag {demo} --agent demo --create && echo $$ > {cgroup_root}/{demo}/cgroup.procs",
            f"Then watch it: agentwarden {again}tail --agent demo"]


def status(st: dict[str, Any], now_ns: int) -> list[str]:
    """The daemon's `status` answer; `now_ns` (unix ns) dates the probe's last contact."""
    lines = []
    d, p = st["daemon"], st["probe"]
    age = (now_ns - p["last_seen"]) / 1e9 if p["last_seen"] else None
    lines.append(f"daemon: up (pid {d['pid']}), {d['events_per_second']:.0f} events/s, "
                 f"{d['counters'].get('events', 0)} events, archive {d['archive']}")
    if "cgroup_scope" in d:
        lines.append("scope:  " + (f"only agent cgroups below {d['cgroup_scope']!r} (cgroup_scope)"
                                   if d["cgroup_scope"] else "every agent cgroup (no cgroup_scope)"))
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
    if st.get("notify"):
        lines.append("notify: " + notify_status(st["notify"]))
    changes = st.get("drift")
    if changes:
        sup_counts = st.get("sessions") or {}
        lines.append(f"drift:  {changes.get('expired', 0)} expired changes to review"
                     + (" (agentwarden drift --expired)" if changes.get("expired") else "")
                     + f"; {sup_counts.get('drift_changes', 0)} changes kept in sessions, "
                     f"{changes.get('drift_changes', 0)} outside; "
                     f"{sup_counts.get('drift_errors', 0) + changes.get('drift_errors', 0)} errors")
    if st.get("fleet"):
        lines.append("fleet: " + fleet_status(st["fleet"]))
    watch = st.get("watch")
    if watch and watch.get("state") == "lost":
        lines.append(f"WATCH LOST: the probe is gone; agents frozen until it watches again: "
                     f"{', '.join(watch.get('frozen', [])) or 'none'}")
    drops = st["drops"]
    lines.append("drops:  " + (", ".join(f"{k}={v}" for k, v in sorted(drops.items())) or "none"))
    return lines


def fleet_status(f: dict[str, Any]) -> str:
    """The shipper's state in one line: connected, shipped up to, lag."""
    state = "connected" if f["connected"] else "NOT CONNECTED"
    line = (f"{state} to {f['url']} as {f['host']}, acknowledged up to seq {f['acked_seq']}, "
            f"lag {f['lag']} records, {f['pending_holds']} holds published")
    if f.get("skipped"):
        line += f", {f['skipped']} records deleted before they were shipped"
    return line + (f"; last error: {f['last_error']}" if f.get("last_error") else "")


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


def _file_line(f: dict[str, Any]) -> str:
    facts = [f"{f['size']} bytes"] if "size" in f else []
    facts += [f"sha256 {f['sha256']}"] if "sha256" in f else []
    facts += [f["note"]] if f.get("note") else []
    real = f" (really {f['real_path']})" if f.get("real_path") not in (None, f["path"]) else ""
    return f"    {f['path'] or '?'}{real}: {', '.join(facts)}"


def hold_detail(h: dict[str, Any]) -> list[str]:
    """One pending hold with its context (`holds show`)."""
    lines = holds([h])
    who = ", ".join(f"{k} {h[k]}" for k in ("on_behalf_of", "task", "user") if h.get(k))
    lines.append(f"    session {h['session']} of agent {h['agent']} on {h['host']}" + (f" ({who})" if who else ""))
    if h.get("agent_says"):
        lines.append(f"    agent says (its own claim, unverified): {h['agent_says']}")
    if h.get("approved_by"):
        lines.append("    approved so far by: " + "; ".join(
            f"{a['name']}: {a['reason'] or 'no reason given'}" for a in h["approved_by"]))
    if "program" in h:
        lines += ["program:", _file_line(h["program"])]
    if h.get("files"):
        lines += ["files:"] + [_file_line(f) for f in h["files"]]
    diff = h.get("diff")
    if diff:
        if diff.get("note"):
            lines.append(f"diff: {diff['note']}")
        elif diff["binary"]:
            lines.append("diff: binary content (sizes and hashes above)")
        else:
            lines.append("diff:" + (" (cut short)" if diff["truncated"] else ""))
            lines += ["    " + line for line in diff["text"].splitlines()]
    lines.append("process and its ancestors (nearest first):")
    for p in h.get("ancestry", []):
        argv = " ".join(p["argv"]) + (" …" if p["argv_truncated"] else "")
        lines.append(f"    {p['pid']:<7} {argv}  (cwd {p['cwd'] or '?'})")
    lines.append(f"last {len(h.get('recent', []))} calls of the session the supervisor decided:")
    lines += [f"    {clock(r['time'])} {r['verdict']:<24} {r['action']}" for r in h.get("recent", [])]
    return lines


def _toml_value(value: Any) -> str:
    """A value as TOML writes it: true/false, numbers as such, the rest as basic strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps("" if value is None else str(value))  # None: an optional path not set  # a TOML basic string


def settings_toml(settings: Settings, files: list[Path]) -> list[str]:
    """The settings in force as TOML, each with where it comes from."""
    lines = ["# files read: " + (", ".join(map(str, files)) or "none")]
    for name, value in settings.values().items():
        line = f"{name} = {_toml_value(value)}"
        lines.append(f"{line:<46} # {settings.origins[name]}")
    return lines


def settings_json(settings: Settings, files: list[Path]) -> str:
    """The settings in force, their origins and the files read, as one JSON object."""
    return json.dumps({"settings": {k: v if isinstance(v, (bool, int, float)) else str(v)
                                    for k, v in settings.values().items()},
                       "origins": dict(settings.origins),
                       "files": [str(f) for f in files]}, sort_keys=True)
