"""The `agentwarden` command. Only parsing, printing and error translation live here."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import List, Optional

import typer

from agentwarden import agentdef, cgroups, control, doctor, identity, journal, render, settings as settings_mod, wire
from . import output
from .drift import drift_app
from .fleet import fleet_app
from .log import log_app
from .output import emit, emit_json, paint
from .policy import policy_app
from .up import run_probe_and_daemon
from agentwarden.durations import parse_duration
from agentwarden.errors import EXIT_INTERRUPTED, AgentwardenError, NeedsRoot, NoPermission, UsageProblem
from agentwarden.settings import Settings

app = typer.Typer(pretty_exceptions_enable=False, context_settings=output.CONTEXT_SETTINGS,
                  help="Watch and govern what AI agents execute and open.\n\n"
                       "Exit codes: 0 ok, 1 found a problem or denied, 2 usage, 3 daemon "
                       "unreachable, 4 permission, 130 interrupted (docs/cli.md).\n\n"
                       "Example: sudo agentwarden up")

app.add_typer(policy_app, name="policy")
app.add_typer(log_app, name="log")
app.add_typer(drift_app, name="drift")
app.add_typer(fleet_app, name="fleet")

TAIL_KINDS = {*wire.EVENT_KINDS, "gap", "violation", "admin", "policy", "archive", "hold", "drift"}


@app.callback()
def _global_options(
        config: Optional[Path] = typer.Option(
            None, "--config", metavar="FILE", show_default=False,
            help="config file instead of /etc/agentwarden/config.toml (its config.d/ drop-ins "
                 "are read too); also AGENTWARDEN_CONFIG"),
        set_: Optional[List[str]] = typer.Option(
            None, "--set", metavar="KEY=VALUE", show_default=False,
            help="override one setting, beating config files and environment; repeatable. "
                 "Example: --set run_dir=/tmp/aw/run"),
        color: output.Color = typer.Option(
            output.Color.auto, "--color", case_sensitive=False, show_default="auto",
            help="colour the output: auto (on a terminal, unless NO_COLOR is set), always, never"),
        version: bool = typer.Option(
            False, "--version", is_eager=True, callback=output.print_version,
            help="print the version and exit")):
    """Watch and govern what AI agents execute and open."""
    settings_mod.use_flags(config, set_ or [])
    output.use_color(color)


def _settings() -> Settings:
    return Settings.from_env()


def _logging(name: str) -> None:
    journal.setup_logging(name)   # the journal, with fields, under systemd; else stderr


def _echo(lines: list[str]) -> None:
    for line in lines:
        emit(line)


_JSON_HELP = "print the result as one JSON object"


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise NeedsRoot(what)


@app.command()
def up(ready_timeout: float = typer.Option(60.0, help="Seconds to wait for the probe to load.")):
    """Run probe and daemon in the foreground with embedded defaults.

    Example: sudo agentwarden up
    """
    _need_root("agentwarden up")
    settings = _settings()
    stopped_by = run_probe_and_daemon(
        settings, ready_timeout,
        on_ready=lambda: _echo(render.banner(settings, cgroups.cgroup2_root(), settings_mod.flag_args())))
    if stopped_by == signal.SIGINT:
        raise typer.Exit(EXIT_INTERRUPTED)


@app.command()
def probe():
    """Run the probe alone (for service managers)."""
    _logging("probe")
    from agentwarden.probe import main as probe_main
    raise typer.Exit(probe_main.main(_settings()))


@app.command()
def daemon():
    """Run the daemon alone (for service managers)."""
    _need_root("the daemon")
    _logging("daemon")
    from agentwarden.daemon import main as daemon_main
    daemon_main.main(_settings())


@app.command()
def tag(cgroup: str = typer.Argument(..., help="cgroup path, absolute or relative to the cgroup v2 root"),
        agent: str = typer.Option(..., "--agent", help="agent name (letters, digits, _ . @ -)"),
        create: bool = typer.Option(False, "--create", help="create the cgroup if it does not exist"),
        as_json: bool = typer.Option(False, "--json", help=_JSON_HELP)):
    """Mark a cgroup (and every cgroup below it) as an agent. With cgroup_scope
    set, the cgroup must be below the scope (the probe watches nothing else).

    Example: sudo agentwarden tag agents/coder --agent coder --create
    """
    _need_root("tagging a cgroup")
    try:
        cgroups.validate_agent_name(agent)
    except AgentwardenError as exc:
        raise UsageProblem(str(exc)) from None
    settings = _settings()
    _check_in_scope(settings, cgroup)
    path = cgroups.resolve(cgroup, create=create)
    cgroups.tag(path, agent)
    cgid = cgroups.cgroup_id(path)
    if not as_json:
        emit(f"tagged {path} as agent {agent!r} (cgroup id {cgid})")
    seen = control.wait_for_tag(settings, cgid, present=True)
    if as_json:
        emit_json({"cgroup": str(path), "agent": agent, "cgroup_id": cgid,
                   "watched": seen, "daemon": seen is not None})
    if seen is None:
        if not as_json:
            emit("agentwarden is not running: the probe will watch it when it starts")
    elif not seen:
        raise AgentwardenError("the probe did not pick up the tag within 5 s; check `agentwarden status`")
    elif not as_json:
        emit("the probe watches it now")


def _check_in_scope(settings: Settings, cgroup: str) -> None:
    """Refuse at once a cgroup this instance's probe would never watch."""
    scope = settings.cgroup_scope
    if not scope:
        return
    root = cgroups.cgroup2_root()
    given = Path(cgroup)
    path = Path(os.path.normpath(given if given.is_absolute() else root / given))
    top = root / scope
    if path == top or top in path.parents:
        return
    inside = path.name if root in path.parents else given.name
    raise UsageProblem(f"{path} is outside this instance's cgroup_scope {scope!r}: its probe watches "
                       f"only {top}; use {scope}/{inside} (agentwarden tag {scope}/{inside} ...)")


