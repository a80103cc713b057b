"""Fail closed while agents would act unrecorded or unwatched: a guard applies
its policy to every agent cgroup — ``freeze`` freezes them, ``kill`` kills
them, ``continue`` only raises the alert — and thaws what it froze once the
cause is gone. Cgroups that were already frozen (by an admin, a policy
violation or another guard), or that such a one froze meanwhile, are left as
they are, so one guard never thaws what another still holds.

The daemon keeps two: the archive guard (the archive cannot be written, a
full disk above all; policy `on_disk_full`) and the watch guard (the probe is
gone; always freeze, see watch.py).
"""
from __future__ import annotations

import time
from pathlib import Path

from agentwarden import cgroups


def _freeze_requested(path: Path) -> bool:
    try:
        return (path / "cgroup.freeze").read_text().strip() == "1"
    except OSError:
        return False


class FreezeGuard:
    def __init__(self, policy: str):
        self.policy = policy
        self.since: float | None = None        # monotonic time the guard engaged
        self.frozen: dict[int, Path] = {}      # what this guard froze (and will thaw)
        self.handled: set[int] = set()         # cgroups already dealt with while active

    @property
    def active(self) -> bool:
        return self.since is not None

    def engage(self, tags: dict) -> str:
        self.since = time.monotonic()
        return self.apply(tags) or "no tagged agents"

    def apply(self, tags: dict) -> str:
        """Apply the policy to tagged cgroups not handled yet (new agents too)."""
        if self.policy == "continue":
            return "none (policy continue: agents go on unrecorded)"
        results = []
        for key, info in tags.items():
            if not (str(key).isdigit() and isinstance(info, dict) and isinstance(info.get("path"), str)):
                continue
            cgroup_id, path = int(key), Path(info["path"])
            if cgroup_id in self.handled:
                continue
            self.handled.add(cgroup_id)
            if self.policy == "kill":
                results.append(cgroups.kill_cgroup(path))
            elif _freeze_requested(path):
                results.append(f"{path} was frozen already")
            else:
                result = cgroups.set_frozen(path, True)
                if result.startswith("froze"):
                    self.frozen[cgroup_id] = path
                results.append(result)
        return "; ".join(results)

    def forget(self, cgroup_ids) -> None:
        """Someone else (a policy violation, an admin) decided about these: never thaw them."""
        for cgroup_id in cgroup_ids:
            self.frozen.pop(cgroup_id, None)

    def release(self) -> tuple[float, str]:
        """The cause is gone: thaw what the guard froze. Returns (seconds, what was done)."""
        seconds = time.monotonic() - self.since if self.since is not None else 0.0
        results = [cgroups.set_frozen(path, False) for path in self.frozen.values()]
        self.since, self.frozen, self.handled = None, {}, set()
        return seconds, "; ".join(results) or "nothing to thaw"

    def state(self) -> dict:
        return {"policy": self.policy, "active": self.active,
                "frozen": sorted(str(p) for p in self.frozen.values())}
