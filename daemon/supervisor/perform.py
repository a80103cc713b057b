"""File changes done for the task: an allowed (or approved) write-open,
rename, unlink or truncate of a session is made by the supervisor itself, on
the very path string it checked, and the result handed back -- an open's
descriptor installed in the task (SECCOMP_IOCTL_NOTIF_ADDFD), any other
call's return value or errno.

Why: letting the task's own call continue (SECCOMP_USER_NOTIF_FLAG_CONTINUE)
makes the kernel read the path arguments from the task's memory again, after
the check; a second thread of the task can put another path there in between.

As the task would: a thread of its own (`_Worker`, its own fs_struct by
unshare(CLONE_FS), so its umask and root are its alone) takes the task's
filesystem uid and gid, supplementary groups (the raw setgroups syscall:
glibc's wrapper would change every thread of the supervisor) and effective
capabilities (capset changes the calling thread only), its umask, and, when
the task's root is not ours (chroot, another mount namespace), chroots into
it. Relative paths start at the task's cwd or directory fd, opened through
/proc/TID/cwd and /proc/TID/fd/N and compared with what the check joined the
path to (another thread may have moved it meanwhile: then the call is refused).
Paths are looked up with openat2(RESOLVE_NO_MAGICLINKS): a /proc/self that the
supervisor would resolve to itself is never followed into its own files.
What names the task itself -- /dev/stdin, /dev/stdout, /dev/stderr, /dev/fd/N,
/proc/self, /proc/thread-self -- is rewritten to the task's own /proc/PID
first, and /dev/tty to its controlling terminal; a result in the supervisor's
own /proc is refused (EACCES).

The supervisor's record of each call (kind open or change, `performed`, with
the hold that let it through, if one did) goes to the daemon on the ordered
`release` pair before the task runs on: its next records cannot overtake it.
An open's descriptor is therefore installed first (its number is in the
record), then the call answered.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import queue
import re
import stat
import struct
import threading
import time
from dataclasses import dataclass

from agentwarden import cgroups, wire
from agentwarden import seccomp_notify as sn
from agentwarden.paths import AT_FDCWD, RESOLVE_NO_MAGICLINKS, open_how, openat2
from agentwarden.policy.decide import is_write

from ..resolver import proc_link
from .listeners import Session
from .reader import Request, start_link

log = logging.getLogger("agentwarden.daemon")

OPENS = ("open", "openat", "openat2", "creat")
CHANGES = ("rename", "renameat", "renameat2", "unlink", "unlinkat", "truncate")

CLONE_FS = 0x200
PROC_SUPER_MAGIC = 0x9FA0
TTY_DEVICE = os.makedev(5, 0)          # /dev/tty: the caller's controlling terminal
LINUX_CAPABILITY_VERSION_3 = 0x20080522
# What open()/openat() keep of their flags (the kernel's VALID_OPEN_FLAGS):
# openat2 refuses the rest, which the older calls ignore.
VALID_OPEN_FLAGS = (os.O_ACCMODE | os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC | os.O_APPEND
                    | os.O_NONBLOCK | os.O_DSYNC | os.O_ASYNC | os.O_DIRECT | os.O_LARGEFILE
                    | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NOATIME | os.O_CLOEXEC | os.O_SYNC
                    | os.O_PATH | os.O_TMPFILE)
O_PATH_FLAGS = os.O_DIRECTORY | os.O_NOFOLLOW | os.O_PATH | os.O_CLOEXEC
STANDARD = {b"/dev/stdin": 0, b"/dev/stdout": 1, b"/dev/stderr": 2}
SELF = re.compile(rb"^/proc/(self|thread-self)(?=/|$)")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.unlinkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_libc.ftruncate.argtypes = [ctypes.c_int, ctypes.c_long]
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


class Refused(Exception):
    """The call is answered with this errno, nothing done."""

    def __init__(self, code: int):
        super().__init__(os.strerror(code))
        self.code = code


class Raced(Refused):
    """A directory the check joined a relative path to is no longer the task's."""

    def __init__(self):
        super().__init__(errno.EPERM)