@app.command()
def untag(cgroup: str = typer.Argument(..., help="cgroup path, absolute or relative to the cgroup v2 root"),
          as_json: bool = typer.Option(False, "--json", help=_JSON_HELP)):
    """Stop treating a cgroup as an agent.

    Example: sudo agentwarden untag agents/coder
    """
    _need_root("untagging a cgroup")
    path = cgroups.resolve(cgroup)
    if not cgroups.untag(path):
        auto = cgroups.scan_tagged(cgroups.cgroup2_root(), _settings().agents_slice)
        if cgroups.cgroup_id(path) in auto:
            raise AgentwardenError(f"{path} is not tagged: it is an agent because it is a unit of "
                                   f"{_settings().agents_slice}; stop the unit or run it in another slice")
        raise AgentwardenError(f"{path} is not tagged")
    cgid = cgroups.cgroup_id(path)
    gone = control.wait_for_tag(_settings(), cgid, present=False)
    if as_json:
        emit_json({"cgroup": str(path), "cgroup_id": cgid, "untagged": True, "dropped_by_probe": gone})
    else:
        emit(f"untagged {path}")
    if gone is False:
        raise AgentwardenError("the probe did not drop the tag within 5 s; check `agentwarden status`")


@app.command()
def agents(as_json: bool = typer.Option(False, "--json", help="one JSON object per agent cgroup")):
    """List tagged cgroups with their live process counts.

    Example: agentwarden agents --json
    """
    if os.geteuid() != 0:
        # Tags are trusted.* xattrs: to anyone else a tagged cgroup looks untagged.
        raise NoPermission("listing agents needs root (their tags are trusted.* attributes only "
                           "root can read): run `sudo agentwarden agents`")
    root = cgroups.cgroup2_root()
    settings = _settings()
    agents_slice, scope = settings.agents_slice, settings.cgroup_scope
    found = sorted(cgroups.scan_tagged(root, agents_slice, scope).values(), key=lambda t: str(t.path))
    where = root / scope if scope else root
    if not as_json and scope:
        emit(f"cgroup_scope {scope!r}: only agents below {where}")
    for t in found:
        count = len(cgroups.processes(t.path))
        how = "tag" if t.source == "xattr" else agents_slice
        if as_json:
            emit(json.dumps({"agent": t.agent, "cgroup": str(t.path), "cgroup_id": t.cgroup_id,
                             "processes": count, "source": t.source}))
        else:
            emit(f"{t.agent:<16} {count:>5} processes  {t.path}  (id {t.cgroup_id}, by {how})")
    if not found and not as_json:
        emit(f"no agent cgroups under {where}; tag one with `agentwarden tag`, or start a "
             f"unit in {agents_slice or 'an agents slice (auto-tagging is off)'}")


