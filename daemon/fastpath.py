"""The supervisor's compiled fast path (fastpath.c), through ctypes.

A thread in C per session receives its notifications, blocked in NOTIF_RECV
(the only wait the kernel's synchronous wake-up reaches). It answers the execs
whose exact command line, and the write-opens whose absolute path and flags,
the supervisor already decided `allow` under the current policy, and forwards
everything else, unanswered, on a socket the supervisor reads like a
listener. Built by scripts/build-fastpath.sh (make setup, the .deb); without
it the supervisor receives and decides every notification itself, correctly
but tens of microseconds slower per call.
"""
from __future__ import annotations

import ctypes
import os
import socket
import struct
from pathlib import Path

from agentwarden import seccomp_notify as sn

LIBRARY = Path(__file__).with_name("_fastpath.so")
ABI = 2
FORWARD_NOTIFICATION, FORWARD_HANGUP = 1, 2
FORWARD = struct.Struct("=Ii")          # kind, listener fd; then struct seccomp_notif
FORWARD_SIZE = FORWARD.size + sn.NOTIF_SIZE
COUNTERS = ("continued", "forwarded", "hangups", "gone", "learned", "resets", "map_failures",
            "forward_failures")
RECENT = 1024


def exec_key(agent: str, filename: bytes, argv: list[bytes]) -> bytes:
    """What the C side looks up for an exec (layouts in fastpath.c)."""
    return b"\0".join([agent.encode(), filename, *argv]) + b"\0"


def open_key(agent: str, flags: int, path: bytes) -> bytes:
    """What the C side looks up for an open, openat or creat of an absolute path."""
    return agent.encode() + b"\0\x01" + str(flags).encode() + b"\0" + path + b"\0"


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
    lib.aw_fast_start.argtypes = [ctypes.c_int] * 5 + [ctypes.c_uint32]
    lib.aw_fast_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    lib.aw_fast_release.argtypes = [ctypes.c_int]
    lib.aw_fast_learn.argtypes = [ctypes.c_char_p, ctypes.c_uint32]
    lib.aw_fast_set_map.argtypes = [ctypes.c_int]
    lib.aw_fast_stats.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint32),
                                  ctypes.c_int]
    return lib, None


class FastPath:
    """The session threads; `forwarded` is the socket to read their events from."""

    def __init__(self, lib: ctypes.CDLL, numbers: dict[str, int], path_max: int):
        """numbers: the native syscall numbers of execve, open, openat and creat."""
        self.lib = lib
        self.forwarded, self._thread_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.forwarded.setblocking(False)
        err = lib.aw_fast_start(self._thread_end.fileno(), *(
            numbers.get(name, -1) for name in ("execve", "open", "openat", "creat")), path_max)
        if err < 0:
            raise OSError(-err, f"cannot start the fast path: {os.strerror(-err)}")

    def watch(self, fd: int, agent: str) -> None:
        name = agent.encode()
        err = self.lib.aw_fast_watch(fd, name, len(name))
        if err < 0:
            raise OSError(-err, os.strerror(-err))

    def release(self, fd: int) -> None:
        """Ends fd's thread (after its hang-up); the fd is still the caller's to close."""
        self.lib.aw_fast_release(fd)

    def learn(self, learned: bytes) -> None:
        self.lib.aw_fast_learn(learned, len(learned))

    def forget(self) -> None:
        self.lib.aw_fast_forget()

    def set_map(self, fd: int | None) -> None:
        self.lib.aw_fast_set_map(-1 if fd is None else fd)

    def events(self):
        """Forwarded events waiting now: (kind, fd, Notification or None)."""
        while True:
            try:
                data = self.forwarded.recv(FORWARD_SIZE)
            except BlockingIOError:
                return
            if len(data) != FORWARD_SIZE:
                continue  # cannot happen on a seqpacket pair; never act on a torn one
            kind, fd = FORWARD.unpack_from(data)
            notification = sn.parse(data[FORWARD.size:]) if kind == FORWARD_NOTIFICATION else None
            yield kind, fd, notification

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
