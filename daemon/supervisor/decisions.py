"""The decision cache: verdicts for requests under the current policy, kept
since decide() is pure, and the approvals admins asked to remember."""
from __future__ import annotations

import time

from agentwarden import policy as policy_mod
from agentwarden import wire

from .reader import Request

VERDICT_CACHE = 4096


class Decisions:
    def __init__(self):
        self.verdicts: dict[tuple, policy_mod.Verdict] = {}
        self.remembered: dict[tuple, tuple[float, str]] = {}   # (agent, key) -> (monotonic expiry, hold id)

    def decide(self, current: policy_mod.PolicySet | None, request: Request) -> policy_mod.Verdict:
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

    def remember(self, agent: str, key: tuple, seconds: float, hold_id: str) -> None:
        """An admin's approval (of hold hold_id) that lets the same action by
        the same agent through without a hold for a while."""
        self.remembered[(agent, key)] = (time.monotonic() + seconds, hold_id)

    def remembered_from(self, agent: str, key: tuple) -> str | None:
        """The hold whose remembered approval covers this action now, or None."""
        expiry, hold_id = self.remembered.get((agent, key), (0.0, None))
        return hold_id if expiry > time.monotonic() else None
