"""seccomp user notification: the filter `agentwarden run` installs, and the
listener side the daemon uses (plain ioctls on the listener fd).

Facts that shape this (see ARCHITECTURE.md): CONTINUE makes the kernel re-read
pointer arguments after our check, so it is no boundary alone (exec is
re-checked in BPF at sched_process_exec); check NOTIF_ID_VALID between reading
/proc/PID/mem and acting; when the last listener fd closes, pending and future
notified syscalls fail with ENOSYS (fail closed).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from dataclasses import dataclass

from .errors import AgentwardenError

SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}.get(os.uname().machine, 317)
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5
PR_SET_NO_NEW_PRIVS = 38

# ioctls on the listener: _IOWR('!', 0..), sizes of the structs below.
NOTIF_RECV = 0xC0502100
NOTIF_SEND = 0xC0182101
NOTIF_ID_VALID = 0x40082102
NOTIF_SET_FLAGS = 0x40082104
USER_NOTIF_FLAG_CONTINUE = 1
USER_NOTIF_FD_SYNC_WAKE_UP = 1
NOTIF_ADDFD = 0x40182103          # _IOW('!', 3, struct seccomp_notif_addfd), kernel 5.9
ADDFD_FLAG_SEND = 1 << 1          # install and answer in one step, kernel 5.14

_NOTIF = struct.Struct("=QIIiIQ6Q")   # id, pid, flags, nr, arch, ip, args[6]
_RESP = struct.Struct("=QqiI")        # id, val, error, flags
_ADDFD = struct.Struct("=QIIII")      # id, flags, srcfd, newfd, newfd_flags
NOTIF_SIZE = _NOTIF.size

# What a session's processes may not do at all: ways around the filter.
DENIED = ("ptrace", "process_vm_writev", "process_vm_readv", "io_uring_setup",
          "open_by_handle_at")
WRITE_OPEN_BITS = (os.O_CREAT, os.O_TRUNC, os.O_APPEND)
# chmod and chown by path, notified like the other changes (judged as writes,
# and drift keeps a tracked file's mode and owner before). The fd forms
# (fchmod, fchown) act on a file the task opened, and are not notified.
MODE_CHANGES = ("chmod", "fchmodat", "fchmodat2", "chown", "lchown", "fchownat")


@dataclass(frozen=True)
class Notification:
    id: int
    pid: int
    nr: int
    args: tuple[int, ...]


def syscall_names() -> dict[int, str]:
    import seccomp
    names = ("execve", "execveat", "open", "openat", "openat2", "creat", "rename", "renameat",
             "renameat2", "unlink", "unlinkat", "truncate", *_known(seccomp, MODE_CHANGES))
    return {seccomp.resolve_syscall(seccomp.Arch.NATIVE, n): n for n in names}


def _known(seccomp, names: tuple[str, ...]) -> list[str]:
    """The names this libseccomp knows (an older one lacks fchmodat2: the
    daemon still judges that call from the kernel's record, after the fact)."""
    return [name for name in names if seccomp.resolve_syscall(seccomp.Arch.NATIVE, name) >= 0]


def build_filter() -> bytes:
    """The BPF program of a session: notify on exec, on opens that can write,
    on rename/unlink/truncate; refuse the side doors; allow the rest."""
    import seccomp  # Debian's python3-seccomp
    f = seccomp.SyscallFilter(seccomp.ALLOW)
    for name in ("execve", "execveat", "openat2", "creat", "rename", "renameat", "renameat2",
                 "unlink", "unlinkat", "truncate", *_known(seccomp, MODE_CHANGES)):
        f.add_rule(seccomp.NOTIFY, name)
    for name, flags_arg in (("open", 1), ("openat", 2)):
        for access in (os.O_WRONLY, os.O_RDWR, os.O_ACCMODE):
            f.add_rule(seccomp.NOTIFY, name, seccomp.Arg(flags_arg, seccomp.MASKED_EQ, os.O_ACCMODE, access))
        for bit in WRITE_OPEN_BITS:
            f.add_rule(seccomp.NOTIFY, name, seccomp.Arg(flags_arg, seccomp.MASKED_EQ, bit, bit))
    for name in DENIED:
        f.add_rule(seccomp.ERRNO(errno.EPERM), name)
    # No second listener: a process could otherwise answer its own notifications.
    f.add_rule(seccomp.ERRNO(errno.EPERM), "seccomp",
               seccomp.Arg(0, seccomp.EQ, SECCOMP_SET_MODE_FILTER),
               seccomp.Arg(1, seccomp.MASKED_EQ, SECCOMP_FILTER_FLAG_NEW_LISTENER,
                           SECCOMP_FILTER_FLAG_NEW_LISTENER))
    # A memory file, not tempfile's: no write to /tmp, and `run` (which builds
    # this on every start) does not import tempfile, random and shutil.
    with open(os.memfd_create("agentwarden-filter", os.MFD_CLOEXEC), "w+b", buffering=0) as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(program: bytes) -> int:
    """Load the filter on the calling thread (no_new_privs set); returns the listener fd."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise AgentwardenError(f"prctl(NO_NEW_PRIVS) failed: {os.strerror(ctypes.get_errno())}")
    code = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.addressof(code))
    libc.syscall.restype = ctypes.c_long
    flags = SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    fd = libc.syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, flags, ctypes.byref(prog))
    if fd < 0 and ctypes.get_errno() == errno.EINVAL:
        # Kernels before 5.19 lack killable waits: signals may re-issue a held call.
        fd = libc.syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER,
                          SECCOMP_FILTER_FLAG_NEW_LISTENER, ctypes.byref(prog))
    if fd < 0:
        raise AgentwardenError(f"cannot install the seccomp filter: {os.strerror(ctypes.get_errno())} "
                               "(needs seccomp user notification, kernel 5.0 or newer)")
    return fd


# ---- the listener side ----------------------------------------------------------

def set_sync_wakeup(fd: int) -> bool:
    """Wake the supervisor on the notified task's CPU: about tenfold faster."""
    try:
        fcntl.ioctl(fd, NOTIF_SET_FLAGS, USER_NOTIF_FD_SYNC_WAKE_UP)
        return True
    except OSError:
        return False  # kernels before 6.6


def receive(fd: int) -> Notification | None:
    """The next notification; None when its task went away meanwhile."""
    buf = bytearray(_NOTIF.size)
    try:
        fcntl.ioctl(fd, NOTIF_RECV, buf, True)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EINTR):
            return None
        raise
    return parse(buf)