def takes(request: Request) -> bool:
    """Whether a let-through call of this request is performed here: write-opens,
    renames, unlinks, truncates. Reads (openat2 notifies them too) continue."""
    if request.syscall in CHANGES:
        return True
    return request.syscall in OPENS and is_write(request.flags)


@dataclass
class Task:
    tid: int
    tgid: int
    ppid: int
    uid: int
    gid: int
    fsuid: int
    fsgid: int
    groups: tuple[int, ...]
    umask: int
    capabilities: int     # effective
    comm: str

    @classmethod
    def of(cls, tid: int) -> Task | None:
        """The thread's credentials and ids from /proc/TID/status; None when gone."""
        try:
            with open(f"/proc/{tid}/status") as f:
                fields = {k: v.split() for k, _, v in (line.partition(":") for line in f)}
            return cls(tid, int(fields["Tgid"][0]), int(fields["PPid"][0]), int(fields["Uid"][0]),
                       int(fields["Gid"][0]), int(fields["Uid"][3]), int(fields["Gid"][3]),
                       tuple(map(int, fields.get("Groups", []))), int(fields["Umask"][0], 8),
                       int(fields["CapEff"][0], 16), " ".join(fields.get("Name", [])))
        except (OSError, KeyError, IndexError, ValueError):
            return None


def _check(result: int) -> int:
    if result < 0:
        code = ctypes.get_errno()
        if code == errno.ENOSYS:   # barred by a sandbox's seccomp filter: not the task's answer
            raise OSError(code, os.strerror(code))
        raise Refused(code)
    return result


def _openat2(dirfd: int, path: bytes, flags: int, mode: int = 0, resolve: int = 0) -> int:
    return _check(openat2(dirfd, path, open_how(flags, mode, resolve)))


def _fs_type(fd: int) -> int:
    buf = ctypes.create_string_buffer(256)   # struct statfs; f_type comes first
    _check(_libc.fstatfs(fd, buf))
    return struct.unpack_from("=q", buf.raw)[0]


