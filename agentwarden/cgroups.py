"""cgroup v2: where it is mounted, which cgroups are agents, and their processes.

A cgroup is an agent when its directory carries the xattr
``trusted.agentwarden.agent=<name>``. Only root can set trusted.* xattrs, so an
agent cannot tag or untag itself. Its cgroup id (as BPF sees it) is the inode
number of the directory; its level is its depth below the cgroup2 root.

A cgroup is also an agent when it is a unit (service, scope) of the system
manager's agents slice (``agents.slice`` by default): auto-tagging, named after
the unit (see `unit_agent_name`). Only the slice at the root of PID 1's systemd
tree counts, and only when root owns it: a user's delegated subtree may contain
a directory called agents.slice, but cannot make its processes look like an
agent. An explicit xattr tag wins over the name from the unit.
"""
from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import AgentwardenError

TAG_XATTR = "trusted.agentwarden.agent"
# Set by `agentwarden run` on its session cgroup: the session id, and the
# instance whose daemon supervises it. Execs there must match what that
# daemon approved; a second instance on the host (tests, benches) leaves it be.
SESSION_XATTR = "trusted.agentwarden.session"
INSTANCE_XATTR = "trusted.agentwarden.instance"
# \Z, not $: "$" would also accept a name followed by a newline.
AGENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}\Z")
# Optional attribution of a tagged cgroup: who the agent acts for. `agentwarden
# run` sets them; by hand: setfattr -n trusted.agentwarden.task -v "fix #12" DIR.
# The probe reads them with the tag; the daemon puts them in the session record.
ATTRIBUTION_XATTRS = {"session": "trusted.agentwarden.session",
                      "task": "trusted.agentwarden.task",
                      "on_behalf_of": "trusted.agentwarden.on-behalf-of",
                      "user": "trusted.agentwarden.user"}
SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}\Z")
ATTRIBUTION_MAX = 256  # characters kept of a task, person or user


class CgroupError(AgentwardenError):
    pass


@dataclass(frozen=True)
class TaggedCgroup:
    cgroup_id: int
    agent: str
    path: Path
    level: int
    source: str = "xattr"  # or "slice": named after its unit in the agents slice
    # (name, value) pairs from ATTRIBUTION_XATTRS that are set and valid
    attribution: tuple[tuple[str, str], ...] = ()
    session: str | None = None     # the session xattr as set
    instance: str | None = None    # which agentwarden instance's `run` made the session


def unescape_mount_field(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def cgroup2_root(mountinfo: str = "/proc/self/mountinfo") -> Path:
    """The cgroup v2 mount point: /sys/fs/cgroup (pure v2) or .../unified (hybrid)."""
    try:
        # Mount points are raw bytes: one that is not UTF-8 must not stop the search.
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.readlines()
    except OSError as exc:
        raise CgroupError(f"cannot read {mountinfo}: {exc.strerror}") from None
    for line in lines:
        left, sep, right = line.partition(" - ")
        if sep and right.split()[0] == "cgroup2":
            return Path(unescape_mount_field(left.split()[4]))
    raise CgroupError(
        "cgroup v2 is not mounted; mount it with: "
        "mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified")


def validate_agent_name(name: str) -> str:
    if not AGENT_NAME.match(name):
        raise CgroupError(
            f"invalid agent name {name!r}: use 1-64 letters, digits, '_', '.', '@' or '-', "
            "starting with a letter or digit")
    return name


def resolve(cgroup: str | os.PathLike, root: Path | None = None, create: bool = False) -> Path:
    """A cgroup directory from an absolute path or one relative to the cgroup2 root."""
    root = root or cgroup2_root()
    given = Path(cgroup)
    path = given if given.is_absolute() else root / given
    path = Path(os.path.normpath(path))
    if path != root and root not in path.parents:
        raise CgroupError(f"{given} is not a cgroup: it is outside the cgroup v2 mount {root}")
    if create and not path.exists():
        try:
            path.mkdir(parents=True)
        except OSError as exc:
            raise CgroupError(f"cannot create cgroup {path}: {exc.strerror}") from None
    if not path.is_dir():
        raise CgroupError(f"{given} is not a cgroup: no such directory under {root}")
    if not (path / "cgroup.procs").exists():
        raise CgroupError(f"{given} is not a cgroup: {path} has no cgroup.procs")
    return path


def cgroup_id(path: Path) -> int:
    return os.stat(path).st_ino


def level(path: Path, root: Path) -> int:
    return len(path.relative_to(root).parts)


def read_tag(path: Path, name: str = TAG_XATTR) -> str | None:
    try:
        return os.getxattr(path, name).decode("utf-8", "replace")
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOENT, errno.ENOTSUP):
            return None
        raise


