"""drift's index: one JSON file per change (changes/ID.json) and per baseline
(baselines/SHA256-OF-PATH.json), written atomically, root's alone; what the
`drift` commands read. The archive's `drift` records say the same, chained;
the index is their working copy, with the store's content beside it.

A change: id, path, time (ns), agent, session, person, user, task, syscalls,
hold_id (and `remembered`), approvers, reason, policy_hash, expires (ns or
None), source (session | outside), before and after (store.observe's facts;
after None while its writer may still be writing), and `admin` once an admin
reverted or accepted it ({state, name, uid, time, force})."""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Iterator

from .store import DriftError, observe, same, write_atomic

STATES = ("active", "expired", "accepted", "reverted", "diverged")


def new_id() -> str:
    return f"c-{uuid.uuid4().hex[:10]}"


def state(change: dict, now_facts: dict | None, now_ns: int) -> str:
    """active | expired | accepted | reverted | diverged, for a change and
    what its path is now (None: not looked at). An admin's answer stands; a
    file that no longer is what the change left is diverged (someone changed
    it since); else an approval past its expiry is expired."""
    if change.get("admin"):
        return change["admin"]["state"]
    after = change.get("after")
    if after is not None and now_facts is not None and not same(after, now_facts):
        return "diverged"
    if change.get("expires") is not None and now_ns >= change["expires"]:
        return "expired"
    return "active"


class Index:
    def __init__(self, root: Path):
        """root: the drift directory (settings.drift_dir)."""
        self.root = root
        self.changes_dir = root / "changes"
        self.baselines_dir = root / "baselines"

    # -- changes --------------------------------------------------------------------------

    def save(self, change: dict) -> None:
        write_atomic(self.changes_dir / f"{change['id']}.json",
                     json.dumps(change, sort_keys=True, default=_text).encode())

    def drop(self, change_id: str) -> None:
        try:
            os.unlink(self.changes_dir / f"{change_id}.json")
        except FileNotFoundError:
            pass

    def load(self, change_id: str) -> dict:
        if not change_id or "/" in change_id or change_id.startswith("."):
            raise DriftError(f"no change {change_id!r} (ids look like c-1a2b3c4d5e: see `agentwarden drift`)")
        try:
            return json.loads((self.changes_dir / f"{change_id}.json").read_text())
        except FileNotFoundError:
            raise DriftError(f"no change {change_id!r} (see `agentwarden drift` for the ids)") from None
        except (OSError, ValueError) as exc:
            raise DriftError(f"cannot read change {change_id}: {exc}") from None

    def changes(self) -> Iterator[dict]:
        """Every change, oldest first."""
        found = []
        for entry in self.changes_dir.glob("c-*.json") if self.changes_dir.is_dir() else ():
            try:
                found.append(json.loads(entry.read_text()))
            except (OSError, ValueError):
                continue   # being replaced this instant, or damaged: the archive has it
        return iter(sorted(found, key=lambda c: (c["time"], c["id"])))

    # -- baselines ------------------------------------------------------------------------

    def _baseline_file(self, path: str) -> Path:
        return self.baselines_dir / f"{hashlib.sha256(path.encode('utf-8', 'surrogateescape')).hexdigest()}.json"

    def save_baseline(self, baseline: dict) -> None:
        write_atomic(self._baseline_file(baseline["path"]),
                     json.dumps(baseline, sort_keys=True, default=_text).encode())

    def baseline(self, path: str) -> dict | None:
        try:
            return json.loads(self._baseline_file(path).read_text())
        except (OSError, ValueError):
            return None

    def baselines(self) -> Iterator[dict]:
        for entry in sorted(self.baselines_dir.glob("*.json")) if self.baselines_dir.is_dir() else ():
            try:
                yield json.loads(entry.read_text())
            except (OSError, ValueError):
                continue


def _text(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    raise TypeError(f"{type(value).__name__} in a drift entry")


def listing(index: Index, agent: str | None = None, since_ns: int | None = None, expired_only: bool = False,
            now_ns: int | None = None) -> list[dict]:
    """The changes `agentwarden drift` shows, each with its `state` (looked up
    now) and, for a baselined file that is no longer as recorded, a line of
    its own (id b-..., source baseline, state diverged): changes made outside
    sessions by anyone."""
    now_ns = now_ns or time.time_ns()
    rows, explained = [], {}   # path -> the latest change's content after
    for change in index.changes():
        if change.get("after") is not None:
            explained[change["path"]] = change["after"]
        if agent and change.get("agent") != agent:
            continue
        if since_ns and change["time"] < since_ns:
            continue
        current = observe(change["path"]) if change.get("after") is not None else None
        row = {**change, "state": state(change, current, now_ns), "now": current}
        if expired_only and row["state"] != "expired":
            continue
        rows.append(row)
    if not agent and not expired_only:
        for baseline in index.baselines():
            current = observe(baseline["path"])
            if same(baseline["before"], current) or same(explained.get(baseline["path"]), current) \
                    or (since_ns and baseline["time"] < since_ns):
                continue   # as recorded, or as a recorded change left it
            rows.append({"id": "b-" + hashlib.sha256(baseline["path"].encode("utf-8", "surrogateescape"))
                         .hexdigest()[:10], "time": baseline["time"], "path": baseline["path"], "agent": None,
                         "person": None, "task": None, "approvers": [], "reason": None, "source": "baseline",
                         "syscalls": [], "before": baseline["before"], "after": current, "expires": None,
                         "admin": None, "state": "diverged", "now": current})
    return rows


def find(index: Index, change_id: str) -> dict:
    """A change by id, or a baselined file by its b- id (as `listing` names it),
    as a change from its baseline to what the file is now."""
    if change_id.startswith("b-"):
        for baseline in index.baselines():
            digest = hashlib.sha256(baseline["path"].encode("utf-8", "surrogateescape")).hexdigest()
            if digest.startswith(change_id[2:]) and len(change_id) > 2:
                return {"id": change_id, "time": baseline["time"], "path": baseline["path"], "agent": None,
                        "source": "baseline", "syscalls": [], "before": baseline["before"],
                        "after": observe(baseline["path"]), "admin": None, "expires": None}
        raise DriftError(f"no baseline {change_id!r} (see `agentwarden drift` for the ids)")
    return index.load(change_id)
