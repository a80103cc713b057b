"""`agentwarden policy ...`: check policy files, ask which rule decides an
action, have the daemon reload them. Only parsing and error translation live
here; the work is in policy and the daemon."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from agentwarden import control, policy
from agentwarden.paths import normalise
from agentwarden.errors import EXIT_OK, EXIT_PROBLEM, AgentwardenError, UsageProblem
from agentwarden.settings import Settings
from .output import emit, emit_json

# `policy explain` exits by verdict, so scripts can ask it (docs/cli.md).
EXPLAIN_EXIT = {"allow": EXIT_OK, "deny": EXIT_PROBLEM, "violation": EXIT_PROBLEM, "hold": 5}
_JSON = typer.Option(False, "--json", help="print the result as one JSON object")

policy_app = typer.Typer(no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]},
                         help="Check policy files and ask which rule decides an action.\n\n"
                              "Example: agentwarden policy check")

_POLICY_HELP = "policy files or directories of *.toml files (default: the policy directory)"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _load(paths: Optional[List[Path]]) -> policy.PolicySet:
    return policy.load_policy(paths or [Settings.from_env().policy_dir])


@policy_app.command()
def check(paths: Optional[List[Path]] = typer.Argument(None, help=_POLICY_HELP, show_default=False),
          as_json: bool = _JSON):
    """Validate policy files: list every problem with file and line (exit 1), or print OK and the policy hash.

    Example: agentwarden policy check /etc/agentwarden/policy.d/coder.toml
    """
    try:
        loaded = _load(paths)
    except policy.PolicyError as exc:
        if as_json:
            emit_json({"ok": False, "problems": [str(p) for p in exc.problems]})
        else:
            for problem in exc.problems:
                emit(str(problem), err=True)
        raise AgentwardenError(f"the policy has {_count(len(exc.problems), 'problem')}; "
                               "nothing was loaded") from None
    if as_json:
        emit_json({"ok": True, "files": [str(f) for f in loaded.files], "agents": sorted(loaded.agents),
                   "policy_hash": loaded.hash})
        return
    emit(f"OK: {_count(len(loaded.files), 'file')}, agents {', '.join(sorted(loaded.agents))}; "
         f"policy {loaded.hash}")


def _exec_event(agent: str, path: str, args: List[str]) -> dict:
    return {"kind": "exec", "agent": agent, "filename": path, "exec_path": path,
            "resolved_filename": path, "resolved_exec_path": path,
            "argv": [os.path.basename(path), *args], "argv_truncated": False, "ret": 0, "error": None}


def _open_event(agent: str, path: str, write: bool) -> dict:
    return {"kind": "open", "agent": agent, "path": path, "resolved_path": path,
            "flags": os.O_WRONLY if write else os.O_RDONLY, "ret": 0, "error": None}


def _change_event(agent: str, syscall: str, paths: List[str]) -> dict:
    """A change of paths (two for rename, link and symlink: the old name or
    the link's content, then the new name)."""
    if syscall not in policy.CHANGE_SYSCALLS:
        raise UsageProblem(f"--change {syscall!r}: use one of {', '.join(policy.CHANGE_SYSCALLS)}")
    two = syscall.startswith(("rename", "link", "symlink"))
    if len(paths) != (2 if two else 1):
        raise UsageProblem(f"--change {syscall} takes {'two paths' if two else 'one path'}")
    first, second = paths if two else (paths[0], "")
    return {"kind": "change", "agent": agent, "syscall": syscall, "path": first, "resolved_path": first,
            "path2": second, "resolved_path2": second or None, "at_flags": 0, "ret": 0, "error": None}


@policy_app.command()
def explain(agent: str = typer.Option(..., "--agent", help="the agent whose policy decides"),
            exec_path: Optional[str] = typer.Option(None, "--exec", help="absolute path of a program to run"),
            open_path: Optional[str] = typer.Option(None, "--open", help="absolute path of a file to open"),
            write: bool = typer.Option(False, "--write", help="with --open: open for writing"),
            change: Optional[str] = typer.Option(None, "--change", help="a file change (unlink, rename, chmod, "
                                                 "link, symlink, mkdir, ...; the *at forms too) of the "
                                                 "absolute paths given as arguments"),
            syscall: Optional[str] = typer.Option(None, "--syscall", help="a side door: " + ", ".join(policy.SIDEDOORS)),
            args: Optional[List[str]] = typer.Argument(None, help="with --exec: the program's arguments "
                                                                   "(put -- before any that start with -); "
                                                                   "with --change: its path, or its two paths",
                                                       show_default=False),
            paths: Optional[List[Path]] = typer.Option(None, "--policy", help=_POLICY_HELP, show_default=False),
            as_json: bool = _JSON):
    """Say which rule decides an exec, an open, a file change or a side door, and why, without running anything.
    Exits by verdict: 0 allow, 1 deny or violation, 5 hold.

    Examples: agentwarden policy explain --agent coder --exec /usr/bin/git -- push --force;
    agentwarden policy explain --agent coder --change rename /home/coder/work/a /etc/a;
    agentwarden policy explain --agent coder --syscall io_uring
    """
    if sum(option is not None for option in (exec_path, open_path, change, syscall)) != 1:
        raise UsageProblem("give exactly one of --exec PATH [ARG...], --open PATH [--write], "
                               "--change SYSCALL PATH [PATH] or --syscall NAME")
    if write and open_path is None:
        raise UsageProblem("--write goes with --open")
    if args and exec_path is None and change is None:
        raise UsageProblem("arguments go with --exec or --change")
    if syscall is not None and syscall not in policy.SIDEDOORS:
        raise UsageProblem(f"--syscall {syscall!r}: use one of {', '.join(policy.SIDEDOORS)}")
    checked = [exec_path] if exec_path is not None else [open_path] if open_path is not None else \
        list(args or []) if change is not None else []
    for path in checked:
        if not path.startswith("/"):
            raise UsageProblem(f"{path!r} is not absolute: rules match absolute paths, e.g. /usr/bin/git")
    loaded = _load(paths)
    if agent not in loaded.agents:
        raise UsageProblem(f"no policy for agent {agent!r}; the policy has "
                               f"{', '.join(sorted(loaded.agents))}")
    if exec_path is not None:
        event = _exec_event(agent, normalise(exec_path), args or [])
    elif open_path is not None:
        event = _open_event(agent, normalise(open_path), write)
    elif change is not None:
        event = _change_event(agent, change, [normalise(p) for p in args or []])
    else:
        event = {"kind": "sidedoor", "agent": agent, "syscall": syscall, "door": syscall, "ret": 0, "error": None}
    verdict = policy.decide(event, loaded)
    if as_json:
        emit_json({"verdict": verdict.decision, "action": verdict.action, "rule": verdict.rule,
                   "reason": verdict.reason, "mode": verdict.mode, "policy_hash": verdict.policy_hash})
    else:
        emit(f"verdict: {verdict.decision}" + (f" (on-violation {verdict.action})" if verdict.action else ""))
        emit(f"rule:    {verdict.rule or 'none matched'}")
        emit(f"reason:  {verdict.reason}")
        effect = ": decided and recorded, never acted on" if verdict.mode == "monitor" else ""
        emit(f"mode:    {verdict.mode}{effect}")
        emit(f"policy:  {verdict.policy_hash}")
    raise typer.Exit(EXPLAIN_EXIT.get(verdict.decision, EXIT_PROBLEM))


@policy_app.command()
def reload(as_json: bool = _JSON):
    """Load the policy files again; a broken policy is refused (exit 1) and the old one stays in force.

    Example: sudo agentwarden policy reload
    """
    reply = control.request(Settings.from_env(), "reload", check=False)
    if as_json:
        emit_json({"ok": bool(reply.get("ok")), "policy_hash": reply.get("policy_hash"),
                   "problems": list(reply.get("problems", [])), "error": reply.get("error")})
    if not reply.get("ok"):
        if not as_json:
            for problem in reply.get("problems", []):
                emit(problem, err=True)
        raise AgentwardenError(reply.get("error", "reload failed"))
    if not as_json:
        emit(f"policy in force: {reply.get('policy_hash') or 'none (no policy files)'}")
