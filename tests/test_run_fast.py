"""`agentwarden run` parsed without typer (cli/run_fast.py, and the same rules
in the compiled launcher's parse_run): the lines it takes mean what they mean
to typer's `run`; the rest it leaves to typer."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from agentwarden import session
from agentwarden.cli import commands, run_fast

TAKEN = [
    ["--agent", "a", "--", "/bin/true"],
    ["--agent=a", "--", "sh", "-c", "echo hi -- --agent b"],
    ["--agent", "a", "--user", "coder", "--group", "staff", "--task", "fix #12",
     "--on-behalf-of", "alice", "--", "bash", "-l"],
    ["--task=", "--agent", "x", "--agent", "y", "--", "ls", "--all"],   # the last --agent wins
    ["--agent", "a", "--task=-x", "--", "ls"],   # `=`: a value may start with '-'
]
LEFT_TO_TYPER = [
    [], ["--help"], ["--agent", "a"], ["--agent", "a", "--"], ["--agent", "a", "/bin/true"],
    ["--", "/bin/true"], ["--agent", "--user", "--", "ls"], ["-h"], ["--agent", "a", "--verbose", "--", "ls"],
    ["--agent"],
]


@pytest.mark.parametrize("args", TAKEN)
def test_lines_it_takes_mean_what_typer_makes_of_them(args, monkeypatch):
    seen = []
    monkeypatch.setattr(session, "launch", lambda settings, *a: seen.append(a))
    result = CliRunner().invoke(commands.app, ["run", *args])
    assert result.exit_code == 0, result.output
    parsed = run_fast.parse(args)
    assert seen == [(parsed["agent"], parsed["command"], parsed["user"], parsed["task"],
                     parsed["on_behalf_of"], parsed["group"])]


@pytest.mark.parametrize("args", LEFT_TO_TYPER)
def test_other_lines_go_to_typer(args):
    assert run_fast.parse(args) is None
