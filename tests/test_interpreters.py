"""The supervisor's reading of what else the kernel runs for an exec
(daemon/supervisor/interpreters.py): #! lines as binfmt_script parses them,
binfmt_misc entries, chains up to the kernel's limit, checked against what
the kernel itself does with the same files (no root needed)."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentwarden import seccomp_notify as sn
from agentwarden.daemon.supervisor import interpreters as it
from agentwarden.daemon.supervisor.reader import Request


@pytest.mark.parametrize("head, expected", [
    (b"#!/bin/sh\n", (b"/bin/sh", None)),
    (b"#!/bin/sh -e\necho\n", (b"/bin/sh", b"-e")),
    (b"#! \t/usr/bin/env  python3 \t\n", (b"/usr/bin/env", b"python3")),
    (b"#!/usr/bin/env -S a  b\n", (b"/usr/bin/env", b"-S a  b")),   # one argument, blanks kept inside
    (b"#!/bin/sh", (b"/bin/sh", None)),                             # no newline, short file (NUL padded)
    (b"#!/bin/sh" + b" " * 300, (b"/bin/sh", None)),                # no newline, but a blank ends the name
    (b"#!/bin/" + b"x" * 300, None),                                # a name that may be cut off: ENOEXEC
    (b"#!\n", None), (b"#!   \n", None), (b"\x7fELF\x02", None), (b"# !/bin/sh\n", None),
    (b"#!/bin/sh\0junk -x\n", (b"/bin/sh", None)),                  # a NUL ends the name
])
def test_shebang_lines_are_read_as_the_kernel_reads_them(head, expected):
    assert it.parse_shebang(head) == expected


def test_binfmt_misc_entries_are_read_and_matched(tmp_path):
    (tmp_path / "status").write_text("enabled\n")
    (tmp_path / "register").write_text("")
    (tmp_path / "qemu").write_text("enabled\ninterpreter /usr/bin/qemu\nflags: PF\noffset 0\n"
                                   "magic 7f454c46020101\nmask ffffffff00ffff\n")
    (tmp_path / "jar").write_text("enabled\ninterpreter /usr/bin/jexec\nflags: \nextension .jar\n")
    (tmp_path / "off").write_text("disabled\ninterpreter /x\nflags: \noffset 0\nmagic 41\n")
    jar, qemu = it.binfmt_formats(tmp_path)   # by name
    assert (qemu.name, qemu.flags, qemu.interpreter) == ("qemu", "PF", b"/usr/bin/qemu")
    assert qemu.matches(b"\x7fELF\x09\x01\x01rest", b"/a/b") and not qemu.matches(b"\x7fELF\x02\x02\x01", b"/a")
    assert jar.matches(b"PK", b"/w/app.jar") and not jar.matches(b"PK", b"/w.jar/app")
    (tmp_path / "status").write_text("disabled\n")
    assert it.binfmt_formats(tmp_path) == []
    assert it.binfmt_formats(tmp_path / "missing") == []


def _chain(path: Path, argv: list[str], formats=()) -> it.Chain:
    raw = os.fsencode(path)
    event = {"kind": "exec", "agent": "a", "argv": argv, "argv_truncated": False}
    request = Request("exec", ("exec",), [event], raw, syscall="execve", raw_paths=(raw,))
    return it.read_chain(sn.Notification(0, os.getpid(), 59, (0,) * 6), request, list(formats))


def _script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_a_chain_is_predicted_as_the_kernel_builds_it(tmp_path):
    """The kernel's own argv for a two-level chain with an optional argument
    (python prints what it got) is what read_chain predicts."""
    last = _script(tmp_path / "last.py", f"#!{sys.executable} -S\nimport sys, json; print(json.dumps(sys.argv))\n")
    first = _script(tmp_path / "first", f"#!{last}\n")
    chain = _chain(first, [str(first), "one"])
    ran = json.loads(subprocess.run([str(first), "one"], capture_output=True, text=True, check=True).stdout)
    assert chain.argv == [os.fsencode(a) for a in [sys.executable, "-S", *ran]]
    assert chain.added == [os.fsencode(sys.executable), b"-S", os.fsencode(last)]
    assert chain.judged() == [(0, os.fsencode(sys.executable)), (2, os.fsencode(last))]
    assert chain.error is None and chain.handlers == ["#!", "#!"]


def test_more_levels_than_the_kernel_runs_fail_as_it_fails(tmp_path):
    """The kernel runs MAX_LEVELS interpreters; one more level fails with ELOOP."""
    def chain_of(levels: int) -> Path:
        path = _script(tmp_path / f"l{levels}-0", "#!/bin/sh\necho ran\n")
        for i in range(1, levels):
            path = _script(tmp_path / f"l{levels}-{i}", f"#!{path}\n")
        return path
    ok, too_deep = chain_of(it.MAX_LEVELS), chain_of(it.MAX_LEVELS + 1)
    assert subprocess.run([str(ok)], capture_output=True, text=True).stdout == "ran\n"
    with pytest.raises(OSError) as failed:
        subprocess.run([str(too_deep)])
    assert failed.value.errno == errno.ELOOP
    assert _chain(ok, [str(ok)]).error is None and len(_chain(ok, [str(ok)]).added) == it.MAX_LEVELS
    assert _chain(too_deep, [str(too_deep)]).error == errno.ELOOP


def test_binaries_and_non_files_add_nothing(tmp_path):
    assert _chain(Path("/bin/sh"), ["sh"]).added == []
    assert _chain(tmp_path, ["x"]).added == []               # a directory: not read
    plain = _script(tmp_path / "plain", "echo no shebang\n")
    assert _chain(plain, ["plain"]).added == []              # ENOEXEC (a shell then runs it itself)
    assert _chain(tmp_path / "missing", ["m"]).unread


def test_a_binfmt_misc_handler_and_its_flags(tmp_path):
    program = tmp_path / "prog.x"
    program.write_bytes(b"MAGIC!rest")
    handler = _script(tmp_path / "handler", "#!/bin/sh\n")
    kept = it.Format("k", os.fsencode(handler), "P", magic=b"MAGIC!")
    chain = _chain(program, ["argv0", "a"], [kept])
    # P keeps argv[0]: handler, the file, then the whole argv; the handler is a #! script itself.
    assert chain.argv == [b"/bin/sh", os.fsencode(handler), os.fsencode(program), b"argv0", b"a"]
    assert chain.handlers == ["binfmt_misc k", "#!"]
    by_extension = it.Format("e", b"/usr/bin/true", "", extension=b"x")
    assert _chain(program, ["argv0"], [by_extension]).argv == [b"/usr/bin/true", os.fsencode(program)]
