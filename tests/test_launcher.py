"""The compiled launcher's `run` parsing (launcher/agentwarden.c, parse_run)
takes the very lines run_fast.parse takes, and hands every other line to the
Python CLI unchanged. Built here from the real source with /bin/echo as its
Python, so that what it hands over is printed."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agentwarden.cli import run_fast
from test_run_fast import LEFT_TO_TYPER, TAKEN

SOURCE = Path(__file__).resolve().parent.parent / "launcher"


@pytest.fixture(scope="module")
def echo_launcher(tmp_path_factory):
    if shutil.which("gcc") is None or not (SOURCE / "constants.h").exists():
        pytest.fail("gcc and launcher/constants.h (make setup) are needed to build the launcher")
    out = tmp_path_factory.mktemp("launcher") / "agentwarden"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", '-DAW_PYTHON="/bin/echo"', "-o", str(out),
                    str(SOURCE / "agentwarden.c")], check=True)
    return str(out)


def as_nobody(argv: list[str]) -> list[str]:
    """Not root: a line the launcher takes ends at its root check, one it does not reaches echo."""
    if os.geteuid() != 0:
        return argv
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]


@pytest.mark.parametrize("args", TAKEN + [["--agent", "a", "--", "--"]])
def test_lines_run_fast_takes_the_launcher_takes(echo_launcher, args):
    assert run_fast.parse(args) is not None
    result = subprocess.run(as_nobody([echo_launcher, "run", *args]), capture_output=True, text=True, timeout=10)
    assert (result.returncode, result.stdout) == (4, ""), result
    assert result.stderr == ("agentwarden: error: agentwarden run needs root (CAP_BPF, CAP_SYS_ADMIN): "
                             "run it with sudo\n")


@pytest.mark.parametrize("args", [[], ["status"], ["--config", "x", "run", "--agent", "a", "--", "ls"]]
                         + [["run", *line] for line in LEFT_TO_TYPER])
def test_other_lines_go_to_python_unchanged(echo_launcher, args):
    if args[:1] == ["run"]:
        assert run_fast.parse(args[1:]) is None
    result = subprocess.run(as_nobody([echo_launcher, *args]), capture_output=True, text=True, timeout=10)
    assert result.returncode == 0 and result.stdout == " ".join(["-I", "-m", "agentwarden", *args]) + "\n"