def parse(raw: bytes) -> Notification:
    """A struct seccomp_notif, as NOTIF_RECV fills it."""
    nid, pid, _flags, nr, _arch, _ip, *args = _NOTIF.unpack(raw)
    return Notification(nid, pid, nr, tuple(args))


def pack(n: Notification) -> bytes:
    """n as NOTIF_RECV lays it out (flags, arch and ip left zero): a session's
    receipt, which parse() reads back."""
    return _NOTIF.pack(n.id, n.pid, 0, n.nr, 0, 0, *n.args)


def is_listener(fd: int) -> bool:
    """Whether fd is a seccomp listener: it knows the ID_VALID ioctl (no
    notification has id 0 for long, so ENOENT or success both say yes)."""
    try:
        fcntl.ioctl(fd, NOTIF_ID_VALID, struct.pack("=Q", 0))
        return True
    except OSError as exc:
        return exc.errno == errno.ENOENT


def still_valid(fd: int, notification_id: int) -> bool:
    try:
        fcntl.ioctl(fd, NOTIF_ID_VALID, struct.pack("=Q", notification_id))
        return True
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise


def respond(fd: int, notification_id: int, *, allow: bool, error: int = errno.EPERM) -> bool:
    """Let the call continue, or fail it with error; False if the task is gone."""
    resp = (_RESP.pack(notification_id, 0, 0, USER_NOTIF_FLAG_CONTINUE) if allow
            else _RESP.pack(notification_id, 0, -error, 0))
    try:
        fcntl.ioctl(fd, NOTIF_SEND, resp)
        return True
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise


def answer(fd: int, notification_id: int, value: int = 0, error: int = 0) -> bool:
    """The call's result, made by the supervisor: value, or -1 with errno
    error; False if the task is gone."""
    try:
        fcntl.ioctl(fd, NOTIF_SEND, _RESP.pack(notification_id, value, -error if error else 0, 0))
        return True
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise


