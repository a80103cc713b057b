"""The supervisor's compiled fast path (fastpath.c), through ctypes.

A thread in C per session receives its notifications, blocked in NOTIF_RECV
(the only wait the kernel's synchronous wake-up reaches). It answers `allow`
to the execs and write-opens that the agent's rules, compiled here
(`compile_rules`), allow -- or whose exact command line, or absolute path and
flags, the supervisor already decided `allow` under the current policy -- and
performs the write-opens it allows for the task instead of continuing them
(`perform`: see fastpath.c), and forwards everything else, unanswered, on a socket the supervisor reads like a
listener. The library, the BPF program and this module share bpf/fastpath.h:
its version, structs, codes and counters are read from there. Built by
scripts/build-fastpath.sh (make setup, the .deb); without it the supervisor
receives and decides every notification itself, correctly but hundreds of
microseconds slower per call.
"""
from __future__ import annotations

import ctypes
import logging
import os
import re
import socket
import struct
from pathlib import Path

from agentwarden import policy as policy_mod
from agentwarden import seccomp_notify as sn
from agentwarden.headers import FAST_HEADER, header_constants, header_struct

log = logging.getLogger("agentwarden.daemon")
LIBRARY = Path(__file__).with_name("_fastpath.so")
C = header_constants(FAST_HEADER)
ABI = C["AW_FAST_ABI"]
FORWARD_NOTIFICATION, FORWARD_HANGUP = C["AW_FAST_FORWARD_NOTIFICATION"], C["AW_FAST_FORWARD_HANGUP"]
FORWARD = header_struct("aw_fast_forward")   # kind, listener fd; then struct seccomp_notif
FORWARD_SIZE = ctypes.sizeof(FORWARD) + sn.NOTIF_SIZE
_COUNTER = "AW_FAST_COUNTER_"
# Named by the header's AW_FAST_COUNTER_<NAME> lines, in index order (what each counts: there).
COUNTERS = tuple(name[len(_COUNTER):].lower() for name in sorted(
    (name for name in C if name.startswith(_COUNTER)), key=C.__getitem__))
RECENT = C["AW_FAST_RECENT"]


def exec_key(agent: str, filename: bytes, argv: list[bytes]) -> bytes:
    """What the C side looks up for an exec (layouts in fastpath.c)."""
    return b"\0".join([agent.encode(), filename, *argv]) + b"\0"


def open_key(agent: str, flags: int, path: bytes) -> bytes:
    """What the C side looks up for an open, openat or creat of an absolute path."""
    return agent.encode() + b"\0\x01" + str(flags).encode() + b"\0" + path + b"\0"


# The compiled rules' encoding (layout in fastpath.c).
T_ANY, T_ONE, T_CLASS, T_CHAR = (C[f"AW_FAST_TOKEN_{name}"] for name in ("ANY", "ONE", "CLASS", "CHAR"))
MANY, NO_ARGV = C["AW_FAST_MANY"], C["AW_FAST_NO_ARGV"]
# The rule lists the C side consults, in the policy's precedence: execs, then write-opens.
SECTIONS = (policy_mod.EXEC_PRECEDENCE, policy_mod.FILE_PRECEDENCE["write"])
TRACK = "files.track"


class Uncompilable(ValueError):
    """A rule the encoding has no room for; its agent is decided in Python."""


def _word(tokens: tuple | None) -> bytes:
    if tokens is None:
        return struct.pack("=H", MANY)
    out = bytearray()
    for kind, value in tokens:
        if kind == policy_mod.ANY:
            out.append(T_ANY)
        elif kind == policy_mod.ONE:
            out.append(T_ONE)
        elif kind == policy_mod.CLASS:
            # The class's own regex says which characters it takes; the C side
            # only ever matches ASCII, so the bitmap covers ASCII.
            regex = re.compile(value)
            bits = sum(1 << c for c in range(1, 128) if regex.fullmatch(chr(c)))
            out += bytes([T_CLASS]) + bits.to_bytes(16, "little")
        else:
            for byte in value.encode("utf-8", "surrogateescape"):
                out += bytes([T_CHAR, byte])
    if len(out) >= MANY:
        raise Uncompilable("a glob word too long to compile")
    return struct.pack("=H", len(out)) + bytes(out)


