"""`agentwarden log ...`: verify, show, search, replay and export the archive.

These read the archive directory directly, so they work with the daemon down;
the archive is root's alone. Only parsing and error translation live here:
the work is in agentwarden/archive/verify.py and logquery.py.
"""
from __future__ import annotations

import collections
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from agentwarden import logquery, siem
from agentwarden.archive.segments import HEAD_FILE, LOCK_FILE, SEGMENT_NAME, ArchiveError, load_key, read_items
from agentwarden.archive.verify import verify as verify_archive
from agentwarden.errors import AgentwardenError, NoPermission, UsageProblem
from .output import emit, emit_json
from agentwarden.settings import Settings
from agentwarden.wire import RECORD_FIELDS

log_app = typer.Typer(no_args_is_help=True,
                      help="Verify, search, replay and export the archive (works with the daemon down).\n\n"
                           "Example: sudo agentwarden log verify")

_ARCHIVE_HELP = "archive directory (default: $AGENTWARDEN_STATE_DIR/archive, i.e. /var/lib/agentwarden/archive)"


def _archive(archive: Optional[Path]) -> Path:
    """The archive directory, once it is known to be one this user can read."""
    directory = archive or Settings.from_env().archive_dir
    wrong = UsageProblem if archive is not None else AgentwardenError
    denied = NoPermission(f"cannot read the archive {directory}: permission denied "
                          "(it is root's alone: run with sudo)")
    try:
        is_dir = directory.is_dir()
        names = os.listdir(directory) if is_dir else []
    except PermissionError:
        raise denied from None
    if not is_dir:
        raise wrong(f"there is no archive at {directory}")
    ours = [n for n in names if n in (HEAD_FILE, LOCK_FILE) or SEGMENT_NAME.match(n)]
    if not ours:
        raise wrong(f"{directory} is not an archive (no segment-*.awseg, head or lock file); "
                    f"the daemon's is {Settings.from_env().archive_dir}")
    if not all(os.access(directory / n, os.R_OK) for n in ours if n != LOCK_FILE):
        raise denied
    return directory


def _key(key_file: Optional[Path]) -> Optional[bytes]:
    """The key to verify with: --key FILE, else the daemon's key file when it is
    there, else None (fine for an unkeyed archive)."""
    if key_file is not None:
        return load_key(key_file, required=True, check_owner=False)
    default = Settings.from_env().archive.key_file
    try:
        return load_key(default, required=False, check_owner=False) or None
    except ArchiveError:
        return None


def _emit(line: str) -> None:
    try:
        emit(line)
    except BrokenPipeError:  # `log show | head`
        sys.stderr.close()
        raise typer.Exit(0)


@log_app.command()
def verify(key: Optional[Path] = typer.Option(None, "--key", help="the archive key file (default: the "
                                              "daemon's, /etc/agentwarden/archive.key, when present)"),
           archive: Optional[Path] = typer.Option(None, "--archive", help=_ARCHIVE_HELP),
           as_json: bool = typer.Option(False, "--json", help="print the result as one JSON object")):
    """Check the hash chain of every record and segment, the head and retention;
    name the first bad record and why (exit 1).

    Example: sudo agentwarden log verify --key /etc/agentwarden/archive.key
    """
    directory = _archive(archive)
    report = verify_archive(directory, _key(key))
    head = report.head
    if as_json:
        emit_json({"ok": report.ok, "problem": report.problem, "notes": list(report.notes),
                   "records": report.records, "segments": report.segments,
                   "first_seq": report.first_seq, "last_seq": report.last_seq, "keyed": report.keyed,
                   "durable_seq": head.seq if head else None, "archive": str(directory)})
        if not report.ok:
            raise typer.Exit(1)
        return
    for note in report.notes:
        emit(f"note: {note}")
    if not report.ok:
        emit(f"FAILED: {report.problem}")
        raise typer.Exit(1)
    if not report.records:
        emit("OK: the archive is empty")
        return
    emit(f"OK: {report.records} records in {report.segments} segments, seq "
               f"{report.first_seq}..{report.last_seq}, hash chain intact"
               + (" (keyed)" if report.keyed else " (not keyed: detects accidents and edits, "
                  "not a rewrite by root)")
               + (f"; durable up to seq {head.seq}" if head else ""))