def add_fd(fd: int, notification_id: int, src: int, cloexec: bool, send: bool = False) -> int | None:
    """Install our descriptor src in the notified task (the lowest free
    number, close-on-exec as it asked); with send, it is also the call's
    return value, in one step. The number it has there; None if the task is
    gone. Other failures (EMFILE: its table is full) raise."""
    request = ctypes.create_string_buffer(_ADDFD.pack(
        notification_id, ADDFD_FLAG_SEND if send else 0, src, 0, os.O_CLOEXEC if cloexec else 0))
    installed = _libc.ioctl(fd, NOTIF_ADDFD, request)   # fcntl.ioctl drops the return value
    if installed >= 0:
        return installed
    err = ctypes.get_errno()
    if err in (errno.ENOENT, errno.ESRCH):
        return None
    raise OSError(err, os.strerror(err))


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
                                   ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong]


class TaskMemory:
    """Reads strings and words out of a stopped task. process_vm_readv first:
    one syscall and no file to open, under the same ptrace access check as
    /proc/PID/mem, which is the fallback where the call is missing or refused
    (kernels without CROSS_MEMORY_ATTACH, some LSMs). Not thread-safe: one
    buffer serves every instance (it is on the path of every notified call)."""

    PAGE = 4096
    FIRST_READ = 256      # most strings end well before: copy less
    use_vm_readv = True   # cleared for the process at the first refusal
    _buf = ctypes.create_string_buffer(PAGE)
    _buf_addr = ctypes.addressof(_buf)
    _local = _IoVec(_buf_addr, 0)
    _remote = _IoVec(None, 0)
    _local_ref, _remote_ref = ctypes.byref(_local), ctypes.byref(_remote)

    def __init__(self, pid: int):
        self.pid = pid
        self.fd: int | None = None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

    def read(self, addr: int, size: int) -> bytes | None:
        """size bytes at addr, which must not cross a page; None when unreadable."""
        if TaskMemory.use_vm_readv:
            self._local.len = self._remote.len = size
            self._remote.base = addr
            got = _libc.process_vm_readv(self.pid, self._local_ref, 1, self._remote_ref, 1, 0)
            if got >= 0:
                return ctypes.string_at(self._buf_addr, got)
            err = ctypes.get_errno()
            if err not in (errno.ENOSYS, errno.EPERM):
                return None  # EFAULT: not mapped; ESRCH: gone
            TaskMemory.use_vm_readv = False
        try:
            if self.fd is None:
                self.fd = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
            return os.pread(self.fd, size, addr)
        except OSError:
            return None

    def bytes_at(self, addr: int, size: int) -> bytes | None:
        """size bytes at addr, read a page at a time; None when unreadable."""
        out = b""
        while len(out) < size:
            at = addr + len(out)
            data = self.read(at, min(self.PAGE - at % self.PAGE, size - len(out)))
            if not data:
                return None
            out += data
        return out

    def string(self, addr: int, limit: int = 4096) -> bytes | None:
        """The NUL-terminated string at addr (page by page: the next page may
        be unmapped); None when unreadable or when it and its NUL do not fit
        in limit bytes (PATH_MAX, as the kernel counts)."""
        out = b""
        while len(out) < limit:
            at = addr + len(out)
            room = self.PAGE - at % self.PAGE
            data = self.read(at, room if out else min(room, self.FIRST_READ))
            if not data:
                return None
            end = data.find(b"\0")
            if end >= 0:
                return out + data[:end] if len(out) + end < limit else None
            out += data
        return None

    def pointers(self, addr: int, limit: int) -> list[int] | None:
        """A NULL-terminated array of pointers (argv), read up to the end of
        a page at a time: what follows the array may be unmapped. At most
        limit of them: a longer array comes back cut at limit."""
        found: list[int] = []
        while len(found) < limit:
            at = addr + 8 * len(found)
            room = (self.PAGE - at % self.PAGE) // 8 or 1
            data = self.bytes_at(at, 8 * min(room, limit - len(found)))
            if data is None:
                return None
            for (value,) in struct.iter_unpack("=Q", data):
                if value == 0:
                    return found
                found.append(value)
        return found

    def u64s(self, addr: int, count: int) -> tuple[int, ...] | None:
        data = self.bytes_at(addr, 8 * count)
        return None if data is None else struct.unpack(f"={count}Q", data)