@app.command()
def tail(agent: Optional[str] = typer.Option(None, "--agent", help="only this agent's events"),
         as_json: bool = typer.Option(False, "--json", help="one JSON object per line"),
         count: int = typer.Option(0, "--count", help="exit after this many records (0: never)"),
         violations: bool = typer.Option(False, "--violations", help="only policy violations"),
         holds_only: bool = typer.Option(False, "--holds", help="only holds (pending, answered, timed out)"),
         kind: Optional[List[str]] = typer.Option(
             None, "--kind", help="only records of this kind; repeatable or comma-separated: "
                                  + ", ".join(sorted(TAIL_KINDS)))):
    """Follow agent events (or only violations, or only holds, or the kinds named) live.
    Stops with exit status 3 when the daemon goes away.

    Example: sudo agentwarden tail --violations --agent coder; sudo agentwarden tail --kind exec --kind hold
    """
    shown = 0
    named = {k.strip() for part in kind or [] for k in part.split(",") if k.strip()}
    unknown = sorted(named - TAIL_KINDS)
    if unknown:
        raise UsageProblem(f"--kind {', '.join(unknown)}: unknown; kinds are {', '.join(sorted(TAIL_KINDS))}")
    kinds = named | ({"violation"} if violations else set()) | ({"hold"} if holds_only else set()) or TAIL_KINDS
    with contextlib.closing(control.subscribe(_settings())) as feed:
        for received in feed:
            if received.batch is None:
                emit(f"agentwarden: skipped a malformed message: {received.malformed}", err=True)
                continue
            if received.missed:
                emit(f"agentwarden: this tail missed {received.missed} batches "
                     "(it read too slowly; the archive has them)", err=True)
            for record in received.batch.records:
                if record["kind"] not in kinds:
                    continue
                if agent and record["kind"] != "gap" and record.get("agent") != agent:
                    continue
                line = render.as_json(record) if as_json else render.human(record)
                if record["kind"] == "violation" and not as_json:
                    line = paint(line, fg=typer.colors.RED, bold=True)
                elif record["kind"] == "hold" and not as_json:
                    line = paint(line, fg=typer.colors.YELLOW, bold=record["state"] == "pending")
                emit(line)
                shown += 1
                if count and shown >= count:
                    return


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="the full status as JSON")):
    """Is each part up, events per second, drops per stage.

    Example: sudo agentwarden status
    """
    st = control.request(_settings(), "status")["status"]
    if as_json:
        emit(json.dumps(st, sort_keys=True))
        return
    _echo(render.status(st, time.time_ns()))


def _agent_cgroups(agent: Optional[str], every: bool) -> list:
    if every == bool(agent):
        raise UsageProblem("name one agent with --agent NAME, or all of them with --all")
    settings = _settings()
    # Outermost first: a frozen parent freezes its children anyway.
    found = cgroups.agent_cgroups(cgroups.cgroup2_root(), agent, settings.agents_slice, settings.cgroup_scope)
    if not found:
        raise AgentwardenError(f"no tagged cgroup for agent {agent!r}" if agent else "no tagged cgroups")
    return found


def _admin(action: str, agent: Optional[str], every: bool, act, as_json: bool) -> None:
    """Act on the cgroups directly (works with the daemon down), then have the
    daemon archive who did what; say so when it cannot."""
    if every == bool(agent):
        raise UsageProblem("name one agent with --agent NAME, or all of them with --all")
    _need_root(f"{action}")
    results = [act(t.path) for t in _agent_cgroups(agent, every)]
    if not as_json:
        for line in results:
            emit(line)
    # Who acted, from the kernel (uid, audit login uid), never $SUDO_USER.
    user, _login = identity.describe("self", os.getuid())
    archived = None
    try:
        control.request(_settings(), "admin", action=action, agent=agent if agent else "*",
                        uid=os.getuid(), user=user,
                        result="; ".join(results))
    except AgentwardenError as exc:
        archived = str(exc)
        emit(f"agentwarden: warning: not archived ({exc})", err=True)
    if as_json:
        emit_json({"action": action, "agent": agent or "*", "results": results,
                   "archived": archived is None, "not_archived_because": archived})


_ADMIN_JSON = typer.Option(False, "--json", help=_JSON_HELP)


@app.command()
def freeze(agent: Optional[str] = typer.Option(None, "--agent", help="the agent to freeze"),
           every: bool = typer.Option(False, "--all", help="every tagged agent (kill switch; works without the daemon)"),
           as_json: bool = _ADMIN_JSON):
    """Freeze an agent's processes (or all agents') until thaw or kill.

    Example: sudo agentwarden freeze --all
    """
    _admin("freeze", agent, every, lambda path: cgroups.set_frozen(path, True), as_json)