# Set by systemd (root) on the cgroup of a unit with Delegate=yes: the unit
# manages its own subtree. Such a unit of the agents slice is not itself an
# agent: `agentwarden run` in it makes the tagged session cgroup below it.
DELEGATE_XATTR = "trusted.delegate"


def is_delegated(path: Path) -> bool:
    try:
        return read_tag(path, DELEGATE_XATTR) == "1"
    except OSError:
        return False


def cgroup_of(pid: int | str = "self") -> str | None:
    """A process's cgroup v2 path relative to the mount ('/' for the root), from
    the "0::" line of /proc/PID/cgroup; None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        return None
    return None


def own_cgroup(root: Path, pid: int | str = "self") -> Path | None:
    """A process's cgroup v2 directory, or None."""
    relative = cgroup_of(pid)
    return None if relative is None else root / relative.lstrip("/")


def read_attribution(path: Path) -> tuple[tuple[str, str], ...]:
    """The optional attribution xattrs that are set: text without control
    characters, cut to ATTRIBUTION_MAX; a session id that is not a plain name
    is left out (the daemon then derives one)."""
    found = []
    for name, xattr in ATTRIBUTION_XATTRS.items():
        try:
            raw = os.getxattr(path, xattr)
        except OSError:
            continue  # not set, not supported, or the cgroup is gone
        value = "".join(c for c in raw.decode("utf-8", "replace") if c.isprintable())[:ATTRIBUTION_MAX]
        if value and (name != "session" or SESSION_ID.match(value)):
            found.append((name, value))
    return tuple(found)


def set_attribution(path: Path, **values: str | None) -> None:
    """Set (or, with None, remove) attribution xattrs: session, task, on_behalf_of, user."""
    for name, value in values.items():
        xattr = ATTRIBUTION_XATTRS[name]
        try:
            if value is None:
                try:
                    os.removexattr(path, xattr)
                except OSError as exc:
                    if exc.errno != errno.ENODATA:
                        raise
            else:
                if name == "session" and not SESSION_ID.match(value):
                    raise CgroupError(f"invalid session id {value!r}: use 1-128 letters, digits, "
                                      "'_', '.', ':', '@' or '-'")
                os.setxattr(path, xattr, value.encode())
        except OSError as exc:
            raise _xattr_error(f"set {xattr} on", path, exc) from None


def _xattr_error(action: str, path: Path, exc: OSError) -> CgroupError:
    if exc.errno == errno.EPERM:
        return CgroupError(f"cannot {action} {path}: trusted.* xattrs need root (run with sudo)")
    return CgroupError(f"cannot {action} {path}: {exc.strerror}")


def tag(path: Path, agent: str) -> None:
    validate_agent_name(agent)
    try:
        os.setxattr(path, TAG_XATTR, agent.encode())
    except OSError as exc:
        raise _xattr_error("tag", path, exc) from None


def untag(path: Path) -> bool:
    """Remove the tag; False when there was none."""
    try:
        os.removexattr(path, TAG_XATTR)
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return False
        raise _xattr_error("untag", path, exc) from None
    return True


# -- auto-tagging: units of the agents slice ---------------------------------------

UNIT_SUFFIXES = (".service", ".scope")


def slice_path(name: str) -> Path:
    """A slice's cgroup path below the manager's root: "a-b.slice" -> a.slice/a-b.slice."""
    stem = name[:-len(".slice")]
    parts = stem.split("-")
    return Path(*("-".join(parts[:i + 1]) + ".slice" for i in range(len(parts))))


def systemd_root(root: Path, proc1_cgroup: str = "/proc/1/cgroup") -> Path:
    """Where PID 1's systemd keeps its tree: the parent of its init.scope
    (a subdirectory when systemd runs in a container without a cgroup
    namespace), else the cgroup2 root."""
    try:
        with open(proc1_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return root
    for line in lines:
        if line.startswith("0::/") and line.endswith("/init.scope"):
            return root / line[len("0::/"):-len("/init.scope")].strip("/")
    return root


def _unescape_unit(name: str) -> str:
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), name)


