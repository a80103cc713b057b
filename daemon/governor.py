"""Policy in the daemon: decide each exec, open, file change and side door,
record violations, act.

Every decided event gets a ``verdict`` field (decision, rule, policy hash).
An event that is not allowed also yields a ``violation`` record saying
what was attempted, which rule decided, what the policy asks for and what was
done. Acting is left out in monitor mode.

Symlinks: the resolver's paths are lexical. For a decision the daemon also
looks at where the path leads (``realpath``, when the record arrives), and the
more severe of the two verdicts stands: a link in an allowed directory does not
make its target allowed. A link swapped between the open and that look is not
seen: the in-kernel and seccomp paths are the boundary, this is the backstop.

Throughput: the look is one openat2(RESOLVE_NO_SYMLINKS) for a path with no
symlink, and once per path in a batch of records; the verdict on an open is
kept for repeated ones (same agent, paths, access and failure) until the
policy object changes, which every load does.
"""
from __future__ import annotations

import collections
import contextlib
import os
import stat
import time
from pathlib import Path
from typing import Callable

from agentwarden import cgroups, policy as policy_mod, render
from agentwarden import wire
from agentwarden.wire import text
from agentwarden.paths import AT_FDCWD, RESOLVE_NO_SYMLINKS, open_how, openat2

from . import enforce



# Change calls that follow a symlink in their last component (unless given
# AT_SYMLINK_NOFOLLOW); the others act on the link itself.
FOLLOWS_LAST = ("truncate", "chmod", "chown", "fchmodat", "fchmodat2", "fchownat")
AT_SYMLINK_NOFOLLOW = 0x100
# Verdicts on opens kept for repeated ones (see Governor._decide_open), about
# half a kilobyte each; when full the least recently used one goes (counted).
DECISION_CACHE_SIZE = 16384
# Looks kept per open that the kernel may fold repeats of (see Governor._note_real_paths).
LOOKS_KEPT = 3


def real_paths(record: dict, look: Callable[[str], str | None] | None = None) -> dict[str, tuple[str, str]]:
    """Where the decided paths really lead (symlinks followed, now), where
    that differs from the lexical one: the key decide() reads -> (the key the
    record gets, the real path). Not /proc/PID/fd/N: by the time the record
    arrives the process may have closed that fd and reused its number."""
    kind = record["kind"]
    if kind == "open":
        paths = [("resolved_path", record.get("resolved_path"), "real_path", True)]
    elif kind == "exec":
        paths = [("resolved_exec_path", record.get("resolved_exec_path") or record.get("resolved_filename"),
                  "real_path", True)]
    elif kind == "change":
        follows = record["syscall"] in FOLLOWS_LAST and not record["at_flags"] & AT_SYMLINK_NOFOLLOW
        paths = [(key, record.get(key), key.replace("resolved", "real"), follows)
                 for key, _ in policy_mod.changed_paths(record)]
    else:
        return {}
    look = look or kernel_real_path
    found = {}
    for key, lexical, real_key, follow in paths:
        if lexical is None:
            continue
        lexical = os.fsdecode(lexical)
        if follow:
            real = look(lexical)
        else:   # the call acts on the link itself: only the directories above it can lead elsewhere
            parent, name = os.path.split(lexical)
            real_parent = look(parent) if name else None
            real = os.path.join(real_parent, name) if real_parent else None
        if real and real != lexical:
            found[key] = (real_key, real)
    return found


_NO_SYMLINKS = open_how(os.O_PATH | os.O_CLOEXEC, 0, RESOLVE_NO_SYMLINKS)
_DIRECTORY_NO_SYMLINKS = open_how(os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, 0, RESOLVE_NO_SYMLINKS)
# Directories a batch keeps open (O_PATH) for the symlink look of their entries.
MAX_DIRECTORIES_PER_BATCH = 128


def _normal(path: str) -> bool:
    """Absolute, in normal form: no '..' the kernel would resolve physically."""
    return path.startswith("/") and "//" not in path and "/./" not in path and "/.." not in path \
        and not path.endswith("/.") and (not path.endswith("/") or path == "/")


def _without_symlinks(path: str) -> bool:
    """Whether the kernel reaches path through no symlink at all (openat2 with
    RESOLVE_NO_SYMLINKS): then the path is where it leads. Two syscalls where
    the /proc/self/fd look costs three and a d_path. Only for paths in normal
    form ('..' would be resolved physically)."""
    if not _normal(path):
        return False
    fd = openat2(AT_FDCWD, os.fsencode(path), _NO_SYMLINKS)
    if fd < 0:
        return False   # a symlink on the way (ELOOP), nothing there, or no openat2: look the long way
    os.close(fd)
    return True