@app.command()
def thaw(agent: Optional[str] = typer.Option(None, "--agent", help="the agent to thaw"),
         every: bool = typer.Option(False, "--all", help="every tagged agent"),
         as_json: bool = _ADMIN_JSON):
    """Let a frozen agent run again.

    Example: sudo agentwarden thaw --agent coder
    """
    _admin("thaw", agent, every, lambda path: cgroups.set_frozen(path, False), as_json)


@app.command()
def kill(agent: Optional[str] = typer.Option(None, "--agent", help="the agent to kill"),
         every: bool = typer.Option(False, "--all", help="every tagged agent"),
         as_json: bool = _ADMIN_JSON):
    """Kill every process of an agent (cgroup.kill).

    Example: sudo agentwarden kill --agent coder
    """
    _admin("kill", agent, every, cgroups.kill_cgroup, as_json)


@app.command(context_settings={"allow_interspersed_args": False})
def run(command: List[str] = typer.Argument(None, help="the command and its arguments, after --"),
        agent: str = typer.Option(..., "--agent", help="the agent (a tagged cgroup) to run as"),
        user: Optional[str] = typer.Option(None, "--user", help="run the command as this user"),
        group: Optional[str] = typer.Option(None, "--group",
                                            help="with --user: run in this group (default: the user's own)"),
        task: str = typer.Option("", "--task", help="what the agent is asked to do (archived)"),
        on_behalf_of: str = typer.Option("", "--on-behalf-of", help="the person it acts for (archived)")):
    """Run a command as an agent session: execs matching its policy's exec hold
    rules wait for an admin, and so (with on-violation = "hold") do the execs,
    write-opens, renames, unlinks and truncates its policy does not allow;
    files have no hold list. What is denied fails with EPERM. Exits with the
    command's own status.

    Example: sudo agentwarden run --agent coder --user coder --task "fix #12" -- bash
    """
    from agentwarden import session
    session.launch(_settings(), agent, list(command or []), user, task, on_behalf_of, group)


holds_app = typer.Typer(invoke_without_command=True, no_args_is_help=False)
app.add_typer(holds_app, name="holds")


@holds_app.callback()
def holds(ctx: typer.Context,
          watch: bool = typer.Option(False, "--watch", help="refresh every second"),
          as_json: bool = typer.Option(False, "--json", help="as JSON")):
    """Pending holds: agent, session, on whose behalf, what, how long it waited.
    `holds show ID`: one of them with what an approver needs to judge it.

    Example: sudo agentwarden holds --watch
    """
    from agentwarden import session
    if ctx.invoked_subcommand is not None:
        return
    while True:
        pending = session.admin_request(_settings(), {"cmd": "holds"})["holds"]
        if as_json:
            emit(json.dumps(pending))
        else:
            if watch:
                emit("\033[H\033[2J", nl=False)
            _echo(render.holds(pending))
        if not watch:
            return
        time.sleep(1)


@holds_app.command("show")
def holds_show(hold_id: str = typer.Argument(..., help="the hold id from `agentwarden holds`"),
               as_json: bool = typer.Option(False, "--json", help="as one JSON object")):
    """One pending hold and its context: the session's attribution, the held
    process's ancestry (argv, cwd), the session's last calls, the program an
    exec would run (sha256), the files a change touches (size, sha256) and,
    for a rename over a file, the diff; the agent's own AGENTWARDEN_REASON.
    Exit status 1 when there is no such pending hold.

    Example: sudo agentwarden holds show h3-1a2b
    """
    from agentwarden import session
    hold = session.admin_request(_settings(), {"cmd": "show", "id": hold_id})["hold"]
    if as_json:
        emit(json.dumps(hold))
    else:
        _echo(render.hold_detail(hold))


@app.command()
def approve(hold_id: str = typer.Argument(..., help="the hold id from `agentwarden holds`"),
            reason: Optional[str] = typer.Option(None, "--reason", help="why (archived)"),
            remember: Optional[str] = typer.Option(None, "--remember",
                                                   help="allow the same action by this agent without asking "
                                                        "for this long (90s, 15m, 2h, 1d)"),
            as_json: bool = typer.Option(False, "--json", help=_JSON_HELP),
            expires: Optional[str] = typer.Option(None, "--expires",
                                                  help="a change of a tracked file this lets through stands "
                                                       "this long, then is reported expired (see drift)")):
    """Let a held action proceed.

    Example: sudo agentwarden approve h3-1a2b --reason "release day" --remember 1h --expires 7d
    """
    from agentwarden import session
    if remember is not None:
        parse_duration(remember, "--remember", positive=True)
    if expires is not None:
        parse_duration(expires, "--expires", positive=True)
    reply = session.admin_request(_settings(), {"cmd": "approve", "id": hold_id, "reason": reason,
                                                "remember": remember, "expires": expires})
    if as_json:
        emit_json({"hold_id": hold_id, "state": "approved" if reply["state"] != "pending" else "pending",
                   "needed": reply.get("needed", 0) if reply["state"] == "pending" else 0})
    elif reply["state"] == "pending":
        emit(f"{hold_id}: approval recorded; {reply['needed']} more distinct approver(s) needed")
    else:
        emit(f"{hold_id}: approved")


