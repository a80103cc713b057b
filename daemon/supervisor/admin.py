"""The supervisor's socket (UNIX seqpacket, the peer's credentials from the
kernel): `run` registers a session and hands over its listener fd; admins
list, show, approve and deny holds -- never from inside an agent or a session."""
from __future__ import annotations

import array
import os
import socket
import struct
import time
from pathlib import Path
from typing import Callable

from agentwarden import cgroups, control, fleet, identity, wire
from agentwarden import policy as policy_mod
from agentwarden import session as session_mod
from agentwarden import seccomp_notify as sn
from agentwarden.drift import DriftError
from agentwarden.durations import parse_duration
from agentwarden.errors import AgentwardenError
from agentwarden.settings import Settings

from ..resolver import proc_ppid
from . import context
from .decisions import Decisions
from .holds import Hold, Holds
from .listeners import Listeners, Session
from .records import Records, session_fields


class Admin:
    def __init__(self, settings: Settings, listeners: Listeners, holds: Holds, decisions: Decisions,
                 records: Records, current_policy: Callable[[], policy_mod.PolicySet | None],
                 start_session: Callable[[Session], None], drift=None):
        """current_policy: the policy, reloaded first if the daemon announced
        another; start_session: supervise a registered session."""
        self.settings = settings
        self.listeners = listeners
        self.holds = holds
        self.decisions = decisions
        self.records = records
        self.current_policy = current_policy
        self.start_session = start_session
        self.drift = drift   # daemon.drift.SessionCapture: revert, accept, baseline
        self.admin_gid = settings.admin_gid()
        self.admin_group = settings.admin_group
        self.root = cgroups.cgroup2_root()
        self.session_filter: bytes | None = None   # built at the first `launch`
        self.server = self._listen()

    def _listen(self) -> socket.socket:
        path = self.settings.sessions_socket
        if path.exists():
            path.unlink()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        server.bind(str(path))
        self.settings.restrict_socket(path)  # root, and the admin group when there is one
        server.listen(64)
        server.setblocking(False)
        self.listeners.watch(server.fileno(), "server", server)
        return server

    def accept(self) -> None:
        conn, _ = self.server.accept()
        conn.setblocking(True)
        conn.settimeout(2)
        self.listeners.watch(conn.fileno(), "client", conn)

    def close(self) -> None:
        self.server.close()

    # -- who asks -------------------------------------------------------------------------

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
        sessions = {s.pid for s in self.listeners.sessions.values()}
        tags = self._probe_tags()   # once: the whole ancestry is judged against one report
        current = pid
        for _ in range(4096):
            if current <= 1:
                return None
            if current in sessions:
                return "requests from inside an agentwarden run session are refused"
            relative = cgroups.cgroup_of(current)
            if relative is None:
                return "cannot read the requester's cgroup"
            agent = self._agent_of(relative, tags)
            if agent:
                return f"requests from inside agent {agent!r} are refused, even as root"
            current = proc_ppid(current)
        return "process ancestry too deep"

    def _probe_tags(self) -> dict:
        """The agent cgroups as the probe last reported them (it reads the
        trusted.* tags, which this process may not see: the daemon's unit has
        no CAP_SYS_ADMIN). Empty when the daemon cannot say."""
        try:
            return control.request(self.settings, "status", timeout=2)["status"]["probe"]["tags"]
        except AgentwardenError:
            return {}

    def _agent_of(self, relative: str, tags: dict) -> str | None:
        """The agent of a cgroup or any ancestor: a tag it carries (where this
        process can read trusted.* xattrs) or the probe's word for it (tags)."""
        path = Path(os.path.normpath(f"{self.root}/{relative}"))
        while True:
            try:
                tag = cgroups.read_tag(path)
            except OSError:
                tag = None
            if not tag:
                try:
                    tag = (tags.get(str(cgroups.cgroup_id(path))) or {}).get("agent")
                except OSError:
                    tag = None
            if tag:
                return tag
            if path == self.root or self.root not in path.parents:
                return None
            path = path.parent

    @staticmethod
    def _approver(pid: int, uid: int, reason: str | None) -> dict:
        """Who answers, from the kernel alone: the socket peer's uid (SO_PEERCRED)
        and, for root, the audit login uid of its session (who logged in before
        sudo). Environment variables (SUDO_USER) are never asked."""
        name, login = identity.describe(pid, uid)
        answer = {"uid": uid, "name": name, "reason": reason, "time": time.time_ns()}
        if login is not None:
            answer["login_uid"] = login
        return answer

    # -- requests -------------------------------------------------------------------------

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
            self.listeners.unwatch(conn.fileno())
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
        if cmd == "launch":
            return self._launch(uid, fds)
        if cmd == "register":
            return self._register(request, pid, uid, fds)
        for fd in fds:
            os.close(fd)  # only a registration may carry a descriptor
        refusal = self._refusal(pid, uid, gid)
        if refusal:
            return {"ok": False, "error": refusal}
        if cmd == "holds":
            return {"ok": True, "holds": [self._describe(h) for h in self.holds.pending.values()]}
        if cmd in wire.DRIFT_COMMANDS:
            return self._drift(cmd, request, self._approver(pid, uid, request.get("reason")), pid)
        if cmd in ("show", "approve", "deny"):
            hold = self.holds.pending.get(request.get("id"))
            if hold is None:
                return {"ok": False, "error": f"no pending hold {request.get('id')!r} "
                                              "(unknown, or already decided)"}
            if cmd == "show":
                return self._show(hold)
            reason = request.get("reason")
            if reason is not None and not isinstance(reason, str):
                raise ValueError("reason must be a string")
            return self._decide(hold, cmd, uid, self._approver(pid, uid, reason), reason,
                                request.get("remember"), request.get("expires"))
        if cmd == "decide":
            return self._fleet_decision(request.get("signed"))
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def _decide(self, hold: Hold, cmd: str, approver, who: dict, reason: str | None,
                remember, expires=None) -> dict:
        """An answer to a hold; approver: what makes approvers distinct (the
        uid from the kernel, or the fleet admin's key)."""
        if cmd == "deny":
            hold.denial = who
            self.holds.finish(hold, False, "denied", f"{who['name']}: {reason or 'no reason given'}")
            return {"ok": True, "state": "denied"}
        if remember is not None:
            remember = parse_duration(str(remember), "remember", positive=True)
            if remember > self.settings.remember_max:
                return {"ok": False, "error": f"--remember {remember:g}s is longer than "
                                              f"remember_max ({self.settings.remember_max:g}s)"}
        if expires is not None:
            hold.change_expires = parse_duration(str(expires), "expires", positive=True)
        if approver in hold.approvals:
            return {"ok": False, "error": f"{hold.approvals[approver]['name']} already approved "
                                          f"{hold.id}; it needs {hold.required} approvals by distinct "
                                          "admins (root counts once, whatever sudo says)"}
        hold.approvals[approver] = who
        if len(hold.approvals) < hold.required:
            self.holds.keeper.keep_hold(hold)   # the approval outlives a restart
            self.records.hold(hold, "approval", f"{who['name']}: {reason or 'no reason given'}")
            return {"ok": True, "state": "pending", "needed": hold.required - len(hold.approvals)}
        if remember:
            self.decisions.remember(hold.session.agent, hold.key, remember, hold.id)
        self.holds.finish(hold, True, "approved", "; ".join(
            f"{a['name']}: {a['reason'] or 'no reason given'}" for a in hold.approvals.values())
            + (f"; remembered for {remember:g}s" if remember else ""))
        return {"ok": True, "state": "approved"}

    def _fleet_decision(self, signed) -> dict:
        """A decision an admin signed elsewhere, forwarded from NATS by the
        daemon: the signature is the identity (a key in fleet_admin_keys), and
        each key counts as one approver. Every refusal is recorded."""
        if not isinstance(signed, bytes):
            raise ValueError("decide carries the signed decision as bytes")
        try:
            admins = fleet.load_admin_keys(self.settings.fleet_admin_keys)
            decision, name = fleet.verify_decision(signed, admins, self.settings.fleet_name)
            hold = self.holds.pending.get(decision.hold_id)
            if hold is None:
                raise fleet.FleetError(f"no pending hold {decision.hold_id!r} (unknown, or already decided)")
        except fleet.FleetError as exc:
            try:
                claimed = fleet.open_decision(signed)[0]
                about = {"hold_id": claimed.hold_id, "signer": claimed.fingerprint}
            except fleet.FleetError:
                about = {}
            self.records.emit({"kind": "fleet", "time": time.time_ns(), "event": "refused",
                               "detail": f"fleet decision refused: {exc}", **about})
            return {"ok": False, "error": f"refused by {self.settings.fleet_name}: {exc}"}
        who = {"key": decision.fingerprint, "name": f"{name} (fleet key {decision.fingerprint})",
               "reason": decision.reason, "time": time.time_ns()}
        self.records.emit({"kind": "fleet", "time": time.time_ns(), "event": "accepted",
                           "detail": f"{decision.verdict} of {hold.id} signed by {name}",
                           "hold_id": hold.id, "signer": decision.fingerprint})
        return self._decide(hold, "approve" if decision.verdict == "approve" else "deny",
                            f"fleet:{decision.fingerprint}", who, decision.reason, decision.remember)

    def _drift(self, cmd: str, request: dict, who: dict, pid: int) -> dict:
        """An admin's revert (checked here, written by the admin's process pid,
        archived once it reports), accept or baseline; refused in one line,
        nothing written."""
        if self.drift is None:
            return {"ok": False, "error": "drift is not running in this supervisor"}
        reason = request.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise ValueError("reason must be a string")
        try:
            if cmd == "drift-baseline":
                paths = request.get("paths")
                if not isinstance(paths, list) or not paths:
                    raise ValueError("paths must be a list of paths")
                return {"ok": True, "baselines": self.drift.baseline(paths, who)}
            if cmd == "drift-reverted":
                error = request.get("error")
                if error is not None and not isinstance(error, str):
                    raise ValueError("error must be a string")
                return {"ok": True, "change": self.drift.reverted(request.get("token"), pid, who["uid"], error)}
            change_id = request.get("id")
            if not isinstance(change_id, str):
                raise ValueError("id must be a string")
            if cmd == "drift-revert":
                return {"ok": True, **self.drift.grant_revert(change_id, bool(request.get("force")), who, pid)}
            return {"ok": True, "change": self.drift.accept(change_id, who)}
        except DriftError as exc:
            return {"ok": False, "error": str(exc)}
        except OSError as exc:
            return {"ok": False, "error": f"{exc.filename or ''}: {exc.strerror}; nothing more written"}

    def _show(self, hold: Hold) -> dict:
        """A pending hold with what an approver needs to judge it (context.py),
        read while its task waits; refused if the task is gone meanwhile (its
        pid could be another process's by now)."""
        s, n, request = hold.session, hold.notification, hold.request
        paths = [e.get("resolved_filename") or e.get("resolved_path") for e in request.events]
        shown = {**self._describe(hold), "user": s.user, "host": s.host, "started": s.started,
                 "decision": hold.decision, "reason": hold.reason, "policy_hash": hold.policy_hash,
                 "agent_says": hold.agent_says, "approved_by": list(hold.approvals.values()),
                 "ancestry": context.ancestry(n.pid, s.pid), "recent": list(s.recent),
                 "syscall": request.syscall, **context.call_context(n.pid, request.syscall, paths)}
        if not sn.still_valid(s.fd, n.id):
            return {"ok": False, "error": f"the process held by {hold.id} is gone (it will be "
                                          "recorded as abandoned)"}
        return {"ok": True, "hold": shown}

    def _describe(self, hold: Hold) -> dict:
        return {"id": hold.id, **session_fields(hold.session), "pid": hold.notification.pid,
                "action": hold.action, "rule": hold.rule, "since": hold.since_ns,
                "waited": round(time.monotonic() - hold.since, 1),
                "timeout_in": round(hold.deadline - time.monotonic(), 1),
                "approvals": sorted(a["name"] for a in hold.approvals.values()), "required": hold.required}

    def _launch(self, uid: int, fds: list[int]) -> dict:
        """The launcher's first request: the session filter it installs (one
        definition, seccomp_notify.build_filter) and the instance its session
        cgroup is tagged for; it registers on the same connection."""
        for fd in fds:
            os.close(fd)
        if uid != 0:
            return {"ok": False, "error": "only root may start a session"}
        if self.session_filter is None:
            self.session_filter = sn.build_filter()
        return {"ok": True, "filter": self.session_filter, "instance": self.settings.instance}

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
        current = self.current_policy()  # after a reload the daemon just announced
        if current is None or fields["agent"] not in current.agents:
            return refuse(f"no policy for agent {fields['agent']!r}: a session needs one")
        cgroup = Path(fields["cgroup"])
        if Path(os.path.normpath(f"{self.root}/{cgroups.cgroup_of(pid)}")) != cgroup:
            return refuse("the registering process is not in the session cgroup")
        # The session's tags, as the probe read them (it has CAP_SYS_ADMIN for
        # trusted.* xattrs; the daemon's unit does not): it watches the cgroup
        # as this session of this agent, made for this instance. Asked of the
        # probe itself: `run` had it watched a moment ago, the daemon may not
        # have its tags record yet.
        try:
            watched = session_mod.probe_request(self.settings, {
                "cmd": "tag", "cgroup_id": cgroups.cgroup_id(cgroup)}, timeout=2)["tag"]
        except (AgentwardenError, OSError, KeyError) as exc:
            return refuse(f"cannot ask the probe whether it watches the session: {exc}")
        if not watched or watched.get("session") != fields["session"]:
            return refuse("the probe does not watch the session cgroup yet")
        if watched.get("agent") != fields["agent"] or watched.get("instance") != self.settings.instance:
            return refuse(f"{cgroup} is not tagged as session {fields['session']} of {fields['agent']} "
                          "for this instance")
        fd = fds[0]
        os.set_inheritable(fd, False)
        sn.set_sync_wakeup(fd)
        session = Session(id=fields["session"], agent=fields["agent"], user=fields["user"],
                          task=fields["task"], on_behalf_of=fields["on_behalf_of"],
                          host=fields["host"], cgroup=cgroup, fd=fd, pid=pid, started=time.time_ns())
        self.start_session(session)
        return {"ok": True, "session": session.id}
