"""Export records in the formats SIEMs ingest: OCSF (AWS Security Lake and
others) and ECS (Elastic). Both map one line of `log export --format jsonl`
(the record with its attribution, see logquery.export_record), so the three
formats always say the same thing.

OCSF 1.8.0 classes (docs/observability.md has the table):
  exec, exit                    Process Activity (1007): Launch, Terminate
  open, change                  File System Activity (1001): Open, Create, Delete,
                                Rename, Update, Set Security
  violation, hold               Detection Finding (2004): Create, Update, Close
Other kinds (fork, fd, chdir, health, gap, session, ...) have no class that
says what they are; `mapped()` tells the caller, which counts what it leaves out.
agentwarden's own fields (agent, session, person, task, policy, verdict, rule)
go under OCSF's `unmapped` and ECS's `agentwarden` object.
"""
from __future__ import annotations

import os
import posixpath
from typing import Any, Callable

from . import __version__

FORMATS = ("jsonl", "ocsf", "ecs")
OCSF_VERSION = "1.8.0"
ECS_VERSION = "9.4.0"
PRODUCT = {"name": "agentwarden", "vendor_name": "agentwarden", "version": __version__}

# OCSF: category uid, class uid, and the captions the schema gives them.
SYSTEM, FINDINGS = (1, "System Activity"), (2, "Findings")
PROCESS_ACTIVITY = (1007, "Process Activity", SYSTEM)
FILE_ACTIVITY = (1001, "File System Activity", SYSTEM)
DETECTION_FINDING = (2004, "Detection Finding", FINDINGS)
PROCESS_ACTIVITIES = {"exec": (1, "Launch"), "exit": (2, "Terminate")}
FILE_OPEN = (14, "Open")
# change syscall -> File System Activity activity
FILE_CHANGES = {
    **dict.fromkeys(("unlink", "unlinkat", "rmdir"), (4, "Delete")),
    **dict.fromkeys(("rename", "renameat", "renameat2"), (5, "Rename")),
    **dict.fromkeys(("truncate", "ftruncate"), (3, "Update")),
    **dict.fromkeys(("chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "lchown", "fchown",
                     "fchownat"), (7, "Set Security")),
    **dict.fromkeys(("link", "linkat", "symlink", "symlinkat", "mkdir", "mkdirat"), (1, "Create")),
}
# hold state -> Detection Finding activity: a finding made, updated, closed
HOLD_ACTIVITIES = {"pending": (1, "Create"), "approval": (2, "Update")}
FINDING_CLOSED = (3, "Close")
SEVERITIES = {1: "Informational", 2: "Low", 3: "Medium", 4: "High"}
# a policy decision -> OCSF severity_id
DECISION_SEVERITY = {None: 1, "allow": 1, "hold": 3, "violation": 4, "deny": 4}
HOLD_DECIDED = {"approved": "allowed", "denied": "denied", "timed-out": "denied", "abandoned": "denied"}
ATTRIBUTION = ("agent", "session", "person", "task", "session_user", "policy_hash",
               "verdict_decision", "verdict_rule")


def mapped(line: dict) -> bool:
    """Whether the record of this export line has an OCSF class and ECS categories."""
    kind = line["kind"]
    return kind in PROCESS_ACTIVITIES or kind in ("open", "violation", "hold") or \
        (kind == "change" and line.get("syscall") in FILE_CHANGES)


def converter(fmt: str) -> Callable[[dict], dict]:
    return {"jsonl": lambda line: line, "ocsf": to_ocsf, "ecs": to_ecs}[fmt]


# -- shared helpers --------------------------------------------------------------

def _path(line: dict, resolved: str, raw: str) -> str | None:
    return line.get(resolved) or line.get(raw) or None


def _outcome(line: dict) -> str:
    """success / failure / unknown, from the syscall's return value."""
    ret = line.get("ret")
    if line.get("error") or (isinstance(ret, int) and ret < 0) or line.get("killed_in_kernel"):
        return "failure"
    return "success" if isinstance(ret, int) else "unknown"


def _is_write_open(flags: int) -> bool:
    return (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & (os.O_CREAT | os.O_TRUNC | os.O_APPEND))


def _exec_path(line: dict) -> str | None:
    return line.get("resolved_exec_path") or line.get("resolved_filename") or line.get("filename")


def _severity(line: dict) -> int:
    kind = line["kind"]
    if kind == "violation":
        return DECISION_SEVERITY.get(line.get("decision"), 4)
    if kind == "hold":
        return 3
    return DECISION_SEVERITY.get(line.get("verdict_decision"), 1)


def _stopped(line: dict) -> bool:
    """A violation whose action was stopped: denied, or its process or agent killed."""
    return line.get("decision") == "deny" or "kill" in (line.get("action_taken") or "")


