"""Sessions of `agentwarden run`: their seccomp listeners, and the holds admins answer.

Runs as its own process, a child of the daemon (it dies with it, and then the
listeners close: held and later notified calls fail). A separate process, not
a thread, so that the daemon's event processing never holds the interpreter
while a syscall waits. Its records (sessions, holds, refusals, its health) go
to the daemon's ingest socket like the probe's, as source "supervisor". One
UNIX seqpacket socket serves both sides, with the peer's credentials from the
kernel (SO_PEERCRED): `run` registers a session and hands over its listener
fd; admins list, approve and deny holds.

For every notification: read the arguments from /proc/PID/mem, check the
notification is still valid, decide with the policy, and then continue, fail
with EPERM, or hold. A compiled thread (fastpath.c) receives first and
answers alone the execs and write-opens that the agent's compiled rules allow
(no deny or hold rule matching), or that this process already allowed under
the current policy; it forwards the rest here unanswered. A continued exec is first written to the BPF map
`approved_exec`, so the kernel kills it at sched_process_exec if what runs is
not what was checked. Whatever cannot be read or checked is refused.
"""
from __future__ import annotations

import array
import collections
import ctypes
import itertools
import logging
import os
import pwd
import select
import signal
import socket
import struct
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from agentwarden import bpfsys, cgroups, control, wire, policy as policy_mod
from agentwarden import seccomp_notify as sn
from agentwarden.durations import parse_duration
from agentwarden.errors import AgentwardenError
from agentwarden.paths import AT_EMPTY_PATH, AT_FDCWD, normalise
from agentwarden.headers import header_struct
from agentwarden.settings import Settings

from . import fastpath
from .governor import Governor
from .resolver import proc_link, proc_ppid

PR_SET_PDEATHSIG = 1

log = logging.getLogger("agentwarden.daemon")

HEALTH_INTERVAL = 1.0
MAX_ARGS = 4096
VERDICT_CACHE = 4096
APPROVED = header_struct("aw_approved")   # approved_exec's value (bpf/fastpath.h)
APPROVED_PATH_MAX = APPROVED.path.size


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


@dataclass
class Session:
    id: str
    agent: str
    user: str
    task: str
    on_behalf_of: str
    host: str
    cgroup: Path
    fd: int
    pid: int
    started: int


@dataclass
class Hold:
    id: str
    session: Session
    notification: sn.Notification
    key: tuple
    action: str
    exec_form: bytes | None
    decision: str
    rule: str | None
    reason: str
    policy_hash: str
    required: int
    since: float
    since_ns: int
    deadline: float
    approvals: dict[str, str | None] = field(default_factory=dict)  # identity -> reason


@dataclass
class Request:
    """What a notified syscall asks for, as events `decide` understands."""
    action: str                 # one line for people
    key: tuple                  # the same action by the same agent: remember / retry
    events: list[dict]
    exec_form: bytes | None     # exec: the filename in the kernel's own form
    fast_key: bytes | None = None   # what the fast path can repeat once allowed