def _filter(agent, session, pid, kind, verdict, path, since, until, seq, write: bool = False) -> logquery.Filter:
    kinds = None
    if kind:
        kinds = {k.strip() for part in kind for k in part.split(",") if k.strip()}
        unknown = sorted(kinds - set(RECORD_FIELDS))
        if unknown:
            raise UsageProblem(f"--kind {', '.join(unknown)}: unknown; kinds are "
                                   + ", ".join(sorted(RECORD_FIELDS)))
    try:
        return logquery.Filter(
            agent=agent, session=session, pid=pid, kinds=kinds, verdict=verdict,
            path=logquery.compile_path_glob(path) if path else None,
            since=logquery.parse_time(since, "--since") if since else None,
            until=logquery.parse_time(until, "--until") if until else None,
            seqs=logquery.parse_seq_range(seq) if seq else None, write=write)
    except UsageProblem:
        raise
    except AgentwardenError as exc:   # a filter's value that cannot be
        raise UsageProblem(str(exc)) from None


def _items(directory: Path):
    errors: list[str] = []
    yield from read_items(directory, errors)
    for error in errors:
        emit(f"agentwarden: warning: skipped what could not be read: {error} "
                   "(run `agentwarden log verify`)", err=True)


def _print(directory: Path, flt: logquery.Filter, as_json: bool, limit: int) -> int:
    shown = 0
    attribution = logquery.Attribution()
    for item in _items(directory):
        attribution.see(item.record)
        if not flt.matches(item.record):
            continue
        if as_json:
            _emit(json.dumps(logquery.export_record(item.record, item.header, attribution), sort_keys=False))
        else:
            _emit(logquery.human(item.record))
        shown += 1
        if limit and shown >= limit:
            break
    return shown


_AGENT = typer.Option(None, "--agent", help="only records of this agent")
_SESSION = typer.Option(None, "--session", help="only records of this session id")
_PID = typer.Option(None, "--pid", help="only records of this process id")
_KIND = typer.Option(None, "--kind", help="only these kinds (repeat or comma-separate: exec,open,"
                     "violation,admin,session,archive,...; health and tags only when named)")
_VERDICT = typer.Option(None, "--verdict", help="only decisions of this kind: allow, hold, violation, deny")
_PATH = typer.Option(None, "--path", help="only events naming a path matching this glob (as in "
                     "policies: * within a component, ** across them)")
_SINCE = typer.Option(None, "--since", help="from this time: 2024-05-01T10:00, unix seconds, or 2h (ago)")
_UNTIL = typer.Option(None, "--until", help="up to this time (same forms as --since)")
_SEQ = typer.Option(None, "--seq", help="one seq (1234) or a range (1200..1300, 1200..)")
_JSON = typer.Option(False, "--json", help="one JSON object per line (the export format)")
_LIMIT = typer.Option(0, "--limit", help="stop after this many records (0: no limit)")
_ARCHIVE = typer.Option(None, "--archive", help=_ARCHIVE_HELP)


@log_app.command()
def show(agent: Optional[str] = _AGENT, session: Optional[str] = _SESSION, pid: Optional[int] = _PID,
         kind: Optional[List[str]] = _KIND, verdict: Optional[str] = _VERDICT,
         path: Optional[str] = _PATH, since: Optional[str] = _SINCE, until: Optional[str] = _UNTIL,
         seq: Optional[str] = _SEQ, as_json: bool = _JSON, limit: int = _LIMIT,
         archive: Optional[Path] = _ARCHIVE):
    """Show archived records, oldest first (all of them, or those the filters select).

    Example: sudo agentwarden log show --seq 1200..1300
    """
    _print(_archive(archive), _filter(agent, session, pid, kind, verdict, path, since, until, seq),
           as_json, limit)


@log_app.command()
def search(agent: Optional[str] = _AGENT, session: Optional[str] = _SESSION, pid: Optional[int] = _PID,
           kind: Optional[List[str]] = _KIND, verdict: Optional[str] = _VERDICT,
           path: Optional[str] = _PATH, since: Optional[str] = _SINCE, until: Optional[str] = _UNTIL,
           seq: Optional[str] = _SEQ, as_json: bool = _JSON, limit: int = _LIMIT,
           archive: Optional[Path] = _ARCHIVE,
           write: bool = typer.Option(False, "--write", help="only changes to files: write-opens, change "
                                      "calls (rename, unlink, chmod...) and drift records")):
    """Find records by agent, session, pid, kind, verdict, path glob and time (at least one
    filter); exit 1 when nothing matches.

    Example: sudo agentwarden log search --agent coder --write --path '/etc/**' --since 7d
    """
    flt = _filter(agent, session, pid, kind, verdict, path, since, until, seq, write)
    if not flt.any:
        raise UsageProblem("give at least one filter (--agent, --session, --pid, --kind, --verdict, "
                               "--path, --since, --until, --seq, --write), or use `agentwarden log show`")
    if not _print(_archive(archive), flt, as_json, limit):
        raise AgentwardenError("no records match")