def kernel_real_path(path: str) -> str | None:
    """The kernel's own resolution of path (an O_PATH open, which opens no
    device or FIFO, then its /proc/self/fd link): three syscalls where
    os.path.realpath makes one per component. None when nothing is there."""
    return path if _without_symlinks(path) else _real_path_through_links(path)


def _real_path_through_links(path: str) -> str | None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        # A dangling symlink still says where it points.
        return os.path.realpath(path) if os.path.lexists(path) else None
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    if not real.startswith("/") or real.endswith(" (deleted)"):
        return os.path.realpath(path)  # unlinked meanwhile, or another mount namespace's view
    return real


class BatchLooks:
    """Real paths looked up while one batch is decided: each path once, and a
    directory once — checked to have no symlink on its way (openat2 with
    RESOLVE_NO_SYMLINKS) and kept open (O_PATH) while the batch lasts — then
    each entry of it one lstat: not a symlink, the path is where it leads.
    What kernel_real_path says, in one syscall per path where it makes two."""

    def __init__(self):
        self.paths: dict[str, str | None] = {}
        self.directories: dict[str, int | None] = {}   # path -> O_PATH fd, None: not usable

    def real_path(self, path: str) -> str | None:
        if path not in self.paths:
            self.paths[path] = path if self._plain(path) else kernel_real_path(path)
        return self.paths[path]

    def _plain(self, path: str) -> bool:
        """Whether path is reached through no symlink (False: cannot tell)."""
        if not _normal(path) or path == "/":
            return False
        parent, _, name = path.rpartition("/")
        fd = self._directory(parent or "/")
        if fd is None:
            return False
        try:
            return not stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
        except (OSError, ValueError):
            return False   # nothing there (the long way says what a dangling link says)

    def _directory(self, path: str) -> int | None:
        if path in self.directories:
            return self.directories[path]
        if len(self.directories) >= MAX_DIRECTORIES_PER_BATCH:
            return None
        try:
            fd = openat2(AT_FDCWD, os.fsencode(path), _DIRECTORY_NO_SYMLINKS)
        except ValueError:
            fd = -1
        self.directories[path] = fd if fd >= 0 else None
        return self.directories[path]

    def close(self) -> None:
        for fd in self.directories.values():
            if fd is not None:
                os.close(fd)
        self.directories.clear()