def cgroup_of(pid: int) -> str | None:
    """The cgroup v2 path of a process, relative to the mount ('/' for the root)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        return None
    return None


class Supervisor:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.governor = Governor([settings.policy_dir], lambda cgroup_id: None)
        self.governor.load()
        self.admin_gid = settings.admin_gid()
        self.admin_group = settings.admin_group
        ctx = zmq.Context.instance()
        self.out = ctx.socket(zmq.PUSH)
        self.out.setsockopt(zmq.LINGER, 2000)
        self.out.setsockopt(zmq.SNDTIMEO, 1000)
        self.out.connect(settings.ingest_endpoint)
        self.out_seq = 0
        self.policy_feed = ctx.socket(zmq.SUB)
        self.policy_feed.setsockopt(zmq.LINGER, 0)
        self.policy_feed.setsockopt(zmq.SUBSCRIBE, wire.TOPIC_KERNEL_RULES)
        self.policy_feed.connect(settings.events_endpoint)
        self.names = sn.syscall_names()
        self.sessions: dict[int, Session] = {}          # listener fd -> session
        self.holds: dict[str, Hold] = {}
        self.remembered: dict[tuple, float] = {}        # (agent, key) -> monotonic expiry
        self.hold_numbers = itertools.count(1)
        self.handling_ns: collections.deque[int] = collections.deque(maxlen=1000)
        self.verdicts: dict[tuple, policy_mod.Verdict] = {}
        self.stopping = False
        self.counters: dict[str, int] = {"notifications": 0, "continued": 0, "refused": 0,
                                         "held": 0, "unreadable": 0, "policy_announcements_malformed": 0}
        self.root = cgroups.cgroup2_root()
        self._approved_fd: int | None = None
        self._pinned_inodes: int | None = None
        # epoll itself, not selectors: a listener's event mask tells a pending
        # notification (EPOLLIN) from a session whose processes are all gone
        # (EPOLLHUP alone) without another syscall.
        self.poller = select.epoll()
        self.watched: dict[int, tuple[str, object]] = {}   # fd -> (kind, socket or fd)
        self.server = self._listen()
        self.fast, self.fast_unavailable = self._start_fast_path()

    def _start_fast_path(self) -> tuple[fastpath.FastPath | None, str | None]:
        if not self.settings.exec_fast_path:
            return None, "turned off (exec_fast_path = false)"
        lib, why = fastpath.load()
        if lib is None:
            log.warning("supervisor: no compiled fast path, every exec is decided in Python: %s", why)
            return None, why
        fast = fastpath.FastPath(lib, {name: nr for nr, name in self.names.items()})
        self._watch(fast.forwarded.fileno(), "fastpath", fast)
        self.fast = fast
        self._fast_policy()
        return fast, None

    def _fast_policy(self) -> None:
        """The current policy's rules to the fast path; what it learned is void."""
        for why in self.fast.set_policy(self.governor.policy):
            log.warning("supervisor: the fast path leaves calls to Python for agent %s", why)

    def _listen(self) -> socket.socket:
        path = self.settings.sessions_socket
        if path.exists():
            path.unlink()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        server.bind(str(path))
        self.settings.restrict_socket(path)  # root, and the admin group when there is one
        server.listen(64)
        server.setblocking(False)
        self._watch(server.fileno(), "server", server)
        return server

    # -- records -----------------------------------------------------------------

    def _emit(self, record: dict) -> None:
        try:
            self.out.send(wire.encode_batch("supervisor", self.out_seq, [record]))
        except zmq.Again:  # the daemon is not reading: counted; the seq gap shows in the archive
            self.counters["records_dropped"] = self.counters.get("records_dropped", 0) + 1
            log.error("supervisor: daemon not reading; dropped a %s record", record["kind"])
        self.out_seq += 1

    def _health(self) -> None:
        current = self.governor.policy
        self._emit({"kind": "health", "time": time.time_ns(), "stage": "supervisor", "counters": {
            **self.counters, "sessions": len(self.sessions), "holds": len(self.holds),
            "handling": summarise(self.handling_ns), **self._fast_health(),
            "policy_hash": current.hash if current else None}})

    def _fast_health(self) -> dict:
        if self.fast is None:
            return {"fast_path": self.fast_unavailable}
        counters, recent = self.fast.stats()
        return {"fast_path": "running", "fast": counters, "fast_handling": summarise(recent)}

    def _follow_policy(self) -> None:
        """Reload when the daemon announces another policy hash."""
        while True:
            try:
                _topic, raw = self.policy_feed.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                announced = wire.decode_kernel_rules(raw)["policy_hash"]
            except wire.WireError:
                self.counters["policy_announcements_malformed"] += 1   # the daemon's own socket: a bug if ever
                log.error("supervisor: dropped a malformed policy announcement")
                continue
            current = self.governor.policy.hash if self.governor.policy else None
            if announced != current:
                try:
                    self.governor.load()
                except policy_mod.PolicyError as exc:
                    log.error("supervisor: policy %s announced but the files do not load: %s",
                              announced, exc)
                    continue
                loaded = self.governor.policy.hash if self.governor.policy else None
                if self.fast and loaded != current:
                    self._fast_policy()
                if loaded != announced:
                    log.warning("supervisor: loaded policy %s, the daemon announced %s "
                                "(files changed in between?)", loaded, announced)

    def _session_fields(self, s: Session) -> dict:
        return {"session": s.id, "agent": s.agent, "on_behalf_of": s.on_behalf_of, "task": s.task}

    def _hold_record(self, hold: Hold, state: str, reason: str | None = None) -> None:
        self._emit({"kind": "hold", "time": time.time_ns(), "hold_id": hold.id, "state": state,
                    **self._session_fields(hold.session), "pid": hold.notification.pid,
                    "action": hold.action, "rule": hold.rule, "policy_hash": hold.policy_hash,
                    "required": hold.required, "approvers": sorted(hold.approvals),
                    "reason": reason, "waited": round(time.monotonic() - hold.since, 3)})

    def _refusal_record(self, s: Session, pid: int, action: str, verdict, taken: str) -> None:
        self._emit({"kind": "violation", "time": time.time_ns(), "agent": s.agent, "pid": pid,
                    "comm": "", "event": "seccomp", "event_seq": None, "attempted": action,
                    "decision": verdict.decision, "rule": verdict.rule, "reason": verdict.reason,
                    "policy_hash": verdict.policy_hash, "mode": verdict.mode,
                    "action": verdict.action or "refuse", "action_taken": taken,
                    "session": s.id})

    # -- reading a notified syscall ---------------------------------------------------

    def _base(self, pid: int, dirfd: int) -> str | None:
        return proc_link(pid, "cwd") if dirfd == AT_FDCWD else proc_link(pid, f"fd/{dirfd}")

    def _resolve(self, pid: int, dirfd: int, raw: bytes) -> str | None:
        path = os.fsdecode(raw)
        if path.startswith("/"):
            return normalise(path)
        base = self._base(pid, dirfd)
        if base is None:
            return None
        return normalise(base + "/" + path) if path else normalise(base)

    def _read_request(self, s: Session, n: sn.Notification, name: str, mem: sn.TaskMemory) -> Request | None:
        a = n.args
        if name in ("execve", "execveat"):
            dirfd, fn_ptr, argv_ptr, flags = ((AT_FDCWD, a[0], a[1], 0) if name == "execve"
                                              else (self._int(a[0]), a[1], a[2], a[4]))
            raw = mem.string(fn_ptr)
            # One more than is read: a longer argv is judged as cut short (see policy.py).
            pointers = mem.pointers(argv_ptr, MAX_ARGS + 1) if argv_ptr else []
            if raw is None or pointers is None:
                return None
            truncated = len(pointers) > MAX_ARGS
            argv = [mem.string(p) for p in pointers[:MAX_ARGS]]
            if any(arg is None for arg in argv):
                return None
            if raw.startswith(b"/") or dirfd == AT_FDCWD:
                form = raw
            elif raw == b"" and flags & AT_EMPTY_PATH:
                form = f"/dev/fd/{dirfd}".encode()
            else:
                form = f"/dev/fd/{dirfd}/".encode() + raw
            resolved = self._resolve(n.pid, dirfd, raw)
            argv_text = [os.fsdecode(x) for x in argv]
            event = {"kind": "exec", "agent": s.agent, "resolved_filename": resolved,
                     "exec_path": "", "argv": argv_text, "argv_truncated": truncated, "ret": 0}
            shown = " ".join(argv_text) + (" ..." if truncated else "") + f" ({resolved or os.fsdecode(raw)})"
            repeatable = name == "execve" and raw.startswith(b"/") and argv_ptr and not truncated
            return Request(f"exec {shown}", ("exec", resolved, tuple(argv_text), truncated), [event], form,
                           fastpath.exec_key(s.agent, raw, argv) if repeatable else None)
        paths: list[tuple[int, int, int]] = []   # (dirfd, pointer, open flags)
        write = os.O_WRONLY
        if name == "open":
            paths = [(AT_FDCWD, a[0], self._int(a[1]))]
        elif name == "openat":
            paths = [(self._int(a[0]), a[1], self._int(a[2]))]
        elif name == "openat2":
            how = mem.u64s(a[2], 1)
            if how is None:
                return None
            paths = [(self._int(a[0]), a[1], how[0])]
        elif name == "creat":
            paths = [(AT_FDCWD, a[0], os.O_CREAT | os.O_WRONLY | os.O_TRUNC)]
        elif name == "rename":
            paths = [(AT_FDCWD, a[0], write), (AT_FDCWD, a[1], write)]
        elif name in ("renameat", "renameat2"):
            paths = [(self._int(a[0]), a[1], write), (self._int(a[2]), a[3], write)]
        elif name == "unlink" or name == "truncate":
            paths = [(AT_FDCWD, a[0], write)]
        elif name == "unlinkat":
            paths = [(self._int(a[0]), a[1], write)]
        events, shown = [], []
        for dirfd, pointer, flags in paths:
            raw = mem.string(pointer)
            if raw is None:
                return None
            resolved = self._resolve(n.pid, dirfd, raw)
            events.append({"kind": "open", "agent": s.agent, "resolved_path": resolved,
                           "path": os.fsdecode(raw), "flags": flags, "ret": 0})
            shown.append(resolved or os.fsdecode(raw))
        action = f"{name} {' -> '.join(shown)}"
        repeatable = name in ("open", "openat", "creat") and raw.startswith(b"/")
        return Request(action, ("file", name, tuple(shown)), events, None,
                       fastpath.open_key(s.agent, flags, raw) if repeatable else None)

    @staticmethod
    def _int(value: int) -> int:
        """A syscall's int argument from its 64-bit register."""
        value &= 0xFFFFFFFF
        return value - (1 << 32) if value >= 1 << 31 else value

    def _decide(self, request: Request):
        current = self.governor.policy
        if current is None:
            return policy_mod.Verdict("deny", None, None, "no policy is loaded: a session refuses "
                                      "everything it would otherwise check", "", "enforce")
        # decide() is pure: the same request under the same policy gets the same verdict.
        key = (current.hash, tuple(
            (e["kind"], e["agent"], e.get("resolved_path") or e.get("resolved_filename"),
             tuple(e.get("argv", ())), e.get("argv_truncated"), policy_mod.is_write(e.get("flags", 0)))
            for e in request.events))
        verdict = self.verdicts.get(key)
        if verdict is None:
            verdict = max((policy_mod.decide(event, current) for event in request.events),
                          key=lambda v: wire.SEVERITY[v.decision])
            if len(self.verdicts) >= VERDICT_CACHE:
                self.verdicts.pop(next(iter(self.verdicts)))
            self.verdicts[key] = verdict
        return verdict

    # -- exec verification ------------------------------------------------------------

    def _follow_approved_map(self) -> None:
        """Keep the fd of the probe's pinned approved_exec map, and the fast
        path's mappings of its approval_slots and exec_stash; a restarted probe
        pins new ones. Checked every health interval, not per exec: until then
        approvals land in the old maps, and the new program kills those execs
        (fail closed)."""
        approved_path, *mapped = (self.settings.bpf_pin_dir / name for name in bpfsys.SUPERVISOR_MAPS)
        try:
            inodes = (os.stat(approved_path).st_ino, *(_inode(path) for path in mapped))
            if self._approved_fd is None or inodes != self._pinned_inodes:
                fd = bpfsys.open_pinned(approved_path)
                if self.fast:
                    self._map_shared(fd, mapped)
                if self._approved_fd is not None:
                    os.close(self._approved_fd)
                self._approved_fd, self._pinned_inodes = fd, inodes
        except OSError as exc:
            if self.fast:
                self.fast.set_maps(None, None, None)
            if self._approved_fd is not None:
                os.close(self._approved_fd)
            self._approved_fd = self._pinned_inodes = None
            if self.sessions:
                log.error("cannot open the probe's approved-exec map %s: %s", approved_path, exc)

    def _map_shared(self, approved_fd: int, paths: list[Path]) -> None:
        """Hand the fast path approved_exec and the maps it maps (approval_slots,
        exec_stash); approved_exec alone, and the tasks' memory read, if they
        are not there (an older probe) or cannot be mapped."""
        fds = []
        try:
            for path in paths:
                fds.append(bpfsys.open_pinned(path))
            self.fast.set_maps(approved_fd, *fds)
        except OSError as exc:
            log.warning("approving execs by bpf() and reading their filenames from the tasks: %s", exc)
            self.fast.set_maps(approved_fd, None, None)
        finally:
            for fd in fds:
                os.close(fd)

    def _approve_exec(self, tid: int, form: bytes) -> bool:
        """Tell the BPF program what this thread may execute; False when the
        map cannot be written (then the exec must be refused)."""
        if self._approved_fd is None:
            self._follow_approved_map()
            if self._approved_fd is None:
                return False
        data = form + b"\0"
        if len(data) > APPROVED_PATH_MAX or tid == 0:   # 0: not in our pid namespace
            return False
        try:
            # approved_exec, whose updates are atomic; approval_slots are the
            # fast path threads' alone (see fastpath.c).
            bpfsys.update(self._approved_fd, struct.pack("=I", tid), bytes(APPROVED(len=len(data), path=data)))
            return True
        except OSError as exc:
            log.error("cannot write approved exec for %d: %s", tid, exc)
            self._follow_approved_map()
            return False

    def _withdraw_exec(self, tid: int) -> None:
        """Take back an approval whose call could not be continued (its task
        died meanwhile, perhaps before its exit removed it)."""
        if self._approved_fd is not None:
            try:
                bpfsys.delete(self._approved_fd, struct.pack("=I", tid))
            except OSError:
                pass

    def _let_through(self, fd: int, n: sn.Notification, exec_form: bytes | None) -> bool:
        if exec_form is not None and not self._approve_exec(n.pid, exec_form):
            sn.respond(fd, n.id, allow=False)
            return False
        self.counters["continued"] += 1
        if sn.respond(fd, n.id, allow=True):
            return True
        if exec_form is not None:
            self._withdraw_exec(n.pid)
        return False

    # -- notifications --------------------------------------------------------------

    def on_notification(self, fd: int, n: sn.Notification | None = None) -> None:
        """A notification on fd: received here, or n as the fast path forwarded it."""
        started = time.perf_counter_ns()
        try:
            self._on_notification(fd, n)
        finally:
            self.handling_ns.append(time.perf_counter_ns() - started)

    def on_forwarded(self) -> None:
        for kind, fd, n in self.fast.events():
            if fd not in self.sessions:
                continue  # cannot happen: fds close only after their hang-up, in order
            if kind == fastpath.FORWARD_NOTIFICATION:
                self.on_notification(fd, n)
            elif kind == fastpath.FORWARD_HANGUP:
                self._end_session(fd)

    def _on_notification(self, fd: int, n: sn.Notification | None) -> None:
        s = self.sessions[fd]
        if n is None:
            n = sn.receive(fd)
            if n is None:
                return
        self.counters["notifications"] += 1
        name = self.names.get(n.nr, str(n.nr))
        try:
            with sn.TaskMemory(n.pid) as mem:
                request = self._read_request(s, n, name, mem)
        except OSError:
            request = None
        if not sn.still_valid(fd, n.id):
            return  # the task died or was interrupted: nothing to answer
        if request is None:
            self.counters["unreadable"] += 1
            sn.respond(fd, n.id, allow=False)
            verdict = policy_mod.Verdict("deny", None, None, "the arguments could not be read", "", "enforce")
            self._refusal_record(s, n.pid, f"{name} (unreadable arguments)", verdict, "refused: EPERM")
            return
        verdict = self._decide(request)
        agent_policy = self.governor.policy.agents.get(s.agent) if self.governor.policy else None
        if verdict.decision == "allow":
            if self.fast and request.fast_key:
                # Learnt before the task goes on, so its next identical call finds
                # it; decide() is pure: same line, same verdict.
                self.fast.learn(request.fast_key)
            self._let_through(fd, n, request.exec_form)
            return
        if verdict.mode == "monitor":
            self._let_through(fd, n, request.exec_form)
            self._refusal_record(s, n.pid, request.action, verdict, "none (monitor mode)")
            return
        wants_hold = verdict.decision == "hold" or (
            verdict.decision == "violation" and agent_policy and agent_policy.on_violation == "hold")
        if not wants_hold:
            self.counters["refused"] += 1
            sn.respond(fd, n.id, allow=False)
            self._refusal_record(s, n.pid, request.action, verdict, "refused: EPERM")
            return
        remembered = self.remembered.get((s.agent, request.key))
        if remembered and remembered > time.monotonic():
            self._let_through(fd, n, request.exec_form)
            return
        self._hold(s, fd, n, request, verdict, agent_policy)

    def _hold(self, s: Session, fd: int, n: sn.Notification, request: Request, verdict, agent_policy) -> None:
        # A held call the agent re-issues (signal restart) is the same hold.
        for hold in self.holds.values():
            if hold.session is s and hold.notification.pid == n.pid and hold.key == request.key:
                hold.notification = n
                return
        timeout = agent_policy.hold_timeout if agent_policy else policy_mod.DEFAULT_HOLD_TIMEOUT
        hold = Hold(id=f"h{next(self.hold_numbers)}-{uuid.uuid4().hex[:4]}", session=s,
                    notification=n, key=request.key, action=request.action,
                    exec_form=request.exec_form, decision=verdict.decision, rule=verdict.rule,
                    reason=verdict.reason, policy_hash=verdict.policy_hash,
                    required=agent_policy.hold_approvers if agent_policy else 1,
                    since=time.monotonic(), since_ns=time.time_ns(),
                    deadline=time.monotonic() + timeout)
        self.holds[hold.id] = hold
        self.counters["held"] += 1
        self._hold_record(hold, "pending", verdict.reason)

    def _finish(self, hold: Hold, allow: bool, state: str, reason: str | None) -> None:
        del self.holds[hold.id]
        fd, n = hold.session.fd, hold.notification
        if not sn.still_valid(fd, n.id):
            self._hold_record(hold, "abandoned", "the waiting process is gone")
            return
        if allow:
            delivered = self._let_through(fd, n, hold.exec_form)
        else:
            delivered = sn.respond(fd, n.id, allow=False)
        self._hold_record(hold, state if delivered else "abandoned", reason)

    def expire_holds(self) -> None:
        now = time.monotonic()
        for hold in [h for h in self.holds.values() if h.deadline <= now]:
            self._finish(hold, False, "timed-out", "no decision before the hold timeout: denied")

    # -- requests on the socket ---------------------------------------------------------

    def _refusal(self, pid: int, uid: int, gid: int) -> str | None:
        """Why this peer may not answer holds, or None. Never from inside an
        agent (even as root), nor from a descendant of a session."""
        if uid != 0:
            groups = {gid}
            try:
                for line in open(f"/proc/{pid}/status"):
                    if line.startswith("Groups:"):
                        groups |= {int(g) for g in line.split()[1:]}
            except OSError:
                return "cannot read the requester's groups"
            if self.admin_gid is None or self.admin_gid not in groups:
                return f"only root and members of group {self.admin_group!r} may answer holds"
        sessions = {s.pid for s in self.sessions.values()}
        current = pid
        for _ in range(4096):
            if current <= 1:
                return None
            if current in sessions:
                return "requests from inside an agentwarden run session are refused"
            relative = cgroup_of(current)
            if relative is None:
                return "cannot read the requester's cgroup"
            agent = self._agent_of(relative)
            if agent:
                return f"requests from inside agent {agent!r} are refused, even as root"
            current = proc_ppid(current)
        return "process ancestry too deep"

    def _agent_of(self, relative: str) -> str | None:
        """The agent tag of a cgroup or any ancestor (read from the xattrs themselves)."""
        path = Path(os.path.normpath(f"{self.root}/{relative}"))
        while True:
            try:
                tag = cgroups.read_tag(path)
            except OSError:
                tag = None
            if tag:
                return tag
            if path == self.root or self.root not in path.parents:
                return None
            path = path.parent

    def _identity(self, uid: int, request: dict) -> str:
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = f"uid:{uid}"
        sudo = request.get("sudo_user")
        return f"{sudo} (via sudo)" if uid == 0 and isinstance(sudo, str) and sudo else name

    def on_client(self, conn: socket.socket) -> None:
        try:
            data, ancillary, _flags, _addr = conn.recvmsg(wire.MAX_ADMIN_REQUEST_BYTES, socket.CMSG_SPACE(4 * 4))
        except OSError:
            data = b""
        fds = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
        if not data:
            for fd in fds:
                os.close(fd)
            self._unwatch(conn.fileno())
            conn.close()
            return
        pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                             struct.calcsize("3i")))
        try:
            request = wire.decode_admin_request(data)
            reply = self._answer(request, pid, uid, gid, fds)
        except (ValueError, TypeError, KeyError) as exc:
            reply = {"ok": False, "error": f"malformed request: {exc}"}
            for fd in fds:
                os.close(fd)
        try:
            conn.send(wire.pack(reply))
        except OSError:
            pass

    def _answer(self, request: dict, pid: int, uid: int, gid: int, fds: list[int]) -> dict:
        cmd = request["cmd"]
        if cmd == "register":
            return self._register(request, pid, uid, fds)
        for fd in fds:
            os.close(fd)  # only a registration may carry a descriptor
        refusal = self._refusal(pid, uid, gid)
        if refusal:
            return {"ok": False, "error": refusal}
        if cmd == "holds":
            return {"ok": True, "holds": [self._describe(h) for h in self.holds.values()]}
        if cmd in ("approve", "deny"):
            hold = self.holds.get(request.get("id"))
            if hold is None:
                return {"ok": False, "error": f"no pending hold {request.get('id')!r} "
                                              "(unknown, or already decided)"}
            who, reason = self._identity(uid, request), request.get("reason")
            if cmd == "deny":
                self._finish(hold, False, "denied", f"{who}: {reason or 'no reason given'}")
                return {"ok": True, "state": "denied"}
            remember = request.get("remember")
            if remember is not None:
                remember = parse_duration(str(remember), "remember", positive=True)
            if who in hold.approvals:
                return {"ok": False, "error": f"{who} already approved {hold.id}; it needs "
                                              f"{hold.required} distinct approvers"}
            hold.approvals[who] = reason
            if len(hold.approvals) < hold.required:
                self._hold_record(hold, "approval", f"{who}: {reason or 'no reason given'}")
                return {"ok": True, "state": "pending",
                        "needed": hold.required - len(hold.approvals)}
            if remember:
                self.remembered[(hold.session.agent, hold.key)] = time.monotonic() + remember
            self._finish(hold, True, "approved", "; ".join(
                f"{w}: {r or 'no reason given'}" for w, r in hold.approvals.items())
                + (f"; remembered for {remember:g}s" if remember else ""))
            return {"ok": True, "state": "approved"}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def _describe(self, hold: Hold) -> dict:
        return {"id": hold.id, **self._session_fields(hold.session), "pid": hold.notification.pid,
                "action": hold.action, "rule": hold.rule, "since": hold.since_ns,
                "waited": round(time.monotonic() - hold.since, 1),
                "timeout_in": round(hold.deadline - time.monotonic(), 1),
                "approvals": sorted(hold.approvals), "required": hold.required}

    def _register(self, request: dict, pid: int, uid: int, fds: list[int]) -> dict:
        def refuse(why: str) -> dict:
            for fd in fds:
                os.close(fd)
            return {"ok": False, "error": why}

        if uid != 0:
            return refuse("only root may register a session")
        if len(fds) != 1:
            return refuse("a registration carries exactly one seccomp listener fd")
        fields = {k: request.get(k) for k in ("session", "agent", "user", "task", "on_behalf_of",
                                              "host", "cgroup")}
        if not all(isinstance(v, str) for v in fields.values()):
            return refuse("a registration names session, agent, user, task, on_behalf_of, host, cgroup")
        self._follow_policy()  # a reload the daemon just announced
        current = self.governor.policy
        if current is None or fields["agent"] not in current.agents:
            return refuse(f"no policy for agent {fields['agent']!r}: a session needs one")
        cgroup = Path(fields["cgroup"])
        try:
            if (cgroups.read_tag(cgroup) != fields["agent"]
                    or cgroups.read_tag(cgroup, cgroups.SESSION_XATTR) != fields["session"]
                    or cgroups.read_tag(cgroup, cgroups.INSTANCE_XATTR) != self.settings.instance):
                return refuse(f"{cgroup} is not tagged as session {fields['session']} of {fields['agent']}")
        except OSError as exc:
            return refuse(f"cannot read the session cgroup {cgroup}: {exc.strerror}")
        if Path(os.path.normpath(f"{self.root}/{cgroup_of(pid)}")) != cgroup:
            return refuse("the registering process is not in the session cgroup")
        try:
            tags = control.request(self.settings, "status", timeout=2)["status"]["probe"]["tags"]
        except AgentwardenError as exc:
            return refuse(f"cannot ask the daemon whether the probe watches the session: {exc}")
        watched = tags.get(str(cgroups.cgroup_id(cgroup)))
        if not watched or watched.get("session") != fields["session"]:
            return refuse("the probe does not watch the session cgroup yet")
        fd = fds[0]
        os.set_inheritable(fd, False)
        sn.set_sync_wakeup(fd)
        session = Session(id=fields["session"], agent=fields["agent"], user=fields["user"],
                          task=fields["task"], on_behalf_of=fields["on_behalf_of"],
                          host=fields["host"], cgroup=cgroup, fd=fd, pid=pid, started=time.time_ns())
        self.sessions[fd] = session
        if not (self.fast and self._fast_watch(session)):
            self._watch(fd, "listener", fd)  # this process receives its notifications
        self._emit({"kind": "supervision", "time": session.started, "state": "started",
                    **self._session_fields(session), "user": session.user, "host": session.host,
                    "cgroup": str(cgroup), "pid": pid})
        return {"ok": True, "session": session.id}

    def _fast_watch(self, session: Session) -> bool:
        """Hand the session's listener to a fast-path thread; False if none starts."""
        try:
            self.fast.watch(session.fd, session.agent)
            return True
        except OSError as exc:
            log.error("supervisor: no fast-path thread for session %s: %s", session.id, exc)
            return False

    def _end_session(self, fd: int) -> None:
        session = self.sessions.pop(fd)
        if fd in self.watched:
            self._unwatch(fd)
        else:
            self.fast.release(fd)  # its thread forwarded the hang-up and ended
        for hold in [h for h in self.holds.values() if h.session is session]:
            del self.holds[hold.id]
            self._hold_record(hold, "abandoned", "the session ended")
        os.close(fd)
        self._emit({"kind": "supervision", "time": time.time_ns(), "state": "ended",
                    **self._session_fields(session), "user": session.user, "host": session.host,
                    "cgroup": str(session.cgroup), "pid": session.pid})
        try:
            session.cgroup.rmdir()
        except OSError:
            pass  # still populated by processes that left the filter's reach: keep it

    def _watch(self, fd: int, kind: str, target) -> None:
        self.poller.register(fd, select.EPOLLIN)
        self.watched[fd] = (kind, target)

    def _unwatch(self, fd: int) -> None:
        self.poller.unregister(fd)
        del self.watched[fd]

    # -- loop ---------------------------------------------------------------------------

    def stop(self) -> None:
        self.stopping = True

    def run(self) -> None:
        next_health = 0.0
        while not self.stopping:
            if time.monotonic() >= next_health:
                next_health = time.monotonic() + HEALTH_INTERVAL
                self._follow_policy()
                self._follow_approved_map()
                self._health()
            timeout = 0.2
            if self.holds:
                timeout = max(0.0, min(timeout, min(h.deadline for h in self.holds.values()) - time.monotonic()))
            for fd, mask in self.poller.poll(timeout):
                kind, target = self.watched.get(fd, (None, None))
                try:
                    if kind == "listener":
                        if mask & select.EPOLLIN:
                            self.on_notification(fd)
                        elif mask & select.EPOLLHUP:
                            self._end_session(fd)
                    elif kind == "server":
                        conn, _ = self.server.accept()
                        conn.setblocking(True)
                        conn.settimeout(2)
                        self._watch(conn.fileno(), "client", conn)
                    elif kind == "client":
                        self.on_client(target)
                    elif kind == "fastpath":
                        self.on_forwarded()
                except Exception:  # one bad peer must not stop supervision of the others
                    log.exception("supervisor: error handling %s", kind)
            self.expire_holds()
        if self.fast:
            self.fast.stop()
        for fd, session in list(self.sessions.items()):
            os.close(fd)  # held and future notified calls now fail with ENOSYS
            try:
                session.cgroup.rmdir()  # an empty session leaves nothing behind
            except OSError:
                pass
        self.server.close()
        self.poller.close()
        self._health()
        self.out.close()
        self.policy_feed.close()


def summarise(times_ns) -> dict:
    """Handling times (notification readable to answered): median and p99."""
    recent = sorted(times_ns)
    if not recent:
        return {}
    return {"n": len(recent), "median_us": recent[len(recent) // 2] / 1000,
            "p99_us": recent[min(len(recent) - 1, int(len(recent) * 0.99))] / 1000}


def main(settings: Settings) -> None:
    """The supervisor process: dies with the daemon that started it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        return  # the daemon is already gone
    logging.basicConfig(level=logging.INFO, format="agentwarden-supervisor: %(message)s")
    supervisor = Supervisor(settings)
    signal.signal(signal.SIGTERM, lambda *_: supervisor.stop())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when to stop
    supervisor.run()


if __name__ == "__main__":
    # Started by the daemon as `python -m agentwarden.daemon.supervisor [--config F] [--set K=V]`.
    import argparse

    from agentwarden import settings as settings_mod
    parser = argparse.ArgumentParser(prog="agentwarden-supervisor")
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[])
    flags = parser.parse_args()
    settings_mod.use_flags(flags.config, flags.set)
    main(Settings.from_env())