def unit_agent_name(unit: str) -> str:
    """The agent a unit of the agents slice is: agent-coder.service,
    agent@coder.service and agent-coder.scope -> "coder"; any other unit -> its
    name without the suffix (run-r0d1.service -> "run-r0d1"). Characters an agent
    name cannot hold become "_", so such a unit is still watched."""
    name = unit
    for suffix in UNIT_SUFFIXES:
        if name.endswith(suffix):
            name = name[:-len(suffix)]
            break
    name = _unescape_unit(name)
    for prefix in ("agent-", "agent@"):
        if name.startswith(prefix) and len(name) > len(prefix):
            name = name[len(prefix):]
            break
    name = re.sub(r"[^A-Za-z0-9_.@-]", "_", name)
    name = re.sub(r"^[^A-Za-z0-9]+", "", name)[:64]
    return name or "unnamed"


def agents_slice_dir(root: Path, agents_slice: str) -> Path | None:
    """The agents slice's directory, when auto-tagging is on and root owns it."""
    if not agents_slice:
        return None
    path = systemd_root(root) / slice_path(agents_slice)
    try:
        st = os.stat(path)
    except OSError:
        return None
    return path if st.st_uid == 0 else None


def _slice_agent(path: Path, base: Path | None) -> str | None:
    """The agent name when path is the outermost unit below the agents slice."""
    if base is None or path == base or base not in path.parents:
        return None
    parts = path.relative_to(base).parts
    if parts[-1].endswith(".slice") or not all(p.endswith(".slice") for p in parts[:-1]):
        return None
    if is_delegated(path):
        return None   # its sessions are the agents (tagged by `agentwarden run`)
    return unit_agent_name(parts[-1])


def scan_tagged(root: Path, agents_slice: str = "agents.slice", scope: str = "") -> dict[int, TaggedCgroup]:
    """Every agent cgroup below (and including) root/scope, by cgroup id: tagged
    ones, and the units of the agents slice ("" turns those off)."""
    tagged: dict[int, TaggedCgroup] = {}
    base = agents_slice_dir(root, agents_slice)
    for dirpath, _dirs, _files in os.walk(root / scope if scope else root):
        try:
            found = tagged_at(Path(dirpath), root, base)
        except OSError:
            continue  # removed while we walked
        if found is not None:
            tagged[found.cgroup_id] = found
    return tagged


def tagged_at(path: Path, root: Path, base: Path | None) -> TaggedCgroup | None:
    """One directory as scan_tagged judges it (base: agents_slice_dir), or None
    when it is no agent cgroup. Raises OSError when it is gone."""
    agent, source = read_tag(path), "xattr"
    if agent is None or not AGENT_NAME.match(agent):
        agent, source = _slice_agent(path, base), "slice"
    if agent is None:
        return None
    cgid = cgroup_id(path)
    return TaggedCgroup(cgid, agent, path, level(path, root), source, read_attribution(path),
                        read_tag(path, SESSION_XATTR), read_tag(path, INSTANCE_XATTR))



def agent_cgroups(root: Path, agent: str | None, agents_slice: str = "agents.slice",
                  scope: str = "") -> list[TaggedCgroup]:
    """The agent cgroups (as scan_tagged finds them) of one agent, or of every
    agent when `agent` is None; outermost first."""
    return sorted((t for t in scan_tagged(root, agents_slice, scope).values() if agent is None or t.agent == agent),
                  key=lambda t: t.level)

def processes(path: Path) -> list[int]:
    """Process ids in the cgroup and all its descendants."""
    pids: list[int] = []
    for dirpath, _dirs, _files in os.walk(path):
        try:
            with open(os.path.join(dirpath, "cgroup.procs")) as f:
                pids.extend(int(line) for line in f if line.strip())
        except OSError:
            continue
    return pids


# Acting on a whole cgroup: each returns a short text of what was done (it goes
# into violation and admin records); failures say why instead of raising.

def kill_cgroup(path: Path) -> str:
    """cgroup.kill: every process in the cgroup and below it, atomically."""
    try:
        (path / "cgroup.kill").write_text("1")
    except OSError as exc:
        return f"could not kill cgroup {path}: {exc.strerror}"
    return f"killed every process in {path}"


def set_frozen(path: Path, frozen: bool) -> str:
    verb, done = ("freeze", "froze") if frozen else ("thaw", "thawed")
    try:
        (path / "cgroup.freeze").write_text("1" if frozen else "0")
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENODEV) and not path.is_dir():
            return f"{path} is gone (nothing to {verb})"
        if exc.errno == errno.ENOENT:
            return f"could not {verb} {path}: no cgroup.freeze (cgroup v2 freezer needs kernel 5.2)"
        return f"could not {verb} {path}: {exc.strerror}"
    return f"{done} {path}"
