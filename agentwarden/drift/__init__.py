"""Configuration drift: changes agents make to tracked files (the policy's
`[agent.NAME.files] track`), with the content before and after, who made
each, who approved it and until when, and the means to revert or accept it.

- `store`: the content-addressed store (deduplicated by sha256, a size limit
  above which only the hash is kept) and `observe`, what a path is now.
- `changes`: the index the CLI reads (one JSON file per change and baseline)
  and the state of a change: active, expired, accepted, reverted, diverged.
- `restore`: reverting a change without following symlinks, and its diff.

The supervisor captures the content before a session's change goes through
(daemon/drift.py), the daemon the changes agents make outside sessions; the
CLI (`agentwarden drift`) reads the index and asks the supervisor to accept,
or to let it revert (the admin's process writes; the supervisor checks first
and archives what it then finds), so the admin's identity comes from the
kernel (SO_PEERCRED).
"""
from .changes import STATES, Index, find, listing, new_id, state
from .restore import check, describe, diff, open_directory, read_now, revert
from .store import DriftError, Store, observe, same, write_atomic

__all__ = ["STATES", "DriftError", "Index", "check", "find", "listing", "Store", "describe", "diff", "new_id", "observe", "open_directory", "read_now",
           "revert", "same", "state", "write_atomic"]
