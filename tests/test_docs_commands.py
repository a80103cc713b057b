"""Every `agentwarden ...` command the README and docs/ show is one the CLI
has: its command path exists and each --option it names is that command's.
Command lines in code blocks (no placeholders) are parsed by the real CLI
(click's own parser, arguments and option values checked, nothing run), so
a renamed option or command makes the docs fail here, not a reader. What
each command does is run by the tests named in docs/testing.md."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import typer

from agentwarden.cli.commands import app

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ROOT = typer.main.get_command(app)
PLACEHOLDER = re.compile(r"\[|…|\.\.\.|\bID\b|\bFILE\b|\bNAME\b|\bSESSION\b|\bCMD\b|\bFORMAT\b|\bPATH\b|\bHOST\b")


def _mentions() -> list[tuple[str, int, str, bool]]:
    """(file, line, command after `agentwarden`, from a code block)."""
    found = []
    for doc in DOCS:
        in_block = False
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            if line.startswith("```"):
                in_block = not in_block
                continue
            if in_block:
                text = re.sub(r"^\s*(\$ |sudo )?", "", line)
                if text.startswith("sudo "):
                    text = text[5:]
                if text.startswith("agentwarden "):
                    # Up to a comment or a shell operator: what the CLI sees.
                    text = re.split(r"\s+#|\s&&|\s\|\s|\s;|\s>", text)[0]
                    found.append((doc.name, number, text[len("agentwarden "):].strip(), True))
                continue
            for span in re.findall(r"`(?:sudo )?agentwarden ([^`]+)`", line):
                found.append((doc.name, number, span.strip(), False))
    return found


GLOBAL_OPTIONS = {"--version", "-h", "--help", "--install-completion", "--show-completion", "--set", "--color"}


def _is_command_line(text: str) -> bool:
    """Not prose ("agentwarden keeps every change"): a command or a global option first."""
    words = text.split()
    return bool(words) and (words[0] in ROOT.commands or words[0] in GLOBAL_OPTIONS)


MENTIONS = [m for m in _mentions() if _is_command_line(m[2])]


def _resolve(words: list[str]) -> tuple[click.Command, list[str], list[str]]:
    """The command the words name, its path, and the words left for it."""
    command, path = ROOT, []
    while isinstance(command, click.MultiCommand) and words and words[0] in command.commands:
        path.append(words[0])
        command = command.commands[words[0]]
        words = words[1:]
    return command, path, words


def _split(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError:
        return text.split()


def test_the_docs_show_commands():
    assert len(MENTIONS) > 50 and len(LINES) > 20


@pytest.mark.parametrize("where,text", [(f"{f}:{n}", t) for f, n, t, _ in MENTIONS],
                         ids=[f"{f}:{n}" for f, n, _, _ in MENTIONS])
def test_a_documented_command_and_its_options_exist(where, text):
    words = _split(text)
    while words and words[0] in GLOBAL_OPTIONS:
        words = words[2:] if words[0] in ("--set", "--color") else words[1:]
    command, path, rest = _resolve(words)
    options = {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | {"--help", "-h"}
    for word in rest:
        if word == "--":
            break
        flag = word.split("=", 1)[0]
        if flag.startswith("--"):
            assert flag in options, f"{where}: `agentwarden {' '.join(path)}` has no {flag} ({text})"


# Synopses with placeholders ([--json], FILE…, ID) have their options checked above.
LINES = [(f"{f}:{n}", t) for f, n, t, block in MENTIONS if block and not PLACEHOLDER.search(t)]


@pytest.mark.parametrize("where,text", LINES, ids=[where for where, _ in LINES])
def test_a_documented_command_line_parses(where, text):
    words = _split(text)
    command, path, rest = _resolve(words)
    assert path, f"{where}: no such command: agentwarden {text}"
    try:
        with command.make_context(f"agentwarden {' '.join(path)}", rest, resilient_parsing=False):
            pass
    except click.UsageError as exc:
        raise AssertionError(f"{where}: `agentwarden {text}`: {exc.format_message()}") from None
