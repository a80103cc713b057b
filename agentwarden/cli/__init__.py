"""The `agentwarden` command: the top layer. It parses, translates errors into
one line and an exit code, and starts the probe and the daemon; everything it
does is in the core (``agentwarden.*``)."""
from __future__ import annotations


def main() -> int | None:
    """The entry point. `agentwarden run` (one per tool call in an agent
    harness) is parsed without typer and the rest of the CLI (run_fast.py);
    every other command, and a `run` line it does not take, goes to typer."""
    import sys
    if sys.argv[1:2] == ["run"]:
        from .run_fast import run_fast
        run_fast(sys.argv[2:])   # returns only when it leaves the line to typer
    from .commands import main as typer_main
    return typer_main()


__all__ = ["main"]
