"""`agentwarden drift`: changes agents made to tracked files, their state,
diffs, and an admin's revert, accept and baseline. Only parsing, printing and
error translation live here: the index and store are agentwarden.drift's;
accept and baseline are done by the supervisor (who asks is the kernel's word,
and it archives the action); a revert is checked by the supervisor, written by
this process (agentwarden.drift.revert) and archived by the supervisor once it
sees the file as before."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import List, Optional

import typer

from agentwarden import drift, render
from agentwarden.durations import parse_duration
from agentwarden.errors import AgentwardenError, NoPermission
from agentwarden.settings import Settings
from .output import emit_json

drift_app = typer.Typer(invoke_without_command=True, no_args_is_help=False,
                        help="Changes agents made to tracked files: list, show, revert, accept, baseline.\n\n"
                             "Example: sudo agentwarden drift --expired")


def _index() -> tuple[drift.Index, drift.Store]:
    settings = Settings.from_env()
    directory = settings.drift_dir
    if directory.exists() and not os.access(directory, os.R_OK | os.X_OK):
        raise NoPermission(f"cannot read {directory}: permission denied (it is root's alone: run with sudo)")
    return drift.Index(directory), drift.Store(directory, settings.drift_store_max)


def _request(message: dict) -> dict:
    from agentwarden import session
    return session.admin_request(Settings.from_env(), message)


@drift_app.callback()
def drift_list(ctx: typer.Context,
               agent: Optional[str] = typer.Option(None, "--agent", help="only this agent's changes"),
               since: Optional[str] = typer.Option(None, "--since", help="only changes this recent (90m, 7d)"),
               expired: bool = typer.Option(False, "--expired", help="only changes whose approval expired"),
               as_json: bool = typer.Option(False, "--json", help="one JSON object per change")):
    """One line per changed file: when, id, state (active, expired, accepted,
    reverted, diverged), path, agent, person, task, approver and reason,
    content before -> after, expiry. Baselined files changed since (by anyone)
    are listed as diverged, with ids b-....

    Example: sudo agentwarden drift --agent coder --since 7d
    """
    if ctx.invoked_subcommand is not None:
        return
    since_ns = time.time_ns() - int(parse_duration(since, "--since") * 1e9) if since else None
    index, _ = _index()
    rows = drift.listing(index, agent, since_ns, expired)
    for row in rows:
        typer.echo(json.dumps(row, default=str) if as_json else render.drift_row(row))


@drift_app.command("show")
def drift_show(change_id: str = typer.Argument(..., help="a change id from `agentwarden drift`"),
               as_json: bool = typer.Option(False, "--json", help="the change as one JSON object")):
    """One change: its attribution and the diff (text), or sizes and hashes (binary).

    Example: sudo agentwarden drift show c-1a2b3c4d5e
    """
    index, store = _index()
    change = drift.find(index, change_id)
    current = drift.observe(change["path"])
    row = {**change, "state": drift.state(change, current, time.time_ns()) if change["source"] != "baseline"
           else ("diverged" if not drift.same(change["before"], current) else "active"), "now": current}
    if as_json:
        typer.echo(json.dumps(row, default=str))
        return
    typer.echo(render.drift_row(row))
    after = change.get("after") or current
    for line in drift.diff(store, change["path"], change.get("before"), after, drift.read_now(change["path"])):
        typer.echo(line)
    if row["state"] == "diverged" and change["source"] != "baseline":
        typer.echo(f"now:    {drift.describe(current)} (changed since)")


@drift_app.command("revert")
def drift_revert(change_id: str = typer.Argument(..., help="a change id from `agentwarden drift`"),
                 force: bool = typer.Option(False, "--force", help="even when the file changed since (diverged)"),
                 reason: Optional[str] = typer.Option(None, "--reason", help="why (archived)"),
                 as_json: bool = typer.Option(False, "--json", help="print the result as one JSON object")):
    """Put the file back as it was before the change: bytes, mode, owner (or
    remove it, if it did not exist). The daemon checks and archives; this
    command writes the file, as root in your mount namespace. Refused, with
    nothing written, when the file changed since (unless --force), is now a
    directory or a symlink, or the store's copy is missing or corrupted. Exit
    status 1 when refused.

    Example: sudo agentwarden drift revert c-1a2b3c4d5e --reason "debug flag left on"
    """
    _, store = _index()
    # The supervisor checks and will archive; this process writes, as the admin
    # in the admin's mount namespace (the daemon's unit sees /etc read-only).
    granted = _request({"cmd": "drift-revert", "id": change_id, "force": force, "reason": reason})
    try:
        drift.revert(store, granted["change"], force)
    except BaseException as exc:
        try:
            _request({"cmd": "drift-reverted", "token": granted["token"], "error": str(exc) or type(exc).__name__})
        except AgentwardenError:
            pass   # the grant lapses by itself; nothing was written
        raise
    change = _request({"cmd": "drift-reverted", "token": granted["token"]})["change"]
    if as_json:
        emit_json({"id": change_id, "state": "reverted", "change": change})
    else:
        typer.echo(f"{change_id}: reverted {change['path']} to {drift.describe(change['before'])}")


@drift_app.command("accept")
def drift_accept(change_id: str = typer.Argument(..., help="a change id from `agentwarden drift`"),
                 reason: Optional[str] = typer.Option(None, "--reason", help="why (archived)"),
                 as_json: bool = typer.Option(False, "--json", help="print the result as one JSON object")):
    """Make a change permanent: no longer active or expired, never reported again.

    Example: sudo agentwarden drift accept c-1a2b3c4d5e --reason "the new pool size stays"
    """
    change = _request({"cmd": "drift-accept", "id": change_id, "reason": reason})["change"]
    if as_json:
        emit_json({"id": change_id, "state": "accepted", "change": change})
    else:
        typer.echo(f"{change_id}: accepted ({change['path']})")


@drift_app.command("baseline")
def drift_baseline(paths: List[Path] = typer.Argument(..., help="files to record as they are now"),
                   reason: Optional[str] = typer.Option(None, "--reason", help="why (archived)"),
                   as_json: bool = typer.Option(False, "--json", help="print the result as one JSON object")):
    """Record files as they are now, so that later changes made outside
    sessions (by agents, or anyone) are listed and shown as diffs.

    Example: sudo agentwarden drift baseline /etc/nginx/nginx.conf /etc/hosts
    """
    absolute = [os.path.abspath(p) for p in paths]
    baselines = _request({"cmd": "drift-baseline", "paths": absolute, "reason": reason})["baselines"]
    if as_json:
        emit_json({"baselines": baselines})
        return
    for entry in baselines:
        typer.echo(f"{entry['path']}: baseline {drift.describe(entry['before'])}")