def _drop_empty(value: Any) -> Any:
    """Leave out what is unknown: a null is not a value in either schema."""
    if isinstance(value, dict):
        kept = {k: _drop_empty(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v not in (None, {}, [], "")}
    return value


# -- OCSF -------------------------------------------------------------------------

def _ocsf_process(pid: Any, name: Any, uid: Any = None, **more: Any) -> dict:
    return {"pid": pid, "name": name, "user": {"uid": str(uid)} if uid is not None else None, **more}


def _ocsf_file(path: str | None) -> dict | None:
    if not path:
        return None
    # type_id 0 (Unknown): the record does not say whether it is a regular file or a folder.
    return {"path": path, "name": posixpath.basename(path.rstrip("/")) or path, "type_id": 0,
            "type": "Unknown"}


def to_ocsf(line: dict) -> dict:
    """One export line as an OCSF 1.8.0 event (call only where mapped(line))."""
    kind = line["kind"]
    actor = {"process": _ocsf_process(line.get("pid"), line.get("comm"), line.get("uid"),
                                      tid=line.get("tid")),
             "app_name": line.get("agent")}
    event: dict[str, Any] = {}
    if kind in PROCESS_ACTIVITIES:
        klass, activity = PROCESS_ACTIVITY, PROCESS_ACTIVITIES[kind]
        if kind == "exec":
            path = _exec_path(line)
            argv = line.get("argv") or []
            event["process"] = _ocsf_process(
                line.get("pid"), posixpath.basename(path) if path else line.get("comm"), line.get("uid"),
                cmd_line=" ".join(map(str, argv)) or None, file=_ocsf_file(path),
                parent_process={"pid": line.get("ppid")} if line.get("ppid") else None)
        else:
            event["process"] = _ocsf_process(line.get("pid"), line.get("comm"), line.get("uid"))
    elif kind in ("open", "change"):
        klass = FILE_ACTIVITY
        activity = FILE_OPEN if kind == "open" else FILE_CHANGES[line["syscall"]]
        event["file"] = _ocsf_file(_path(line, "resolved_path", "path")) or \
            {"name": "(unknown)", "type_id": 0, "type": "Unknown"}
        if kind == "change" and line.get("path2"):
            event["file_result"] = _ocsf_file(_path(line, "resolved_path2", "path2"))
    else:
        klass = DETECTION_FINDING
        if kind == "violation":
            activity = (1, "Create")
            title = f"{line.get('decision')}: {line.get('attempted')}"
            uid = f"{line.get('host')}/{line.get('boot_id')}/violation/{line.get('seq')}"
            event["action_id"], event["action"] = (2, "Denied") if _stopped(line) else (0, "Unknown")
            event["is_alert"] = True
            desc = f"{line.get('reason')}; action taken: {line.get('action_taken')}"
        else:
            state = line.get("state")
            activity = HOLD_ACTIVITIES.get(state, FINDING_CLOSED)
            title = f"hold {state}: {line.get('action')}"
            uid = f"{line.get('host')}/hold/{line.get('hold_id')}"
            decided = HOLD_DECIDED.get(state)
            if decided:
                event["action_id"], event["action"] = (1, "Allowed") if decided == "allowed" else (2, "Denied")
            event["is_alert"] = state == "pending"
            desc = line.get("reason") or f"waiting for {line.get('required')} approval(s)"
        event["finding_info"] = {"uid": uid, "title": title, "desc": desc,
                                 "types": [kind], "created_time": line["time"] // 1_000_000}
        event["actor"] = actor
    class_uid, class_name, (category_uid, category_name) = klass
    activity_id, activity_name = activity
    severity_id = _severity(line)
    outcome = _outcome(line) if kind not in ("violation", "hold") else None
    event = {
        "time": line["time"] // 1_000_000,   # OCSF timestamp_t: milliseconds since the epoch
        "category_uid": category_uid, "category_name": category_name,
        "class_uid": class_uid, "class_name": class_name,
        "activity_id": activity_id, "activity_name": activity_name,
        "type_uid": class_uid * 100 + activity_id, "type_name": f"{class_name}: {activity_name}",
        "severity_id": severity_id, "severity": SEVERITIES[severity_id],
        "status_id": {"success": 1, "failure": 2}.get(outcome) if outcome else None,
        "status": {"success": "Success", "failure": "Failure"}.get(outcome) if outcome else None,
        "status_detail": line.get("error"),
        "message": _message(line),
        "metadata": {"version": OCSF_VERSION, "product": PRODUCT, "log_name": "agentwarden archive",
                     "sequence": line.get("seq"), "uid": f"{line.get('host')}/{line.get('boot_id')}/{line.get('seq')}",
                     "correlation_uid": line.get("session")},
        "device": {"hostname": line.get("host"), "type_id": 0, "type": "Unknown"},
        "actor": actor,
        **event,
        "unmapped": {"agentwarden": {"kind": kind, **{k: line.get(k) for k in ATTRIBUTION},
                                     **_extra(line)}},
    }
    if line.get("count"):   # repeated opens (or their violation): how many, first and last
        event.update(count=line["count"], start_time=line["time"] // 1_000_000)
        if line.get("last_time"):
            event["end_time"] = line["last_time"] // 1_000_000
    return _drop_empty(event)


def _extra(line: dict) -> dict:
    """What a finding's reader needs beyond the class's attributes."""
    keys = {"violation": ("decision", "rule", "reason", "action", "action_taken", "mode", "event_seq"),
            "hold": ("hold_id", "state", "on_behalf_of", "rule", "required", "approvers", "waited"),
            "open": ("access", "count"), "change": ("syscall", "resolved_path2", "path2")}.get(line["kind"], ())
    return {k: line.get(k) for k in keys}


def _message(line: dict) -> str:
    kind = line["kind"]
    who = f"agent {line.get('agent')}" if line.get("agent") else "process"
    if kind == "exec":
        return f"{who} pid {line.get('pid')} exec {_exec_path(line)}"
    if kind == "exit":
        return f"{who} pid {line.get('pid')} exited"
    if kind == "open":
        return f"{who} pid {line.get('pid')} open {_path(line, 'resolved_path', 'path')} ({line.get('access')})"
    if kind == "change":
        return f"{who} pid {line.get('pid')} {line.get('syscall')} {_path(line, 'resolved_path', 'path')}"
    if kind == "violation":
        return f"violation by agent {line.get('agent')}: {line.get('attempted')} ({line.get('action_taken')})"
    return f"hold {line.get('hold_id')} {line.get('state')}: {line.get('action')}"


# -- ECS --------------------------------------------------------------------------

def to_ecs(line: dict) -> dict:
    """One export line as an ECS 9.4 document (call only where mapped(line))."""
    kind = line["kind"]
    process: dict[str, Any] = {"pid": line.get("pid"), "name": line.get("comm"),
                               "thread": {"id": line.get("tid")},
                               "parent": {"pid": line.get("ppid")} if line.get("ppid") else None,
                               "user": {"id": str(line["uid"])} if line.get("uid") is not None else None,
                               "group": {"id": str(line["gid"])} if line.get("gid") is not None else None}
    file = None
    event: dict[str, Any] = {"action": kind, "outcome": _outcome(line), "kind": "event"}
    if kind == "exec":
        path = _exec_path(line)
        argv = [str(a) for a in line.get("argv") or []]
        process.update(executable=path, name=posixpath.basename(path) if path else line.get("comm"),
                       args=argv or None, args_count=len(argv) or None,
                       command_line=" ".join(argv) or None)
        event.update(category=["process"], type=["start"])
    elif kind == "exit":
        event.update(category=["process"], type=["end"], outcome="unknown")
    elif kind in ("open", "change"):
        path = _path(line, "resolved_path", "path")
        file = {"path": path, "name": posixpath.basename(path.rstrip("/")) if path else None,
                "directory": posixpath.dirname(path) if path else None}
        if kind == "open":
            writes = _is_write_open(line.get("flags") or 0)
            event.update(action="open", category=["file"], type=["change" if writes else "access"])
        else:
            activity = FILE_CHANGES[line["syscall"]][1]
            event.update(action=line["syscall"], category=["file"],
                         type=[{"Delete": "deletion", "Create": "creation"}.get(activity, "change")])
    elif kind == "violation":
        event.update(kind="alert", category=["intrusion_detection"], type=["denied" if _stopped(line) else "info"],
                     action="violation", outcome="unknown", reason=line.get("reason"),
                     severity=_severity(line))
    else:
        state = line.get("state")
        decided = HOLD_DECIDED.get(state)
        event.update(kind="alert" if state == "pending" else "event", category=["intrusion_detection"],
                     type=[decided or "info"], action=f"hold-{state}", reason=line.get("reason"),
                     outcome="unknown", severity=_severity(line))
    if line.get("count"):   # repeated opens: the first and the last of them (their number below)
        event.update(start=line.get("time_iso"), end=line.get("last_time_iso"))
    event.update(module="agentwarden", dataset=f"agentwarden.{kind}", sequence=line.get("seq"),
                 id=f"{line.get('host')}/{line.get('boot_id')}/{line.get('seq')}",
                 created=line.get("time_iso"))
    rule = line.get("verdict_rule") or line.get("rule")
    doc = {
        "@timestamp": line.get("time_iso"),
        "message": _message(line),
        "ecs": {"version": ECS_VERSION},
        "event": event,
        "agent": {"type": "agentwarden", "name": "agentwarden", "version": __version__},
        "host": {"hostname": line.get("host"), "name": line.get("host"), "boot": {"id": line.get("boot_id")}},
        "process": process,
        "file": file,
        "user": {"id": str(line["uid"])} if line.get("uid") is not None else None,
        "rule": {"name": rule, "ruleset": line.get("policy_hash")} if rule else None,
        # Custom fields under one name of our own (ECS reserves the top-level names it defines).
        "agentwarden": {"kind": kind, **{k: line.get(k) for k in ATTRIBUTION}, **_extra(line)},
    }
    return _drop_empty(doc)
