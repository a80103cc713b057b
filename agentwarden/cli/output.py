"""The CLI's output contract (docs/cli.md): results on stdout (`--json`: one
JSON object, or one per line for streams), every failure one line on stderr
and a documented exit code, colour only where wanted, Ctrl-C quiet with 130.

`run` is the one place where errors become lines and codes."""
from __future__ import annotations

import enum
import errno
import json
import os
import sys
from typing import Any

import click
import typer
import typer.completion

from agentwarden import __version__
from agentwarden.errors import (EXIT_INTERRUPTED, EXIT_OK, EXIT_PERMISSION, EXIT_PROBLEM, EXIT_USAGE,
                                AgentwardenError)

PROG = "agentwarden"
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}
COMPLETION_OPTIONS = ("--install-completion", "--show-completion")


class Color(str, enum.Enum):
    auto = "auto"
    always = "always"
    never = "never"


_color = {"mode": Color.auto}


def use_color(mode: Color) -> None:
    """--color, with NO_COLOR (https://no-color.org) turning `auto` off."""
    if mode == Color.auto and os.environ.get("NO_COLOR"):
        mode = Color.never
    _color["mode"] = mode


def paint(text: str, **style: Any) -> str:
    """Text styled for a terminal; `auto` leaves it to click to strip when piped."""
    return text if _color["mode"] == Color.never else typer.style(text, **style)


def emit(line: str, err: bool = False, nl: bool = True) -> None:
    try:
        typer.echo(line, err=err, nl=nl, color=True if _color["mode"] == Color.always else None)
    except BrokenPipeError:   # `| head` went away: done, quietly (click would exit 1)
        _quiet_stdout_close()
        raise typer.Exit(EXIT_OK) from None


def emit_json(value: Any) -> None:
    emit(json.dumps(value, sort_keys=True, default=str))


def print_version(value: bool) -> None:
    if value:
        emit(f"{PROG} {__version__}")
        raise typer.Exit(EXIT_OK)


def _error(message: str, code: int) -> int:
    try:
        typer.echo(f"{PROG}: error: {message}", err=True)
    except OSError:
        pass
    return code


def _usage(exc: click.UsageError) -> int:
    where = exc.ctx.command_path if exc.ctx is not None else PROG
    message = exc.format_message().rstrip(".")
    return _error(f"{message} (see `{where} --help`)", EXIT_USAGE)


def _with_completion_shell(argv: list[str]) -> list[str]:
    """Debian's typer without shellingham wants `--install-completion SHELL`:
    name the shell this runs under, as shellingham would."""
    if typer.completion.shellingham is not None:
        return argv
    shells = {s.value for s in typer.completion.Shells}
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg in COMPLETION_OPTIONS and (i + 1 >= len(argv) or argv[i + 1] not in shells):
            out.append(_parent_shell(shells))
    return out


def _parent_shell(shells: set[str]) -> str:
    try:
        with open(f"/proc/{os.getppid()}/comm") as f:
            parent = f.read().strip()
    except OSError:
        parent = ""
    if parent in shells:
        return parent
    return os.path.basename(os.environ.get("SHELL", "bash")) or "bash"


def run(app: typer.Typer, argv: list[str] | None = None) -> int:
    """Run the command; every way it can end becomes an exit code and at most one error line."""
    argv = _with_completion_shell(list(sys.argv[1:] if argv is None else argv))
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name=PROG, standalone_mode=False)
        code = result if isinstance(result, int) else EXIT_OK
    except click.exceptions.Exit as exc:     # typer.Exit
        code = exc.exit_code
    except click.UsageError as exc:
        code = _usage(exc)
    except click.ClickException as exc:
        code = _error(exc.format_message(), exc.exit_code)
    except (click.Abort, KeyboardInterrupt):   # click turns Ctrl-C into Abort
        code = EXIT_INTERRUPTED
    except AgentwardenError as exc:
        code = _error(str(exc), exc.exit_code)
    except BrokenPipeError:                  # `agentwarden log show | head`
        code = EXIT_OK
    except PermissionError as exc:
        what = f" {exc.filename}" if exc.filename else ""
        code = _error(f"permission denied{what}: run this as root (sudo)", EXIT_PERMISSION)
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            code = EXIT_OK
        else:
            what = f"{exc.filename}: " if exc.filename else ""
            code = _error(f"{what}{exc.strerror or exc}", EXIT_PROBLEM)
    if code == EXIT_OK or code == EXIT_INTERRUPTED:
        _quiet_stdout_close()
    return code


def _quiet_stdout_close() -> None:
    """A reader that went away (`| head`) is no error at exit either."""
    try:
        sys.stdout.flush()
    except (BrokenPipeError, OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