@log_app.command()
def replay(session: str = typer.Argument(..., help="a session id, or an agent name that has one session"),
           as_json: bool = typer.Option(False, "--json", help="one JSON object: session, processes, timeline"),
           archive: Optional[Path] = _ARCHIVE):
    """Replay a session: who it acted for, its process tree (what ran, what it opened,
    violations and what was done), and the timeline, admins' actions included.

    Example: sudo agentwarden log replay coder-3f2a9c1b0d4e
    """
    directory = _archive(archive)
    wanted = logquery.pick_session(session, logquery.sessions_in(_items(directory)))
    attribution = logquery.Attribution()
    exported: dict[int, dict] = {}

    def records():
        for item in _items(directory):
            attribution.see(item.record)
            record = item.record
            if as_json and (record.get("session") == wanted or record["kind"] in ("session", "admin", "archive")):
                exported[item.seq] = logquery.export_record(record, item.header, attribution)
            yield record

    result = logquery.build_replay(records(), wanted)
    if as_json:
        _emit(json.dumps(result.as_json(lambda r: exported[r["seq"]])))
        return
    for line in logquery.replay_text(result):
        _emit(line)


@log_app.command()
def export(fmt: str = typer.Option("jsonl", "--format", help="jsonl: one JSON object per record, "
                                   "with the stable fields listed in docs/archive.md; ocsf: OCSF 1.8 "
                                   "events; ecs: Elastic Common Schema documents (docs/observability.md)"),
           output: Optional[Path] = typer.Option(None, "--output", "-o", help="write to this file "
                                                 "(created 0600) instead of standard output"),
           agent: Optional[str] = _AGENT, session: Optional[str] = _SESSION, pid: Optional[int] = _PID,
           kind: Optional[List[str]] = _KIND, verdict: Optional[str] = _VERDICT,
           path: Optional[str] = _PATH, since: Optional[str] = _SINCE, until: Optional[str] = _UNTIL,
           seq: Optional[str] = _SEQ, archive: Optional[Path] = _ARCHIVE):
    """Export records for a SIEM, with every event's attribution (agent, session, person,
    task, user, host, policy hash).

    Example: sudo agentwarden log export --format ocsf --since 1d -o /var/tmp/agentwarden.ocsf.jsonl
    """
    if fmt not in siem.FORMATS:
        raise UsageProblem(f"--format {fmt!r}: use one of {', '.join(siem.FORMATS)}")
    convert = siem.converter(fmt)
    left_out: collections.Counter = collections.Counter()   # kinds the format has no class for
    directory = _archive(archive)
    flt = _filter(agent, session, pid, kind, verdict, path, since, until, seq)
    attribution = logquery.Attribution()
    out = sys.stdout
    if output is not None:
        try:
            out = os.fdopen(os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w")
        except OSError as exc:
            raise AgentwardenError(f"cannot write {output}: {exc.strerror}") from None
    count = 0
    try:
        for item in _items(directory):
            attribution.see(item.record)
            if flt.matches(item.record):
                line = logquery.export_record(item.record, item.header, attribution)
                if fmt != "jsonl" and not siem.mapped(line):
                    left_out[line["kind"]] += 1
                    continue
                out.write(json.dumps(convert(line)) + "\n")
                count += 1
    except BrokenPipeError:
        sys.stderr.close()
        raise typer.Exit(0)
    finally:
        if out is not sys.stdout:
            out.close()
    skipped = (f"; {sum(left_out.values())} records of kinds {fmt} has no class for left out ("
               + ", ".join(f"{k} {n}" for k, n in sorted(left_out.items())) + ")") if left_out else ""
    if output is not None or skipped:
        emit(f"exported {count} records" + (f" to {output}" if output is not None else "") + skipped, err=True)