class _Worker(threading.Thread):
    """The thread that becomes each task in turn. Everything it does for a
    task runs between become() and restore(), one job at a time."""

    def __init__(self):
        super().__init__(name="perform", daemon=True)
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.ready = threading.Event()
        self.failure: BaseException | None = None
        import seccomp   # Debian's python3-seccomp: the native number of setgroups
        self.sys_setgroups = seccomp.resolve_syscall(seccomp.Arch.NATIVE, "setgroups")

    def run(self) -> None:
        try:
            _check(_libc.unshare(CLONE_FS))   # umask, root and cwd of this thread alone
            self.own_root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            self.root_id = (os.fstat(self.own_root).st_dev, os.fstat(self.own_root).st_ino)
            self.mount_ns = os.stat("/proc/self/ns/mnt").st_ino
            self.user_ns = os.stat("/proc/self/ns/user").st_ino
            self.header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
            self.own_caps = (_CapData * 2)()
            _check(_libc.capget(ctypes.byref(self.header), self.own_caps))
            self.own_groups = os.getgroups()
            self.own_uid, self.own_gid = os.geteuid(), os.getegid()
            if _libc.setfsuid(-1) != self.own_uid or _libc.setfsgid(-1) != self.own_gid:
                raise Refused(errno.EPERM)
            self.umask_now = -1
            self.switched: set[str] = set()
        except BaseException as exc:   # the supervisor then lets nothing through (see call)
            self.failure = exc
        self.ready.set()
        while True:
            job, box = self.jobs.get()
            try:
                box.append((True, job()))
            except BaseException as exc:
                box.append((False, exc))
            box.done.set()

    def call(self, job):
        """job() on this thread; its result, or its exception raised here."""
        self.ready.wait()
        if self.failure:
            raise Refused(errno.EPERM) from self.failure
        box = _Box()
        self.jobs.put((job, box))
        box.done.wait()
        ok, value = box[0]
        if ok:
            return value
        raise value

    def _setgroups(self, groups) -> None:
        array = (ctypes.c_uint32 * max(1, len(groups)))(*groups)
        _check(_libc.syscall(self.sys_setgroups, len(groups), array))

    def become(self, task: Task) -> None:
        """Take the task's credentials as read for this call, changing only
        what differs from the thread's own (a root task with every capability
        needs no change)."""
        self.switched = set()
        if list(task.groups) != self.own_groups:
            self.switched.add("groups")
            self._setgroups(task.groups)
        if (task.fsuid, task.fsgid) != (self.own_uid, self.own_gid):
            self.switched.add("ids")
            _libc.setfsgid(task.fsgid)
            _libc.setfsuid(task.fsuid)
            if _libc.setfsgid(-1) != task.fsgid or _libc.setfsuid(-1) != task.fsuid:
                raise Refused(errno.EPERM)   # -1 changes nothing and returns the current id
        caps = (_CapData * 2)()
        for i in range(2):
            caps[i].permitted = self.own_caps[i].permitted
            caps[i].inheritable = self.own_caps[i].inheritable
            caps[i].effective = (task.capabilities >> (32 * i)) & self.own_caps[i].permitted
        # After the ids: a change of the fs uid from or to 0 changes the effective set.
        if "ids" in self.switched or any(caps[i].effective != self.own_caps[i].effective for i in range(2)):
            self.switched.add("caps")
            _check(_libc.capset(ctypes.byref(self.header), caps))
        if task.umask != self.umask_now:
            os.umask(task.umask)   # this thread's fs_struct alone
            self.umask_now = task.umask

    def restore(self) -> None:
        try:
            if "caps" in self.switched:
                _check(_libc.capset(ctypes.byref(self.header), self.own_caps))
            if "ids" in self.switched:
                _libc.setfsuid(self.own_uid)
                _libc.setfsgid(self.own_gid)
                if _libc.setfsuid(-1) != self.own_uid or _libc.setfsgid(-1) != self.own_gid:
                    raise Refused(errno.EPERM)
            if "groups" in self.switched:
                self._setgroups(self.own_groups)
        except Refused:
            log.critical("supervisor: the perform thread cannot take back its credentials")
            os._exit(70)   # fail closed: the daemon's sessions end
        self.switched = set()


class _Box(list):
    def __init__(self):
        super().__init__()
        self.done = threading.Event()


