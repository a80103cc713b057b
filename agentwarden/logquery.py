"""Reading the archive for people and SIEMs: filters, attribution, replay and
the export format. Pure functions over records (as read by
``agentwarden.archive.segments.read_items``); the CLI in cli/log.py only parses and prints.
"""
from __future__ import annotations

import collections
import datetime as dt
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from . import render
from .durations import DurationError, has_unit, parse_duration
from .errors import AgentwardenError
from .policy.decide import is_write as policy_is_write
from .policy.glob import GlobError, path_key, path_regex
from . import wire
from .wire import text

EXPORT_SCHEMA = "agentwarden.export.v1"
NOISE_KINDS = ("health", "tags")  # shown only when asked for by --kind
RECENT_EVENTS = 100_000  # events remembered so that a violation matches its event's path

# Fields every exported line has (null when they do not apply), in this order.
EXPORT_COMMON = ("schema", "seq", "time", "time_iso", "kind", "host", "boot_id", "agent", "session",
                 "person", "task", "session_user", "policy_hash", "pid", "tid", "ppid", "uid", "gid",
                 "comm", "cgroup_id", "agent_cgroup_id")


# ---- parsing user input ---------------------------------------------------------


def parse_time(value: str, option: str, now: float | None = None) -> int:
    """A point in time as unix ns, from: an ISO 8601 date/time (local time unless
    it names a zone), unix seconds, or a duration ago (30s, 10m, 2h, 7d)."""
    value = value.strip()
    now = time.time() if now is None else now
    if has_unit(value):
        try:
            return int((now - parse_duration(value, option)) * 1e9)
        except DurationError:
            pass
    try:
        return int(float(value) * 1e9)
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise AgentwardenError(f"{option} {value!r}: give a time like 2024-05-01T10:00, unix seconds, "
                               "or a duration ago like 10m, 2h or 7d") from None
    if parsed.tzinfo is None:
        parsed = parsed.astimezone()  # local time
    return int(parsed.timestamp() * 1e9)


def compile_path_glob(glob: str, option: str = "--path"):
    """The policy's path glob (* within one component, ** across them) as a matcher."""
    try:
        regex = re.compile(path_regex(glob) + r"\Z")
    except GlobError as exc:
        raise AgentwardenError(f"{option} {glob!r}: {exc}") from None
    return lambda path: bool(regex.match(path_key(path)))