class Governor:
    def __init__(self, policy_paths: list[Path],
                 agent_cgroup: Callable[[int], Path | None],
                 in_session: Callable[[int], bool] = lambda cgroup_id: False):
        self.policy_paths = policy_paths
        self.agent_cgroup = agent_cgroup
        self.in_session = in_session
        self.policy: policy_mod.PolicySet | None = None
        # (agent, path decided, access, failure, path shown) -> the verdict on
        # such an open, under the policy object it was made with
        self._open_verdicts: collections.OrderedDict[tuple, policy_mod.Verdict] = collections.OrderedDict()
        self._verdicts_policy: policy_mod.PolicySet | None = None
        self.cache_hits = 0
        self.cache_evictions = 0   # verdicts dropped for room (decided again when needed)
        self._looked: BatchLooks | None = None   # real paths looked up in this batch
        # _foldable_key -> the time of such an open's record (its path is where it
        # leads), or the latest few (time, real paths) (see _note_real_paths)
        self._first_looks: dict[int, int | tuple] = {}

    @contextlib.contextmanager
    def batch(self):
        """Decide a batch of records: a path's real path is looked up once in
        it. Every event of the batch happened before its first look, so one
        look serves them all as well as one each (the look is "now", when
        the records arrive, either way)."""
        self._looked = BatchLooks()
        try:
            yield
        finally:
            self._looked.close()
            self._looked = None

    @contextlib.contextmanager
    def unbatched(self):
        """Decide a record that is not of the batch being decided (the priority
        lane's): it may be newer than the batch's looks, so it looks itself."""
        looked, self._looked = self._looked, None
        try:
            yield
        finally:
            self._looked = looked

    def _real_path_now(self, path: str) -> str | None:
        looked = self._looked
        return kernel_real_path(path) if looked is None else looked.real_path(path)

    def load(self) -> policy_mod.PolicySet | None:
        """Load the policy files; None when there are none. A broken policy
        raises PolicyError and leaves the one in force untouched."""
        present = [p for p in self.policy_paths
                   if p.is_file() or (p.is_dir() and any(p.glob("*.toml")))]
        loaded = policy_mod.load_policy(present) if present else None
        self.policy = loaded
        return loaded

    def kernel_rules(self) -> list[policy_mod.KernelRule]:
        return policy_mod.kernel_deny_rules(self.policy) if self.policy else []

    def kernel_sidedoors(self) -> dict[str, list[str]]:
        return policy_mod.kernel_sidedoors(self.policy) if self.policy else {}

    def kernel_kill_agents(self) -> list[str]:
        return policy_mod.kernel_kill_agents(self.policy) if self.policy else []

    def acting_agents(self) -> list[str]:
        """The agents whose violations _act acts on (enforce mode, on-violation
        other than alert): only their exec records must reach the daemon at once."""
        if not self.policy:
            return []
        return sorted(agent.name for agent in self.policy.agents.values()
                      if agent.mode == "enforce" and agent.on_violation != "alert")

    def _decide_open(self, record: dict) -> policy_mod.Verdict:
        """decide() on an open, from the cache when an open with the same
        fields decide() reads was decided under this very policy object (a
        reload makes a new one: the cache goes with the old). An evicted
        verdict is decided again, the same way: eviction costs time, never a
        different decision."""
        cache = self._open_verdicts
        if self.policy is not self._verdicts_policy:
            cache = self._open_verdicts = collections.OrderedDict()
            self._verdicts_policy = self.policy
        resolved = record.get("resolved_path")
        ret = record.get("ret", 0)
        key = (record.get("agent"), resolved, policy_mod.is_write(record["flags"]),
               record.get("error") if ret < 0 else None,
               record.get("path", "") if resolved is None else None)
        verdict = cache.get(key)
        if verdict is None:
            verdict = cache[key] = policy_mod.decide(record, self.policy)
            if len(cache) > DECISION_CACHE_SIZE:
                cache.popitem(last=False)
                self.cache_evictions += 1
        else:
            cache.move_to_end(key)
            self.cache_hits += 1
        return verdict

    @staticmethod
    def _foldable_key(record: dict) -> int | None:
        """What an open the kernel may fold repeats of shares with the record
        of their count (bpf program, "repeated opens"), hashed (Python's str
        hash is keyed per process: no one can make two collide on purpose);
        None for any other open."""
        ret = record.get("ret", 0)
        if record["kind"] != "open" or not (ret < 0 or record.get("fd_unfollowed")):
            return None
        return hash((record.get("agent_cgroup_id"), record.get("tid"), record.get("path"), record.get("flags"), ret))

    def _note_real_paths(self, record: dict, real: dict) -> None:
        """Where an open's path led when its record came, kept for the record of
        its repeats, which comes up to fold_interval later: the look's time,
        and what it found where that is not the path itself. The latest
        LOOKS_KEPT per thread, path, flags and result (the repeats of one
        file may be counted while the path already leads to another); the
        common case, one look of a path that is where it leads, costs an int."""
        key = self._foldable_key(record) if "count" not in record else None
        if key is None:
            return
        looks = self._first_looks
        made = record.get("time", 0)
        before = looks.pop(key, None)   # back in at the end: the oldest go first
        if before is None and not real:
            looks[key] = made
        else:
            kept = () if before is None else (((before, {}),) if type(before) is int else before)
            looks[key] = (kept + ((made, real),))[-LOOKS_KEPT:]
        if len(looks) > DECISION_CACHE_SIZE:
            del looks[next(iter(looks))]

    def _folded_real_paths(self, record: dict) -> dict | None:
        """For a record of repeated opens, what the look said for the open whose
        repeats it counts: the latest of its thread, path, flags and result
        made before them. None: not kept (look now)."""
        if "count" not in record:
            return None
        seen = self._first_looks.get(self._foldable_key(record))
        if seen is None:
            return None
        for made, real in reversed(((seen, {}),) if type(seen) is int else seen):
            if made <= record["time"]:
                return real
        return None

    def cache_state(self) -> dict:
        return {"entries": len(self._open_verdicts), "size": DECISION_CACHE_SIZE,
                "hits": self.cache_hits, "evictions": self.cache_evictions}

    def _decide(self, record: dict) -> policy_mod.Verdict:
        decide = self._decide_open if record["kind"] == "open" else \
            lambda r: policy_mod.decide(r, self.policy)
        verdict = decide(record)
        real = self._folded_real_paths(record)
        if real is None:
            real = real_paths(record, self._real_path_now)
            self._note_real_paths(record, real)
        if not real:
            return verdict
        for real_key, path in real.values():
            record[real_key] = path
        via_target = decide({**record, **{key: path for key, (_, path) in real.items()}})
        if wire.SEVERITY[via_target.decision] > wire.SEVERITY[verdict.decision]:
            return policy_mod.Verdict(
                via_target.decision, via_target.action, via_target.rule,
                f"{via_target.reason}; the path leads there through a symlink",
                via_target.policy_hash, via_target.mode)
        return verdict

    def judge(self, record: dict) -> dict | None:
        """Decide one enriched exec/open/change/sidedoor record; returns a violation record or None."""
        if self.policy is None or record.get("agent") is None:
            return None
        verdict = self._decide(record)
        record["verdict"] = {"decision": verdict.decision, "rule": verdict.rule,
                             "policy_hash": verdict.policy_hash}
        if verdict.decision == "allow" and not record.get("killed_in_kernel"):
            return None
        if self.supervised(record):
            return None  # the session's seccomp supervisor already decided and recorded it
        agent_policy = self.policy.agents.get(record["agent"])
        wanted = verdict.action or (agent_policy.on_violation if agent_policy else "alert")
        taken = self._act(record, verdict, wanted)
        violation = {
            "kind": "violation", "time": time.time_ns(), "agent": record["agent"],
            "pid": record.get("moved_pid", record["pid"]), "comm": record["comm"], "event": record["kind"],
            "event_seq": record.get("seq"), "attempted": attempted(record),
            "decision": verdict.decision, "rule": record.get("kernel_rule") or verdict.rule,
            "reason": verdict.reason, "policy_hash": verdict.policy_hash, "mode": verdict.mode,
            "action": wanted, "action_taken": taken,
        }
        if "count" in record:   # repeated opens, folded in the kernel: the violation stands for as many
            violation["count"] = record["count"]
        return violation

    def supervised(self, record: dict) -> bool:
        """Execs, writing opens, renames, unlinks and truncates of `agentwarden
        run` sessions go through seccomp (see seccomp_notify.build_filter)."""
        if not self.in_session(record["agent_cgroup_id"]) or record.get("killed_in_kernel"):
            return False
        kind = record["kind"]
        if kind == "change":
            return record["syscall"] in SESSION_CHANGES
        if kind in ("sidedoor", "move"):
            return False
        if kind == "exec":
            # An interpreter the supervisor read from the file and approved
            # with the exec is its decision too; one it did not approve (a #!
            # line swapped since) was killed in the kernel, and is judged here.
            return not (record["syscall"] == "interpreter" and record.get("not_approved"))
        return policy_mod.is_write(record["flags"])

    def _act(self, record: dict, verdict: policy_mod.Verdict, wanted: str) -> str:
        if record.get("not_approved"):
            return "killed in the kernel: not what the session's supervisor approved"
        if record.get("killed_in_kernel"):
            done = f"killed in the kernel by {record.get('kernel_rule')}"
            if wanted != "kill-agent":
                return done
            cgroup = self.agent_cgroup(record["agent_cgroup_id"])
            return f"{done}; " + (cgroups.kill_cgroup(cgroup) if cgroup else "agent cgroup unknown")
        if verdict.mode != "enforce":
            return "none (monitor mode)"
        if wanted == "alert":
            return "none (alert)"
        if wanted == "kill":
            # A move's violator is the process moved (the mover itself, usually).
            return enforce.kill_process(record.get("moved_pid", record["pid"]))
        cgroup = self.agent_cgroup(record["agent_cgroup_id"])
        if cgroup is None:
            return f"none: the cgroup of agent {record['agent']!r} is unknown"
        if wanted == "kill-agent":
            return cgroups.kill_cgroup(cgroup)
        # freeze, and hold (which on this path cannot stop the call itself: the
        # agent waits, frozen, for an admin to thaw or kill it)
        return cgroups.set_frozen(cgroup, True)


# The changes a session's seccomp filter sends to the supervisor.
SESSION_CHANGES = ("rename", "renameat", "renameat2", "unlink", "unlinkat", "truncate")


def attempted(record: dict) -> str:
    kind = record["kind"]
    if kind == "move":
        if record.get("born_by_clone3"):
            return f"clone3 of pid {record['moved_pid']} into cgroup id {record['dst_cgroup_id']}"
        return f"move of pid {record['moved_pid']} to cgroup {text(record['dst_path'])}"
    if kind == "exec":
        return "exec " + " ".join(text(a) for a in record["argv"]) + \
            f" ({text(record.get('resolved_exec_path') or record.get('resolved_filename') or record['filename'])})"
    if kind == "change":
        return render.change(record)
    if kind == "sidedoor":
        return render.sidedoor(record)
    access = "write" if policy_mod.is_write(record["flags"]) else "read"
    return f"{access} {text(record.get('resolved_path') or record['path'])}"