def _words(parts: tuple) -> bytes:
    if len(parts) >= NO_ARGV:
        raise Uncompilable("too many words to compile")
    return struct.pack("=H", len(parts)) + b"".join(_word(part) for part in parts)


def _agent(agent: policy_mod.AgentPolicy) -> bytes:
    name = agent.name.encode()
    out = [struct.pack("=H", len(name)), name]
    for precedence in SECTIONS:
        if precedence is policy_mod.FILE_PRECEDENCE["write"]:
            # A write to a tracked file (files.track) is never answered here:
            # the supervisor keeps its content before (drift) first.
            precedence = (precedence[0], (TRACK, "forward"), *precedence[1:])
        out.append(struct.pack("=B", len(precedence)))
        for kind, decision in precedence:
            rules = agent.track.rules if kind == TRACK else agent.rules[kind].rules
            out.append(struct.pack("=BI", decision == "allow", len(rules)))
            for rule in rules:
                out.append(_words(rule.path_parts))
                out.append(struct.pack("=H", NO_ARGV) if rule.argv_parts is None else _words(rule.argv_parts))
    return b"".join(out)


def compile_rules(policy: policy_mod.PolicySet | None) -> tuple[bytes, list[str]]:
    """Every agent's exec and write-open rules, for the C side; and the agents
    left out (their calls are decided in Python), each with why."""
    compiled, left_out = [], []
    for agent in (policy.agents.values() if policy else ()):
        try:
            compiled.append(_agent(agent))
        except Uncompilable as exc:
            left_out.append(f"{agent.name}: {exc}")
    return b"".join(compiled), left_out


def load() -> tuple[ctypes.CDLL | None, str | None]:
    """The library, or None and why it cannot be used."""
    if not LIBRARY.exists():
        return None, f"{LIBRARY} is not built (make setup builds it)"
    try:
        lib = ctypes.CDLL(str(LIBRARY), use_errno=True)
    except OSError as exc:
        return None, f"cannot load {LIBRARY}: {exc}"
    if lib.aw_fast_abi() != ABI or lib.aw_fast_counter_count() != len(COUNTERS):
        return None, f"{LIBRARY} is from another version (rebuild it: make setup)"
    lib.aw_fast_start.argtypes = [ctypes.c_int] * 5
    lib.aw_fast_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_char_p,
                                  ctypes.c_uint64, ctypes.c_int]
    lib.aw_fast_perform.argtypes = [ctypes.c_int]
    lib.aw_fast_release.argtypes = [ctypes.c_int]
    lib.aw_fast_learn.argtypes = [ctypes.c_char_p, ctypes.c_uint32]
    lib.aw_fast_policy.argtypes = [ctypes.c_char_p, ctypes.c_uint32]
    lib.aw_fast_rules_allow.argtypes = [ctypes.c_char_p, ctypes.c_uint32]
    lib.aw_fast_exec_path_verdict.argtypes = [ctypes.c_char_p, ctypes.c_uint32, ctypes.c_char_p]
    lib.aw_fast_set_map.argtypes = [ctypes.c_int] * 3
    lib.aw_fast_binfmt.argtypes = [ctypes.c_char_p, ctypes.c_uint32]
    lib.aw_fast_stats.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint32),
                                  ctypes.c_int]
    return lib, None