@app.command()
def deny(hold_id: str = typer.Argument(..., help="the hold id from `agentwarden holds`"),
         reason: Optional[str] = typer.Option(None, "--reason", help="why (archived)"),
         as_json: bool = typer.Option(False, "--json", help=_JSON_HELP)):
    """Refuse a held action: its syscall fails with EPERM.

    Example: sudo agentwarden deny h3-1a2b --reason "not on a Friday"
    """
    from agentwarden import session
    session.admin_request(_settings(), {"cmd": "deny", "id": hold_id, "reason": reason})
    if as_json:
        emit_json({"hold_id": hold_id, "state": "denied"})
    else:
        emit(f"{hold_id}: denied")


@app.command("config")
def config_cmd(as_json: bool = typer.Option(False, "--json", help="settings and their origins as JSON")):
    """Show the settings in force and where each one comes from.

    Order, later wins: defaults < config file < config.d/*.toml < AGENTWARDEN_* < --set.

    Example: agentwarden --set tag_scan_interval=0.2 config
    """
    current = _settings()
    files = settings_mod.files_in_force()
    if as_json:
        emit(render.settings_json(current, files))
        return
    _echo(render.settings_toml(current, files))


@app.command("agent-config")
def agent_config(names: Optional[List[str]] = typer.Argument(
                     None, help="agent names (default: every NAME.toml in the agents directory)",
                     show_default=False),
                 unit_fallback: bool = typer.Option(False, "--unit-fallback", hidden=True),
                 as_json: bool = typer.Option(False, "--json", help=_JSON_HELP)):
    """Check agent definitions (agents_dir/NAME.toml) and show the settings
    generated for agent@NAME.service.

    Example: agentwarden agent-config coder
    """
    current = _settings()
    if unit_fallback:
        # agent@NAME.service runs this only when no settings were generated for it.
        name = (names or [""])[0]
        agentdef.load(current.agents_dir, name)
        raise AgentwardenError(f"agent@{name}.service has no generated settings: run "
                               "`systemctl daemon-reload` after adding or changing "
                               f"{current.agents_dir / (name + '.toml')}")
    names = names or agentdef.names(current.agents_dir)
    if not names:
        raise AgentwardenError(f"no agent definitions in {current.agents_dir}")
    problems, shown = [], []
    for name in names:
        try:
            agent = agentdef.load(current.agents_dir, name)
        except agentdef.AgentDefError as exc:
            problems.append(str(exc))
            shown.append({"name": name, "ok": False, "problems": [str(exc)], "dropin": None})
            continue
        found = agentdef.check_accounts(agent, current.admin_group)
        problems.extend(found)
        shown.append({"name": name, "ok": not found, "problems": found, "dropin": agentdef.dropin(agent)})
        if not as_json:
            emit(f"# agent@{name}.service{'' if found else ' (OK)'}")
            emit(agentdef.dropin(agent))
    if as_json:
        emit_json({"ok": not problems, "agents": shown})
    if problems:
        for problem in problems[:-1]:
            emit(problem, err=True)
        raise AgentwardenError(problems[-1])


@app.command("doctor")
def doctor_cmd(as_json: bool = typer.Option(False, "--json", help=_JSON_HELP)):
    """Check every prerequisite and say how to fix what is missing (exit 1 when
    a required one is missing; as non-root, what only root can check says so).

    Example: sudo agentwarden doctor
    """
    checks = doctor.run_checks()
    failed = any(not c.ok and c.required for c in checks)
    if as_json:
        emit_json({"ok": not failed, "checks": [c.__dict__ for c in checks]})
    else:
        for check in checks:
            mark = paint("ok  ", fg=typer.colors.GREEN) if check.ok else (
                paint("FAIL", fg=typer.colors.RED, bold=True) if check.required
                else paint("warn", fg=typer.colors.YELLOW))
            emit(f"[{mark}] {check.name}: {check.detail}")
            if not check.ok:
                emit(f"       fix: {check.fix}")
    if failed:
        raise typer.Exit(1)


def main() -> int:
    return output.run(app)
