"""Man pages from the commands' own help, one per command (agentwarden.1,
agentwarden-tag.1, agentwarden-policy-check.1, ...): packaging/build-deb.sh
runs `python3 -m agentwarden.cli.manpage DIR` at build time, so the pages say
what `--help` says. `commands()` is also how tests reach every command."""
from __future__ import annotations

import gzip
import re
import sys
from pathlib import Path
from typing import Iterator

import click
import typer

from agentwarden import __version__

EXIT_STATUS = (("0", "success"),
               ("1", "found a problem (a failed check, a verification that failed, nothing matched), "
                     "or refused / denied"),
               ("2", "usage: a bad command line, option or setting"),
               ("3", "the daemon is not running or does not answer (stale sockets included)"),
               ("4", "permission: run it as root, or as a member of the admin group"),
               ("5", "policy explain only: the verdict is hold"),
               ("130", "interrupted (Ctrl-C)"))


def commands(group: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """Every command of the tree with its path (("policy", "check"), ...), groups included."""
    yield path, group
    if isinstance(group, click.MultiCommand):
        ctx = click.Context(group, info_name=path[-1] if path else "agentwarden")
        for name in group.list_commands(ctx):
            sub = group.get_command(ctx, name)
            if sub is not None and not getattr(sub, "hidden", False):
                yield from commands(sub, (*path, name))


def _roff(text: str) -> str:
    """Plain text for roff: backslashes doubled, a leading . or ' escaped."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return re.sub(r"^([.'])", r"\\&\1", text, flags=re.M)


def page(path: tuple[str, ...], command: click.Command, root: click.Command) -> str:
    name = "-".join(("agentwarden", *path))
    ctx = click.Context(command, info_name=" ".join(("agentwarden", *path)))
    help_text = (command.help or "").strip()
    short = command.get_short_help_str(limit=70)
    out = [f'.TH "{name.upper()}" 1 "" "agentwarden {__version__}" "agentwarden manual"',
           ".SH NAME", f"{_roff(name)} \\- {_roff(short)}",
           ".SH SYNOPSIS", f".B {_roff(ctx.command_path)}", _roff(" ".join(command.collect_usage_pieces(ctx))),
           ".SH DESCRIPTION"]
    for paragraph in help_text.split("\n\n"):
        out += [_roff(" ".join(paragraph.split())), ".PP"]
    params = [p for p in command.get_params(ctx) if not getattr(p, "hidden", False)]
    if params:
        out.append(".SH OPTIONS")
        for param in params:
            record = param.get_help_record(ctx)
            if record is None:   # an argument: its name and help
                record = (param.human_readable_name, getattr(param, "help", "") or "")
            out += [".TP", f".B {_roff(record[0])}", _roff(record[1] or "")]
    if isinstance(command, click.MultiCommand):
        subs = [n for n in command.list_commands(ctx) if not getattr(command.get_command(ctx, n), "hidden", False)]
        out += [".SH COMMANDS"] + [line for n in subs for line in
                                   (".TP", f".B {_roff(n)}", f"{_roff(name)}\\-{_roff(n)}(1)")]
    out += [".SH EXIT STATUS"] + [line for code, what in EXIT_STATUS for line in (".TP", f".B {code}", _roff(what))]
    if path:
        out += [".SH SEE ALSO", "agentwarden(1); /usr/share/doc/agentwarden/docs/cli.md"]
    else:
        out += [".SH FILES", "/etc/agentwarden/config.toml, /etc/agentwarden/policy.d/, "
                "/run/agentwarden/, /var/lib/agentwarden/archive/",
                ".SH SEE ALSO", "/usr/share/doc/agentwarden/README.md, /usr/share/doc/agentwarden/docs/cli.md"]
    return "\n".join(out) + "\n"


def write_pages(app: typer.Typer, directory: Path) -> list[Path]:
    root = typer.main.get_command(app)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for path, command in commands(root):
        target = directory / f"{'-'.join(('agentwarden', *path))}.1.gz"
        # mtime=0: the same help gives the same bytes (reproducible builds).
        with open(target, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
            f.write(page(path, command, root).encode())
        written.append(target)
    return written


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python3 -m agentwarden.cli.manpage DIRECTORY", file=sys.stderr)
        return 2
    from .commands import app
    pages = write_pages(app, Path(argv[0]))
    print(f"wrote {len(pages)} man pages to {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
