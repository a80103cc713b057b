"""Sessions: who each agent acts for, so that every event can be attributed.

A session is one tagged cgroup under one agent name. Its id comes from the
cgroup's ``trusted.agentwarden.session`` xattr when set (``agentwarden run``
sets it, with task, person and user); otherwise it is derived from the boot,
the cgroup id and the agent name, so a restarted daemon finds the same id.
The daemon archives a ``session`` record when a session appears, changes or
ends, restates all of them at its start and at each new archive segment (so
retention never strips events of their attribution), and puts the id in
every event and violation.
"""
from __future__ import annotations

import hashlib
import os
import pwd
import time
from typing import Any

# the fields that make a session what it is (a change of one is a new session record)
_IDENTITY = ("session", "agent", "source", "cgroup_id", "cgroup", "person", "task", "user")


def derived_id(boot_id: str, cgroup_id: int, agent: str) -> str:
    digest = hashlib.blake2b(f"{boot_id}/{cgroup_id}/{agent}".encode(), digest_size=6).hexdigest()
    return f"{agent}-{digest}"


def _owner(path: str | None) -> str | None:
    if not path:
        return None
    try:
        uid = os.stat(path).st_uid
    except OSError:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class Sessions:
    def __init__(self, host: str, boot_id: str):
        self.host = host
        self.boot_id = boot_id
        self.active: dict[int, dict[str, Any]] = {}   # cgroup id -> its latest session record
        self.ids: dict[int, str] = {}                 # kept after a session ends, for late events

    def session_of(self, cgroup_id: int) -> str | None:
        return self.ids.get(cgroup_id)

    def of_agent(self, agent: str | None) -> list[str]:
        """Active sessions of an agent (of every agent for None or "*")."""
        return sorted(r["session"] for r in self.active.values()
                      if agent in (None, "*") or r["agent"] == agent)

    def _record(self, cgroup_id: int, info: dict, policy_hash: str | None, now: int) -> dict[str, Any]:
        agent = info["agent"]
        given = info.get("session")
        path = info.get("path") if isinstance(info.get("path"), str) else None
        return {"kind": "session", "time": now, "status": "active",
                "session": given if isinstance(given, str) else derived_id(self.boot_id, cgroup_id, agent),
                "agent": agent, "source": "xattr" if isinstance(given, str) else "tag",
                "cgroup_id": cgroup_id, "cgroup": path,
                "person": info.get("on_behalf_of") if isinstance(info.get("on_behalf_of"), str) else None,
                "task": info.get("task") if isinstance(info.get("task"), str) else None,
                "user": info["user"] if isinstance(info.get("user"), str) else _owner(path),
                "host": self.host, "boot_id": self.boot_id, "policy_hash": policy_hash}

    def update(self, tags: dict, policy_hash: str | None, now: int | None = None) -> list[dict]:
        """Session records for what a tags record changed: new, changed, ended."""
        now = time.time_ns() if now is None else now
        out, seen = [], set()
        for key, info in tags.items():
            if not (str(key).isdigit() and isinstance(info, dict) and isinstance(info.get("agent"), str)):
                continue
            cgroup_id = int(key)
            seen.add(cgroup_id)
            record = self._record(cgroup_id, info, policy_hash, now)
            old = self.active.get(cgroup_id)
            if old is None or any(old[f] != record[f] for f in _IDENTITY):
                if old is not None and old["session"] != record["session"]:
                    out.append({**old, "time": now, "status": "ended"})
                self.active[cgroup_id] = record
                self.ids[cgroup_id] = record["session"]
                out.append(record)
        for cgroup_id in set(self.active) - seen:
            out.append({**self.active.pop(cgroup_id), "time": now, "status": "ended"})
        return out

    def restate(self, policy_hash: str | None, now: int | None = None) -> list[dict]:
        """Every active session again (a new segment, a new policy)."""
        now = time.time_ns() if now is None else now
        for cgroup_id, record in self.active.items():
            self.active[cgroup_id] = {**record, "time": now, "policy_hash": policy_hash}
        return [dict(r) for r in self.active.values()]
