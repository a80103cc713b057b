"""`agentwarden run` without typer, for `python -m agentwarden run` (the
installed `agentwarden` is the compiled launcher, which takes these lines
itself and hands the rest here): importing typer and the rest of the CLI
takes longer than the session's start itself.

It takes only the plain form `run [--agent A] [--user U] [--group G] [--task T]
[--on-behalf-of P] -- COMMAND...` (each option as `--opt VALUE` or
`--opt=VALUE`, the last of a repeated one wins, as in typer), as the launcher
(launcher/agentwarden.c, parse_run) does; anything else (--help, global
options, a missing --agent or `--`, `--opt VALUE` with a VALUE starting with
'-') goes to typer (`commands.run`), whose help and errors stay the only ones.
Both end in `session.launch`.
"""
from __future__ import annotations

import sys

# option -> session.launch's keyword (commands.run declares the same options)
OPTIONS = {"--agent": "agent", "--user": "user", "--group": "group", "--task": "task",
           "--on-behalf-of": "on_behalf_of"}


def parse(args: list[str]) -> dict | None:
    """run's arguments (after `run`) as session.launch's keywords, or None when
    typer should parse them."""
    given: dict[str, str] = {}
    i = 0
    while i < len(args):
        word = args[i]
        if word == "--":
            command = args[i + 1:]
            if not command or "agent" not in given:
                return None
            return {"agent": given["agent"], "command": command, "user": given.get("user"),
                    "group": given.get("group"), "task": given.get("task", ""),
                    "on_behalf_of": given.get("on_behalf_of", "")}
        name, equals, value = word.partition("=")
        if name not in OPTIONS:
            return None
        if not equals:
            i += 1
            if i >= len(args):
                return None
            value = args[i]
            if value.startswith("-"):
                return None   # typer says what is missing
        given[OPTIONS[name]] = value
        i += 1
    return None


def run_fast(args: list[str]) -> None:
    """Run the session (never returns), or return when typer should parse args."""
    parsed = parse(args)
    if parsed is None:
        return
    from agentwarden import session
    from agentwarden.errors import AgentwardenError
    from agentwarden.settings import Settings
    try:
        session.launch(Settings.from_env(), parsed["agent"], parsed["command"], parsed["user"],
                       parsed["task"], parsed["on_behalf_of"], parsed["group"])
    except AgentwardenError as exc:   # as commands.main says it (docs/cli.md's exit codes)
        print(f"agentwarden: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
