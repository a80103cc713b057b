"""What else the kernel will run for a session exec: the interpreters of a
`#!` script (a chain of them) and binfmt_misc handlers, read from the file
before the exec is decided, as the kernel will read it.

The kernel reads the first BINPRM_BUF_SIZE bytes of the file it is asked to
run; binfmt_misc entries are tried first (magic at an offset, under a mask,
or the filename's extension), then `#!`; each handler puts its interpreter
(and a `#!` line's optional argument) in front of argv and runs it, up to
AW_MAX_INTERPRETERS levels. The supervisor judges each interpreter as an
exec of its own, and hands the BPF program the arguments they add
(approvals.py), so that a file swapped after this look runs nothing
unapproved: sched_process_exec kills an exec whose argc grew otherwise.

Files are opened as the task names them: an absolute path in the task's root
(`/proc/PID/root`, RESOLVE_IN_ROOT), a relative one from its cwd or dirfd,
never through a magic link; a name of the task's own fds (`/dev/fd/N`,
`/proc/self/fd/N`) through the task's `/proc/PID/fd/N`. O_PATH first: only a
regular file is read (with O_NONBLOCK, O_NOATIME), never a device.
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from agentwarden import seccomp_notify as sn
from agentwarden.headers import header_constants
from agentwarden.paths import AT_FDCWD, RESOLVE_NO_MAGICLINKS, open_how, openat2

from .reader import AT_SYMLINK_NOFOLLOW, Request, _int, _join, lookup_start
from ..resolver import proc_link

BINPRM_BUF_SIZE = 256                   # what the kernel reads of a file to choose its handler
MAX_LEVELS = header_constants()["AW_MAX_INTERPRETERS"]   # the kernel's limit; one more: ELOOP
APPROVED_INTERPRETER_PATH = header_constants("fastpath.h")["AW_INTERPRETER_PATH"]
BINFMT_MISC = Path("/proc/sys/fs/binfmt_misc")
_OWN_FD = re.compile(rb"/(?:proc/(?:self|thread-self)|dev)/fd/(\d+)")
_STD = {b"/dev/stdin": 0, b"/dev/stdout": 1, b"/dev/stderr": 2}


@dataclass(frozen=True)
class Format:
    """An enabled binfmt_misc entry (its file under /proc/sys/fs/binfmt_misc)."""
    name: str
    interpreter: bytes
    flags: str                  # P: argv[0] kept (the file's path goes in front of it)
    offset: int = 0
    magic: bytes = b""
    mask: bytes | None = None
    extension: bytes | None = None

    def matches(self, head: bytes, interp: bytes) -> bool:
        if self.extension is not None:   # the kernel: after the last '.' of the path it runs
            dot = interp.rfind(b".")
            return dot >= 0 and interp[dot + 1:] == self.extension
        window = head[self.offset:self.offset + len(self.magic)]
        if len(window) != len(self.magic):
            return False
        mask = self.mask or b"\xff" * len(self.magic)
        return all((a ^ m) & k == 0 for a, m, k in zip(window, self.magic, mask))


def binfmt_formats(directory: Path = BINFMT_MISC) -> list[Format]:
    """The enabled binfmt_misc entries; none when it is not mounted or disabled."""
    try:
        if directory.joinpath("status").read_text().strip() != "enabled":
            return []
        names = sorted(p.name for p in directory.iterdir() if p.name not in ("register", "status"))
    except OSError:
        return []
    formats = []
    for name in names:
        try:
            lines = directory.joinpath(name).read_bytes().decode("latin-1").splitlines()
        except OSError:
            continue   # removed meanwhile
        if not lines or lines[0] != "enabled":
            continue
        fields = dict(line.split(" ", 1) if " " in line else (line, "") for line in lines[1:])
        interpreter = fields.get("interpreter", "").encode("latin-1")
        flags = fields.get("flags:", "").strip()
        if "extension" in fields:
            formats.append(Format(name, interpreter, flags, extension=fields["extension"].lstrip(".").encode("latin-1")))
        elif "magic" in fields:
            mask = fields.get("mask")
            formats.append(Format(name, interpreter, flags, int(fields.get("offset", "0")),
                                  bytes.fromhex(fields["magic"]), bytes.fromhex(mask) if mask else None))
    return formats


def parse_shebang(head: bytes) -> tuple[bytes, bytes | None] | None:
    """A `#!` line's interpreter and optional argument as the kernel's
    binfmt_script takes them from the first BINPRM_BUF_SIZE bytes (NUL
    padded); None when it runs nothing (not `#!`, no name, a name cut off)."""
    buf = head[:BINPRM_BUF_SIZE].ljust(BINPRM_BUF_SIZE, b"\0")
    if buf[:2] != b"#!":
        return None
    last = BINPRM_BUF_SIZE - 1
    end = buf.find(b"\n")
    if end < 0:
        start = next((i for i in range(2, last) if buf[i] not in b" \t"), None)
        if start is None or next((i for i in range(start, last) if buf[i] in b" \t\0"), None) is None:
            return None   # all blanks, or an interpreter path that may be cut off
        end = last
    while buf[end - 1] in b" \t":
        end -= 1
    name_at = next((i for i in range(2, end) if buf[i] not in b" \t"), None)
    if name_at is None:
        return None
    sep = next((i for i in range(name_at, end) if buf[i] in b" \t\0"), None)
    arg_at = None
    if sep is not None and buf[sep] != 0:
        arg_at = next((i for i in range(sep, end) if buf[i] not in b" \t"), None)
    name = buf[name_at:sep if arg_at is not None else end].split(b"\0", 1)[0]
    arg = buf[arg_at:end].split(b"\0", 1)[0] if arg_at is not None else None
    return name, arg


@dataclass
class Chain:
    """What the kernel will run in front of the file an exec names."""
    added: list[bytes] = field(default_factory=list)   # arguments put in front of argv, first first
    argv: list[bytes] = field(default_factory=list)    # the interpreter's whole command line
    handlers: list[str] = field(default_factory=list)  # how each level was chosen (#!, binfmt_misc NAME)
    error: int | None = None    # the kernel will fail the exec so (ELOOP: too many levels)
    unread: bool = False        # a file could not be read: none assumed (the kernel then kills)

    def judged(self) -> list[tuple[int, bytes]]:
        """The added arguments judged as programs: argv[0], the one that runs,
        and the absolute paths among the others (the middle scripts of a
        chain), as the BPF program records them."""
        return [(i, a) for i, a in enumerate(self.added) if i == 0 or a.startswith(b"/")]


def _openat2(base: int, raw: bytes, flags: int, resolve: int) -> int:
    fd = openat2(base, raw, open_how(flags, 0, resolve))
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return fd


def _open_as_task(pid: int, dirfd: int, raw: bytes, nofollow: bool = False) -> int:
    """An O_PATH fd of the file the task names (raw, from dirfd), or OSError."""
    own = _OWN_FD.fullmatch(raw)
    number = int(own[1]) if own else _STD.get(raw)
    if number is not None or raw == b"":
        return os.open(f"/proc/{pid}/fd/{dirfd if raw == b'' else number}", os.O_PATH | os.O_CLOEXEC)
    base, resolve = lookup_start(pid, dirfd, raw)
    start = os.open(base, os.O_PATH | os.O_CLOEXEC)
    try:
        return _openat2(start, raw, os.O_PATH | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0),
                        resolve | RESOLVE_NO_MAGICLINKS)
    finally:
        os.close(start)


def _head(path_fd: int) -> bytes | None:
    """The first BINPRM_BUF_SIZE bytes of a regular file (None: not one)."""
    try:
        if not stat.S_ISREG(os.fstat(path_fd).st_mode):
            return None   # the kernel runs no directory or device: EACCES
        fd = os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY
                     | os.O_NONBLOCK | os.O_NOATIME)
    finally:
        os.close(path_fd)
    try:
        return os.pread(fd, BINPRM_BUF_SIZE, 0)
    finally:
        os.close(fd)


def read_chain(n: sn.Notification, request: Request, formats: list[Format]) -> Chain:
    """The interpreters the kernel will run for exec request n (see module)."""
    chain = Chain()
    raw, interp = request.raw_paths[0], request.exec_form
    argv = [os.fsencode(a) for a in request.events[0]["argv"]] or [b""]
    original = len(argv)
    if request.syscall == "execve":
        dirfd, nofollow = AT_FDCWD, False
    else:
        dirfd, nofollow = _int(n.args[0]), bool(_int(n.args[4]) & AT_SYMLINK_NOFOLLOW)
    for level in range(MAX_LEVELS + 1):
        try:
            head = _head(_open_as_task(n.pid, dirfd, raw, nofollow))
        except OSError:
            chain.unread = True
            break
        if head is None:
            break
        # binfmt_misc is tried before the kernel's own handlers; `interp` is the
        # path the previous level ran (the kernel's bprm->interp).
        handler = next((f for f in formats if f.matches(head, interp)), None)
        if handler is not None:
            argv = [handler.interpreter, interp, *(argv if "P" in handler.flags else argv[1:])]
            interp, name = handler.interpreter, f"binfmt_misc {handler.name}"
        else:
            parsed = parse_shebang(head)
            if parsed is None:
                break   # a binary (or nothing the kernel runs: ENOEXEC)
            program, arg = parsed
            argv = [program, *([arg] if arg is not None else []), interp, *argv[1:]]
            interp, name = program, "#!"
        if level == MAX_LEVELS:
            chain.error = errno.ELOOP
            break
        chain.handlers.append(name)
        raw, dirfd, nofollow = interp, AT_FDCWD, False
    chain.added = argv[:len(argv) - original]
    chain.argv = argv
    return chain



def add_to(n: sn.Notification, request: Request, formats: list[Format]) -> Chain:
    """Exec request n with its interpreters: each judged one an exec event of
    its own (syscall "interpreter", its command line from its place in argv,
    as the BPF program records it), named in the action and the key (a
    remembered approval covers the same interpreters only)."""
    chain = read_chain(n, request, formats)
    if not chain.added and chain.error is None:
        return chain
    request.interpreters, request.exec_error = tuple(chain.added), chain.error
    first = request.events[0]
    cwd = None
    for i, program in chain.judged():
        if not program.startswith(b"/") and cwd is None:
            cwd = proc_link(n.pid, "cwd")
        # Longer than the BPF program compares: never approved (unresolved: a violation).
        verifiable = i >= MAX_LEVELS or len(program) < APPROVED_INTERPRETER_PATH
        request.events.append({
            "kind": "exec", "agent": first["agent"], "syscall": "interpreter",
            "exec_path": os.fsdecode(program),
            "resolved_exec_path": _join(program, cwd, n.pid) if verifiable else None,
            "argv": [os.fsdecode(a) for a in chain.argv[i:]],
            "argv_truncated": first["argv_truncated"], "ret": 0})
    if any(len(a) >= APPROVED_INTERPRETER_PATH for a in chain.added[:MAX_LEVELS]):
        request.events.append({**request.events[-1], "resolved_exec_path": None})
    request.action += " through " + " and ".join(
        f"{os.fsdecode(program)}" for _, program in chain.judged())
    request.key = (*request.key, ("interpreters", request.interpreters))
    request.fast_key = None
    return chain