class FastPath:
    """The session threads; `forwarded` is the socket to read their events from."""

    def __init__(self, lib: ctypes.CDLL, numbers: dict[str, int]):
        """numbers: the native syscall numbers of execve, open, openat and creat."""
        self.lib = lib
        self.forwarded, self._thread_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.forwarded.setblocking(False)
        err = lib.aw_fast_start(self._thread_end.fileno(), *(
            numbers.get(name, -1) for name in ("execve", "open", "openat", "creat")))
        if err < 0:
            raise OSError(-err, f"cannot start the fast path: {os.strerror(-err)}")

    def watch(self, fd: int, agent: str, session_cgroup: str = "", session_ino: int = 0,
              receipt_fd: int = -1) -> None:
        """session_cgroup: the session's cgroup as /proc/PID/cgroup names it,
        session_ino its inode (the records of performed opens); receipt_fd: the
        session's receipt file (the last notification received, kept across a
        restart), or -1."""
        name = agent.encode()
        err = self.lib.aw_fast_watch(fd, name, len(name), session_cgroup.encode(), session_ino, receipt_fd)
        if err < 0:
            raise OSError(-err, os.strerror(-err))

    def perform(self, release_fd: int) -> None:
        """Perform allowed write-opens for the tasks (their records on
        release_fd, the daemon's ordered pair) instead of continuing them."""
        err = self.lib.aw_fast_perform(release_fd)
        if err < 0:
            raise OSError(-err, f"cannot perform opens in the fast path: {os.strerror(-err)}")

    def release(self, fd: int) -> None:
        """Ends fd's thread (after its hang-up); the fd is still the caller's to close."""
        self.lib.aw_fast_release(fd)

    def learn(self, learned: bytes) -> None:
        self.lib.aw_fast_learn(learned, len(learned))

    def set_policy(self, policy: policy_mod.PolicySet | None) -> list[str]:
        """Compiles the policy's rules for the threads and voids what they
        learned under the last one; the agents left to Python, with why."""
        rules, left_out = compile_rules(policy)
        err = self.lib.aw_fast_policy(rules, len(rules))
        if err < 0:   # cannot happen with what compile_rules makes; then nothing is ruled here
            left_out = [f"every agent: the compiled rules were refused ({os.strerror(-err)})"]
        return left_out

    def rules_allow(self, key: bytes) -> bool:
        """Whether the compiled rules alone allow the call of a key."""
        return self.lib.aw_fast_rules_allow(key, len(key)) == 1

    def exec_path_verdict(self, agent: str, filename: bytes) -> bool | None:
        """What the compiled rules say of an execve before its arguments are
        read: allowed, not, or None when they depend on the arguments."""
        name = agent.encode()
        verdict = self.lib.aw_fast_exec_path_verdict(name, len(name), filename)
        return None if verdict < 0 else verdict == 1

    def set_binfmt(self, formats) -> None:
        """The enabled binfmt_misc entries (interpreters.Format): an ELF file
        one of them claims is left to the supervisor."""
        blob = b"".join(
            struct.pack("=BHH", ord("E"), 0, len(f.extension)) + f.extension if f.extension is not None
            else struct.pack("=BHH", ord("M"), f.offset, len(f.magic)) + f.magic
            + (f.mask or b"\xff" * len(f.magic)) for f in formats)
        if self.lib.aw_fast_binfmt(blob, len(blob)) < 0:
            log.warning("fast path: out of memory for the binfmt_misc entries: every exec goes to Python")

    def set_maps(self, approved_fd: int | None, slots_fd: int | None, stash_fd: int | None) -> None:
        """The maps to approve execs in and to take waiting execs' filenames
        from (None: none); slots_fd and stash_fd may be closed once this
        returns. OSError when they cannot be mapped (then neither is used)."""
        err = self.lib.aw_fast_set_map(*(-1 if fd is None else fd for fd in (approved_fd, slots_fd, stash_fd)))
        if err < 0:
            raise OSError(-err, f"cannot map approval_slots and exec_stash: {os.strerror(-err)}")

    def events(self):
        """Forwarded events waiting now: (kind, fd, Notification or None)."""
        while True:
            try:
                data = self.forwarded.recv(FORWARD_SIZE)
            except BlockingIOError:
                return
            if len(data) != FORWARD_SIZE:
                continue  # cannot happen on a seqpacket pair; never act on a torn one
            head = FORWARD.from_buffer_copy(data)
            notification = sn.parse(data[ctypes.sizeof(FORWARD):]) if head.kind == FORWARD_NOTIFICATION else None
            yield head.kind, head.fd, notification

    def stats(self) -> tuple[dict[str, int], list[int]]:
        counters = (ctypes.c_uint64 * len(COUNTERS))()
        recent = (ctypes.c_uint32 * RECENT)()
        count = self.lib.aw_fast_stats(counters, recent, RECENT)
        return dict(zip(COUNTERS, counters)), list(recent[:count])

    def stop(self) -> None:
        """Ends the threads; the listeners stay the supervisor's to close.
        The socket goes first: a thread blocked forwarding must see it gone."""
        self.forwarded.shutdown(socket.SHUT_RDWR)
        self.lib.aw_fast_stop()
        self.forwarded.close()
        self._thread_end.close()