class Performer:
    def __init__(self, records):
        self.records = records
        self.worker = _Worker()
        self.worker.start()
        self._cgroup_root = None
        self._agent_ids: dict[str, int] = {}

    # -- the call site's one entry ------------------------------------------------------

    def perform(self, s: Session, n: sn.Notification, request: Request, hold_id: str | None = None,
                remembered: bool = False) -> bool | None:
        """Do the let-through call n of session s for its task and answer it.
        False when the task was gone (nothing done) or the answer found it gone;
        None when it cannot be done here (nothing done, nothing answered)."""
        counters = self.records.counters
        if not sn.still_valid(s.fd, n.id):
            return False   # died or interrupted: nobody to act for
        task = Task.of(n.pid)
        if task is None:
            return False
        fd, value, code = None, 0, 0
        try:
            fd, value = self.worker.call(lambda: self._do(task, n, request))
        except Raced:
            counters["perform_raced"] = counters.get("perform_raced", 0) + 1
            code = errno.EPERM
        except Refused as exc:
            code = exc.code
        except OSError as exc:
            if exc.errno == errno.ENOSYS:
                # A syscall this process may not make here (a sandbox's seccomp filter,
                # e.g. systemd-nspawn's): nothing was done; the caller lets the task's
                # own call go ahead, checked as before, and it is counted.
                counters["perform_unavailable"] = counters.get("perform_unavailable", 0) + 1
                if counters["perform_unavailable"] == 1:
                    log.warning("supervisor: cannot perform file changes here (%s): the checked "
                                "calls continue instead (racy; see docs/sessions.md)", exc)
                return None
            code = exc.errno or errno.EPERM
        except Exception:   # a bug: fail closed
            log.exception("supervisor: performing %s", request.action)
            code = errno.EPERM
        delivered = True
        if fd is not None:
            try:
                cloexec = bool(self._flags(n, request)[0] & os.O_CLOEXEC)
                installed = sn.add_fd(s.fd, n.id, fd, cloexec)
                if installed is None:
                    delivered, code = False, errno.ESRCH
                else:
                    value = installed
            except OSError as exc:
                code = exc.errno or errno.EMFILE
            finally:
                os.close(fd)
        self.records.performed(self._record(s, task, n, request, -code if code else value,
                                            hold_id, remembered, delivered))
        counters["performed"] = counters.get("performed", 0) + 1
        if not delivered:
            return False
        return sn.answer(s.fd, n.id, value, code)

    # -- what is done, on the worker thread ---------------------------------------------

    @staticmethod
    def _flags(n: sn.Notification, request: Request) -> tuple[int, int, int]:
        """An open's flags, mode and resolve flags as the kernel would take them."""
        a, name = n.args, request.syscall
        if name == "openat2":
            if request.how is None:
                raise Refused(errno.EINVAL)   # an open_how shorter than its first version
            return request.how
        flags, mode = {"open": (a[1], a[2]), "openat": (a[2], a[3]),
                       "creat": (os.O_CREAT | os.O_WRONLY | os.O_TRUNC, a[1])}[name]
        flags &= VALID_OPEN_FLAGS & 0xFFFFFFFF
        mode = mode & 0o7777 if flags & os.O_CREAT or flags & os.O_TMPFILE == os.O_TMPFILE else 0
        if flags & os.O_PATH:
            flags &= O_PATH_FLAGS
        return flags, mode, 0

    def _do(self, task: Task, n: sn.Notification, request: Request) -> tuple[int | None, int]:
        """(our fd to install, None for no fd; the call's value). Raises Refused."""
        w = self.worker
        opened: list[int] = []
        try:
            root = os.open(f"/proc/{task.tid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            opened.append(root)
            root_stat = os.fstat(root)
            chrooted = ((root_stat.st_dev, root_stat.st_ino) != w.root_id
                        or os.stat(f"/proc/{task.tid}/ns/mnt").st_ino != w.mount_ns)
            if os.stat(f"/proc/{task.tid}/ns/user").st_ino != w.user_ns:
                task.capabilities = 0   # its capabilities are its namespace's, not ours
            bases = [self._base(task, dirfd, raw, base, opened)
                     for dirfd, raw, base in zip(request.dirfds, request.raw_paths, request.bases)]
            if chrooted:
                os.fchdir(root)
                os.chroot(".")
            try:
                w.become(task)
                try:
                    return self._call(task, n, request, bases, chrooted, opened)
                finally:
                    w.restore()
            finally:
                if chrooted:
                    os.fchdir(w.own_root)
                    os.chroot(".")
        except FileNotFoundError:
            raise Refused(errno.ESRCH) from None   # the task's /proc is gone
        finally:
            for fd in opened:
                os.close(fd)

    @staticmethod
    def _base(task: Task, dirfd: int, raw: bytes, checked: str | None, opened: list[int]) -> int:
        """The directory a path starts from, as an fd of ours: the thread's
        root for an absolute path (AT_FDCWD), else the task's cwd or dirfd,
        which must still be what the check joined the path to."""
        if raw.startswith(b"/"):
            return AT_FDCWD
        try:
            fd = os.open(start_link(task.tid, dirfd), os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            raise Refused(errno.EBADF if dirfd != AT_FDCWD else errno.ENOENT) from None
        opened.append(fd)
        if checked is None or proc_link(os.getpid(), f"fd/{fd}") != checked:
            raise Raced()   # moved since the check (another thread's chdir): fail closed
        return fd

    def _call(self, task: Task, n: sn.Notification, request: Request, bases: list[int], chrooted: bool,
              opened: list[int]) -> tuple[int | None, int]:
        a, name, raws = n.args, request.syscall, request.raw_paths
        if name in OPENS:
            flags, mode, resolve = self._flags(n, request)
            return self._open(task, bases[0], raws[0], flags, mode, resolve, chrooted), 0
        if name == "truncate":
            fd = _openat2(bases[0], raws[0], os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                          0, RESOLVE_NO_MAGICLINKS)
            opened.append(fd)
            if not stat.S_ISREG(os.fstat(fd).st_mode) or _fs_type(fd) == PROC_SUPER_MAGIC:
                raise Refused(errno.EINVAL)
            length = ctypes.c_long(a[1]).value
            return None, _check(_libc.ftruncate(fd, length))
        parents = [self._parent(base, raw, opened) for base, raw in zip(bases, raws)]
        if name in ("unlink", "unlinkat"):
            (pfd, leaf), = parents
            return None, _check(_libc.unlinkat(pfd, leaf, ctypes.c_int(a[2]).value if name == "unlinkat" else 0))
        (old_dir, old), (new_dir, new) = parents
        flags = a[4] & 0xFFFFFFFF if name == "renameat2" else 0
        return None, _check(_libc.renameat2(old_dir, old, new_dir, new, flags))

    @staticmethod
    def _parent(base: int, raw: bytes, opened: list[int]) -> tuple[int, bytes]:
        """The directory holding raw's last component (resolved here, as the
        task, without magic links) and that component, trailing slashes kept."""
        stripped = raw.rstrip(b"/")
        cut = stripped.rfind(b"/")
        if not stripped or cut < 0:
            return base, raw
        fd = _openat2(base, raw[:cut + 1], os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, 0, RESOLVE_NO_MAGICLINKS)
        opened.append(fd)
        if _fs_type(fd) == PROC_SUPER_MAGIC:
            raise Refused(errno.EACCES)   # nothing in /proc is renamed or unlinked for a task
        return fd, raw[cut + 1:]

    def _open(self, task: Task, base: int, raw: bytes, flags: int, mode: int, resolve: int,
              chrooted: bool) -> int:
        path, magic = (raw, False) if chrooted else _selfward(raw, task)
        if not magic:
            resolve |= RESOLVE_NO_MAGICLINKS
        ours = os.O_CLOEXEC if flags & os.O_PATH else (os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        fd = _openat2(base, path, flags | ours, mode, resolve)
        try:
            st = os.fstat(fd)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == TTY_DEVICE and not chrooted:
                os.close(fd)
                fd = -1
                return self._terminal(task, flags)
            if _fs_type(fd) == PROC_SUPER_MAGIC and (chrooted or _own_proc(fd)):
                raise Refused(errno.EACCES)   # the supervisor's own /proc: never handed out
            if not flags & (os.O_NONBLOCK | os.O_PATH):
                os.set_blocking(fd, True)     # opened non-blocking only so a FIFO cannot hold us
            result, fd = fd, -1
            return result
        finally:
            if fd >= 0:
                os.close(fd)

    @staticmethod
    def _terminal(task: Task, flags: int) -> int:
        """/dev/tty for the task: its controlling terminal, reopened through
        whichever of its fds 0-2 is that terminal; ENXIO when it has none."""
        try:
            with open(f"/proc/{task.tid}/stat", "rb") as f:
                tty = int(f.read().rsplit(b")", 1)[1].split()[4])
        except (OSError, IndexError, ValueError):
            raise Refused(errno.ENXIO) from None
        for number in range(3):
            link = f"/proc/{task.tgid}/fd/{number}".encode()
            try:
                st = os.stat(link)
            except OSError:
                continue
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == tty and tty:
                return _openat2(AT_FDCWD, link, flags | os.O_CLOEXEC | os.O_NOCTTY)
        raise Refused(errno.ENXIO)

    # -- its record ------------------------------------------------------------------------

    def _cgroup_ids(self, s: Session, tid: int) -> tuple[int, int]:
        """(the task's cgroup, its agent cgroup: the session's, which is tagged)."""
        if s.id not in self._agent_ids:
            try:
                self._agent_ids[s.id] = os.stat(s.cgroup).st_ino
            except OSError:
                self._agent_ids[s.id] = 0
        agent = self._agent_ids[s.id]
        if self._cgroup_root is None:
            self._cgroup_root = cgroups.cgroup2_root()
        own = cgroups.own_cgroup(self._cgroup_root, tid)
        try:
            return (os.stat(own).st_ino if own else agent), agent
        except OSError:
            return agent, agent

    def _record(self, s: Session, task: Task, n: sn.Notification, request: Request, ret: int,
                hold_id: str | None, remembered: bool, delivered: bool) -> dict:
        cgroup_id, agent_cgroup_id = self._cgroup_ids(s, task.tid)
        a, name = n.args, request.syscall
        record = {"time": time.time_ns(), "pid": task.tgid, "tid": task.tid, "ppid": task.ppid,
                  "uid": task.uid, "gid": task.gid, "comm": task.comm, "cgroup_id": cgroup_id,
                  "agent_cgroup_id": agent_cgroup_id, "syscall": name, "ret": ret,
                  "error": errno.errorcode.get(-ret, f"E{-ret}") if ret < 0 else None,
                  "path": wire.from_c(request.raw_paths[0]), "path_unreadable": False,
                  "path_truncated": False, "killed_in_kernel": False, "kernel_rule": None,
                  "performed": True}
        if not delivered:
            record["performed_for_gone_task"] = True
        if hold_id:
            record["remembered_from" if remembered else "hold_id"] = hold_id
        if name in OPENS:
            try:
                flags, mode, resolve = self._flags(n, request)
            except Refused:
                flags, mode, resolve = request.flags, 0, 0
            return {"kind": "open", **record, "dirfd": request.dirfds[0], "flags": flags, "mode": mode,
                    "resolve": resolve}
        two = len(request.raw_paths) > 1
        return {"kind": "change", **record, "dirfd": request.dirfds[0],
                "path2": wire.from_c(request.raw_paths[1]) if two else "",
                "dirfd2": request.dirfds[1] if two else AT_FDCWD, "mode": 0, "new_uid": -1, "new_gid": -1,
                "length": ctypes.c_long(a[1]).value if name == "truncate" else 0,
                "at_flags": (a[4] & 0xFFFFFFFF if name == "renameat2" else
                             ctypes.c_int(a[2]).value if name == "unlinkat" else 0),
                "path2_unreadable": False, "path2_truncated": False}


def _selfward(raw: bytes, task: Task) -> tuple[bytes, bool]:
    """raw with what names the task itself spelled as its own /proc/PID, and
    whether its last component may be a magic link (one of the task's fds)."""
    own = b"/proc/%d" % task.tgid
    if raw in STANDARD:
        raw = own + b"/fd/%d" % STANDARD[raw]
    elif raw.startswith(b"/dev/fd/"):
        raw = own + b"/fd/" + raw[len(b"/dev/fd/"):]
    else:
        raw = SELF.sub(lambda m: own if m.group(1) == b"self" else own + b"/task/%d" % task.tid, raw)
    magic = re.fullmatch(re.escape(own) + rb"(/task/%d)?/fd/\d+" % task.tid, raw) is not None
    return raw, magic


def _own_proc(fd: int) -> bool:
    """Whether a procfs file we opened is one of the supervisor's own."""
    target = proc_link(os.getpid(), f"fd/{fd}") or ""
    found = re.match(r"/proc/(\d+)(/|$)", target)
    if not found:
        return True   # /proc itself, or something we cannot tell: refuse
    pid = int(found.group(1))
    return pid == os.getpid() or os.path.exists(f"/proc/{os.getpid()}/task/{pid}")