def parse_seq_range(value: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*(?:(\.\.)\s*(\d*)\s*)?", value)
    if not match:
        raise AgentwardenError(f"--seq {value!r}: give a seq (1234) or a range (1200..1300, 1200..)")
    first = int(match.group(1))
    if not match.group(2):
        return first, first
    return first, int(match.group(3)) if match.group(3) else 1 << 63


# ---- filters --------------------------------------------------------------------

def record_paths(record: dict) -> list[str]:
    """The paths an event names: as given and as resolved (and the real file)."""
    kind = record["kind"]
    keys = {"open": ("resolved_path", "path", "real_path"), "chdir": ("resolved_path", "path"),
            "exec": ("resolved_exec_path", "resolved_filename", "exec_path", "filename", "real_path"),
            "change": ("resolved_path", "path", "real_path", "resolved_path2", "path2", "real_path2"),
            "drift": ("path",),
            "sidedoor": ("resolved_path", "path")}
    return [text(record[k]) for k in keys.get(kind, ()) if isinstance(record.get(k), (str, bytes)) and record[k]]


def is_change(record: dict) -> bool:
    """Whether a record is a file change: a write-open, a change call, a drift record."""
    kind = record["kind"]
    if kind == "open":
        return isinstance(record.get("flags"), int) and policy_is_write(record["flags"])
    return kind in ("change", "drift")


def decision_of(record: dict) -> str | None:
    if record["kind"] == "violation":
        return record.get("decision")
    verdict = record.get("verdict")
    return verdict.get("decision") if isinstance(verdict, dict) else None


@dataclass
class Filter:
    agent: str | None = None
    session: str | None = None
    pid: int | None = None
    kinds: set[str] | None = None
    verdict: str | None = None
    path: Any = None                    # a matcher from compile_path_glob
    since: int | None = None            # unix ns
    until: int | None = None
    seqs: tuple[int, int] | None = None
    write: bool = False                 # only changes: write-opens, change calls, drift records
    _recent: collections.OrderedDict = field(default_factory=collections.OrderedDict)

    def __post_init__(self):
        if self.verdict is not None and self.verdict not in wire.DECISIONS:
            raise AgentwardenError(f"--verdict {self.verdict!r}: use one of {', '.join(wire.DECISIONS)}")

    @property
    def any(self) -> bool:
        return self.write or any(v is not None for v in (self.agent, self.session, self.pid, self.kinds,
                                                         self.verdict, self.path, self.since, self.until,
                                                         self.seqs))

    def _remember(self, record: dict) -> None:
        if record["kind"] in wire.DECIDED_KINDS and self.path is not None:
            self._recent[record["seq"]] = record_paths(record)
            if len(self._recent) > RECENT_EVENTS:
                self._recent.popitem(last=False)

    def matches(self, record: dict) -> bool:
        self._remember(record)
        kind = record["kind"]
        if self.kinds is not None:
            if kind not in self.kinds:
                return False
        elif kind in NOISE_KINDS:
            return False
        if self.seqs and not self.seqs[0] <= record["seq"] <= self.seqs[1]:
            return False
        if self.write and not is_change(record):
            return False
        if self.since is not None and record["time"] < self.since:
            return False
        if self.until is not None and record["time"] > self.until:
            return False
        if self.agent is not None and record.get("agent") != self.agent:
            return False
        if self.session is not None and record.get("session") != self.session and \
                self.session not in (record.get("sessions") or ()):
            return False
        if self.pid is not None and record.get("pid") != self.pid:
            return False
        if self.verdict is not None and decision_of(record) != self.verdict:
            return False
        if self.path is not None:
            paths = self._recent.get(record.get("event_seq"), []) if kind == "violation" else record_paths(record)
            if not any(self.path(p) for p in paths):
                return False
        return True


# ---- attribution ------------------------------------------------------------------

class Attribution:
    """Follows the archive in order: the sessions and the policy in force at each record."""

    def __init__(self):
        self.sessions: dict[str, dict] = {}
        self.policy_hash: str | None = None

    def see(self, record: dict) -> None:
        kind = record["kind"]
        if kind == "session":
            self.sessions[record["session"]] = record
        elif kind == "policy" and record.get("status") in ("loaded", "none", "in-force"):
            self.policy_hash = record.get("policy_hash")

    def of(self, record: dict) -> dict[str, Any]:
        session_id = record.get("session")
        session = self.sessions.get(session_id, {}) if session_id else {}
        verdict = record.get("verdict") if isinstance(record.get("verdict"), dict) else {}
        return {"agent": record.get("agent") or session.get("agent"), "session": session_id,
                "person": session.get("person"), "task": session.get("task"),
                "session_user": session.get("user"),
                "policy_hash": record.get("policy_hash") or verdict.get("policy_hash") or self.policy_hash}


# ---- export -------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    """JSON-ready: bytes that are not UTF-8 become text with \\xNN escapes."""
    if isinstance(value, bytes):
        return text(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def iso(ns: int) -> str:
    seconds, rest = divmod(ns, 1_000_000_000)
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + f".{rest:09d}Z"


def export_record(record: dict, header, attribution: Attribution) -> dict[str, Any]:
    """One exported line: EXPORT_COMMON, then the record's own fields under
    their wire names (``verdict`` flattened to verdict_decision / verdict_rule;
    opens get ``access``)."""
    line: dict[str, Any] = dict.fromkeys(EXPORT_COMMON)
    line.update(schema=EXPORT_SCHEMA, seq=record["seq"], time=record["time"], time_iso=iso(record["time"]),
                kind=record["kind"], host=header.host, boot_id=header.boot_id)
    line.update(attribution.of(record))
    for key, value in record.items():
        if key == "verdict" and isinstance(value, dict):
            line["verdict_decision"] = value.get("decision")
            line["verdict_rule"] = value.get("rule")
        elif key not in line or line[key] is None:
            line[key] = _plain(value)
    if record["kind"] == "open" and isinstance(record.get("flags"), int):
        line["access"] = render.open_mode(record["flags"])
    if record["kind"] == "open" and isinstance(record.get("last_time"), int):
        line["last_time_iso"] = iso(record["last_time"])   # repeated opens: the last of them
    if record["kind"] == "drift":
        line.update(drift_fields(record))
    return line


def drift_fields(record: dict) -> dict[str, Any]:
    """A drift record's content before and after, and the admin's answer, as
    flat fields (before_sha256, before_size, before_mode, before_uid, ...)."""
    flat: dict[str, Any] = {}
    for side in ("before", "after"):
        facts = record.get(side) if isinstance(record.get(side), dict) else {}
        for key in ("kind", "sha256", "size", "mode", "uid", "gid"):
            flat[f"{side}_{key}"] = facts.get(key)
    admin = record.get("admin") if isinstance(record.get("admin"), dict) else {}
    flat.update(admin_name=admin.get("name"), admin_uid=admin.get("uid"), admin_reason=admin.get("reason"),
                expires_iso=iso(record["expires"]) if isinstance(record.get("expires"), int) else None)
    return flat


# ---- show -----------------------------------------------------------------------

def human(record: dict) -> str:
    kind = record["kind"]
    if kind == "health":
        line = f"HEALTH {record['stage']}: " + ", ".join(
            f"{k}={v}" for k, v in sorted(record["counters"].items()) if not isinstance(v, dict))
    elif kind == "tags":
        line = "TAGS " + (", ".join(f"{v.get('agent')}={v.get('path')}" for v in record["agents"].values()
                                    if isinstance(v, dict)) or "none")
    else:
        return f"#{record['seq']:<8} " + render.human(record, with_date=True)
    return f"#{record['seq']:<8} {render.dated(record['time'])} {line}"


# ---- replay ---------------------------------------------------------------------

@dataclass
class Process:
    pid: int
    ppid: int | None = None
    started: int | None = None
    comm: str | None = None
    execs: list[dict] = field(default_factory=list)
    opens: list[dict] = field(default_factory=list)
    chdirs: list[dict] = field(default_factory=list)
    violations: list[dict] = field(default_factory=list)
    forked: list[int] = field(default_factory=list)
    exited: int | None = None
    own_events: int = 0   # records with this pid (threads have none of their own)

    def program(self) -> str:
        for e in reversed(self.execs):
            if not e.get("error"):
                return " ".join(text(a) for a in e["argv"]) or text(e["filename"])
        return f"({self.comm})" if self.comm else "(no exec seen)"

    def as_json(self, children: list[int]) -> dict:
        return {"pid": self.pid, "ppid": self.ppid, "started": self.started, "exited": self.exited,
                "comm": self.comm,
                "execs": [{"seq": e["seq"], "time": e["time"], "path": text(e.get("resolved_exec_path")
                           or e.get("resolved_filename") or e["filename"]), "argv": _plain(e["argv"]),
                           "error": e.get("error"), "killed_in_kernel": e.get("killed_in_kernel", False)}
                          for e in self.execs],
                "opens": [{"seq": o["seq"], "time": o["time"], "path": text(o.get("resolved_path") or o["path"]),
                           "access": render.open_mode(o["flags"]), "error": o.get("error")}
                          for o in self.opens],
                "violations": [{"seq": v["seq"], "attempted": v["attempted"], "decision": v["decision"],
                                "action_taken": v["action_taken"]} for v in self.violations],
                "children": children}


@dataclass
class Replay:
    session: str
    sessions: list[dict]                   # the session's records (start, changes, end)
    processes: dict[int, Process]
    roots: list[int]
    children: dict[int, list[int]]
    timeline: list[dict]                   # the session's records in archive order
    host: str | None = None

    def as_json(self, attribution_line) -> dict:
        return {"session": _plain(self.sessions[-1]) if self.sessions else {"session": self.session},
                "session_records": [_plain(s) for s in self.sessions],
                "roots": self.roots,
                "processes": [self.processes[p].as_json(self.children.get(p, [])) for p in self._order()],
                "timeline": [attribution_line(r) for r in self.timeline]}

    def _order(self) -> list[int]:
        out: list[int] = []

        def walk(pid: int) -> None:
            out.append(pid)
            for child in self.children.get(pid, []):
                walk(child)
        for root in self.roots:
            walk(root)
        return out


def sessions_in(items: Iterable) -> dict[str, dict]:
    """Every session id in the archive -> its latest session record."""
    found: dict[str, dict] = {}
    for item in items:
        record = item.record
        if record["kind"] == "session":
            found[record["session"]] = record
    return found


def pick_session(wanted: str, sessions: dict[str, dict]) -> str:
    """A session id from an id, or from an agent name with exactly one session."""
    if wanted in sessions:
        return wanted
    of_agent = sorted(s for s, r in sessions.items() if r.get("agent") == wanted)
    if len(of_agent) == 1:
        return of_agent[0]
    if of_agent:
        raise AgentwardenError(f"agent {wanted!r} has {len(of_agent)} sessions; name one: "
                               + ", ".join(of_agent))
    known = ", ".join(sorted(sessions)[:20]) or "none"
    raise AgentwardenError(f"no session {wanted!r} in the archive (sessions: {known}); "
                           "`agentwarden log search --kind session` lists them")


def build_replay(records: Iterable[dict], session: str) -> Replay:
    processes: dict[int, Process] = {}
    timeline: list[dict] = []
    sessions: list[dict] = []

    def proc(pid: int) -> Process:
        if pid not in processes:
            processes[pid] = Process(pid)
        return processes[pid]

    for record in records:
        kind = record["kind"]
        if kind == "session":
            if record["session"] == session:
                sessions.append(record)
                timeline.append(record)
            continue
        if kind == "admin":
            if session in (record.get("sessions") or ()):
                timeline.append(record)
            continue
        if kind == "archive" and record.get("event") in ("disk-full", "disk-ok", "write-failed"):
            if sessions and sessions[-1]["status"] == "active":
                timeline.append(record)
            continue
        if record.get("session") != session:
            continue
        timeline.append(record)
        if kind == "violation":
            proc(record["pid"]).violations.append(record)
            continue
        if kind not in wire.EVENT_KINDS:
            continue
        p = proc(record["pid"])
        p.own_events += 1
        p.comm = text(record["comm"])
        if p.started is None:
            p.started = record["time"]
        if p.ppid is None or kind == "exec":
            p.ppid = record.get("ppid")
        if kind == "exec":
            p.execs.append(record)
        elif kind == "open":
            p.opens.append(record)
        elif kind == "chdir":
            p.chdirs.append(record)
        elif kind == "fork":
            child = proc(record["child_pid"])
            child.ppid = record["pid"]
            if child.started is None:
                child.started = record["time"]
            p.forked.append(record["child_pid"])
        elif kind == "exit":
            p.exited = record["time"]
    # A fork child that never did anything of its own is a thread (the kernel
    # reports thread creation as a fork too): fold it away.
    shown = {pid: p for pid, p in processes.items() if p.own_events or p.violations}
    children: dict[int, list[int]] = collections.defaultdict(list)
    roots = []
    for pid, p in sorted(shown.items(), key=lambda kv: (kv[1].started or 0, kv[0])):
        if p.ppid in shown and p.ppid != pid:
            children[p.ppid].append(pid)
        else:
            roots.append(pid)
    return Replay(session, sessions, shown, roots, dict(children), timeline)


MAX_OPENS_SHOWN = 12


def replay_text(replay: Replay) -> Iterator[str]:
    s = replay.sessions[-1] if replay.sessions else None
    if s:
        yield (f"session {s['session']}: agent {s['agent']}, person {s.get('person') or 'unknown'}, "
               f"task {s.get('task') or 'unknown'}, user {s.get('user') or 'unknown'}")
        yield (f"  host {s['host']} (boot {s['boot_id'][:8]}), cgroup {s.get('cgroup')}, "
               f"policy {s.get('policy_hash') or 'none'}, from {s['source']}")
        first, last = replay.sessions[0], replay.sessions[-1]
        yield (f"  seen from {render.clock(first['time'])}"
               + (f", ended {render.clock(last['time'])}" if last["status"] == "ended" else ", still active"))
    yield ""
    yield "process tree:"
    if not replay.roots:
        yield "  (no processes recorded)"

    def walk(pid: int, prefix: str, last: bool, top: bool) -> Iterator[str]:
        p = replay.processes[pid]
        branch = "" if top else ("└─ " if last else "├─ ")
        ran = p.execs[-1] if p.execs else None
        where = text(ran.get("resolved_exec_path") or ran["filename"]) if ran else ""
        end = f", exited {render.clock(p.exited)}" if p.exited else ""
        yield f"{prefix}{branch}{pid} {p.program()}" + (f"  [{where}]" if where else "") + end
        inner = prefix + ("" if top else ("   " if last else "│  "))
        kids = replay.children.get(pid, [])
        detail = inner + ("│    " if kids else "     ")
        for e in p.execs[:-1] if p.execs and not p.execs[-1].get("error") else p.execs:
            yield f"{detail}exec {text(e['filename'])} -> {e.get('error') or 'ok'}"
        for o in p.opens[:MAX_OPENS_SHOWN]:
            result = o.get("error") or f"fd {o['ret']}"
            yield f"{detail}open {render.open_mode(o['flags'])} {text(o.get('resolved_path') or o['path'])} -> {result}"
        if len(p.opens) > MAX_OPENS_SHOWN:
            yield f"{detail}... and {len(p.opens) - MAX_OPENS_SHOWN} more opens (see the timeline)"
        for v in p.violations:
            yield f"{detail}VIOLATION {v['attempted']}: {v['decision']} -> {v['action_taken']}"
        for i, child in enumerate(kids):
            yield from walk(child, inner, i == len(kids) - 1, False)

    for root in replay.roots:
        yield from walk(root, "  ", True, True)
    yield ""
    yield "timeline:"
    for record in replay.timeline:
        yield "  " + human(record)
