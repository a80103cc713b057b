"""The decision: a pure function from an exec, open, change or side door
record and the policy to a verdict (how it decides is in the package docstring)."""
from __future__ import annotations

import os

from ..wire import SEVERITY, text
from .glob import exec_subject, indirect_route, path_key
from .model import AgentPolicy, PolicySet, Rule, Verdict

# Which rule lists are consulted, in order, and the decision each gives.
EXEC_PRECEDENCE = (("exec.deny", "deny"), ("exec.hold", "hold"), ("exec.allow", "allow"))
FILE_PRECEDENCE = {
    "read": (("files.deny", "deny"), ("files.read-allow", "allow"), ("files.write-allow", "allow")),
    "write": (("files.deny", "deny"), ("files.write-allow", "allow")),
}


# The calls of `change` records; those with a second path, and those whose
# first path is not a file they change (a symlink's content, its target).
CHANGE_SYSCALLS = ("unlink", "unlinkat", "rmdir", "rename", "renameat", "renameat2", "truncate", "ftruncate",
                   "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "lchown", "fchown", "fchownat",
                   "link", "linkat", "symlink", "symlinkat", "mkdir", "mkdirat")
TWO_PATHS = ("rename", "renameat", "renameat2", "link", "linkat", "symlink", "symlinkat")
LINK_CONTENT = ("symlink", "symlinkat")
FD_CHANGES = ("ftruncate", "fchmod", "fchown")


def changed_paths(event: dict) -> list[tuple[str, str]]:
    """The paths a change record modifies: (the record's key of the resolved
    path, how a verdict names it). For an fd call (ftruncate, fchmod, fchown)
    resolved_path is the fd's path."""
    syscall = event["syscall"]
    if syscall in TWO_PATHS:
        paths = [("resolved_path2", "to")]
        return paths if syscall in LINK_CONTENT else [("resolved_path", "from"), *paths]
    return [("resolved_path", "of")]


def is_write(flags: int) -> bool:
    """Whether open flags modify the file: write access, create, truncate or append."""
    return (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & (os.O_CREAT | os.O_TRUNC | os.O_APPEND))


def _executable(event: dict) -> tuple[str | None, str | None]:
    """The path an exec is judged by (None when unresolved), and a note when it
    is not what the kernel ran."""
    ran = event.get("resolved_exec_path")
    if ran is not None or event.get("exec_path"):
        return (os.fsdecode(ran) if ran is not None else None), None
    asked = event.get("resolved_filename")
    return (os.fsdecode(asked) if asked is not None else None,
            "the kernel did not report what ran (the exec failed or was not seen): "
            "judged by the path asked for")


def _decide(agent: AgentPolicy, policy_hash: str, what: str, target: tuple[str, str] | None,
            precedence: tuple[tuple[str, str], ...], notes: list[str]) -> Verdict:
    """Apply one precedence list to a target, (path, subject); None when the path is unresolved."""
    def verdict(decision: str, rule: Rule | None, reason: str) -> Verdict:
        action = agent.on_violation if decision == "violation" else None
        return Verdict(decision, action, str(rule) if rule else None,
                       "; ".join([reason, *notes]), policy_hash, agent.mode)

    if target is None:
        return verdict("violation", None, f"{what}: the path could not be resolved, and an unresolved "
                                          f"path never matches an allow rule (on-violation {agent.on_violation})")
    for index, (kind, decision) in enumerate(precedence):
        rule = agent.rules[kind].first_match(*target)
        if rule:
            earlier = " or ".join(name for name, _ in precedence[:index])
            return verdict(decision, rule, f"{what} matches {kind}"
                                           + (f" and no {earlier} rule" if earlier else ", which beats every other rule"))
    return verdict("violation", None, f"{what} matches no allow rule, and whatever is not allowed "
                                      f"is a violation (on-violation {agent.on_violation})")


def _path_target(event: dict, key: str, shown_key: str) -> tuple[str, tuple[str, str] | None]:
    """How a path of an event is shown, and its target (None: unresolved)."""
    resolved = event.get(key)
    path = os.fsdecode(resolved) if resolved is not None else None
    shown = path if path is not None else repr(text(event.get(shown_key, "")))
    return shown, ((path, path_key(path)) if path is not None else None)


def _sidedoor(agent: AgentPolicy, policy_hash: str, event: dict, notes: list[str]) -> Verdict:
    door, syscall = event["door"], event["syscall"]
    reason = "; ".join([f"{syscall} is the side door {door!r}", *notes])
    source = agent.syscalls.get(door)
    if source:
        return Verdict("allow", None, f'syscalls.allow "{door}" at {source}', f"{reason}, which syscalls.allow "
                       "names", policy_hash, agent.mode)
    return Verdict("violation", agent.on_violation, None,
                   f"{reason}, which [agent.{agent.name}.syscalls] allow does not name, and whatever is not "
                   f"allowed is a violation (on-violation {agent.on_violation})", policy_hash, agent.mode)


def decide(event: dict, policy: PolicySet) -> Verdict:
    """The verdict on one exec, open, change or side door record as the daemon
    enriched it (``agent``; ``resolved_exec_path`` and ``resolved_filename``,
    or ``resolved_path`` and for a change ``resolved_path2``). Pure: no I/O,
    no state. Failed calls (ret < 0) are decided like successful ones -- an
    attempt is an attempt. The rules are in the package docstring."""
    kind = event["kind"]
    if kind not in ("exec", "open", "change", "sidedoor", "move"):
        raise ValueError(f"decide() takes exec, open, change, side door and move records, not {kind!r}")
    agent = policy.agents.get(event.get("agent"))
    if agent is None:
        return Verdict("violation", "alert", None, f"no policy for agent {event.get('agent')!r}: recorded only",
                       policy.hash, "monitor")
    if kind == "move":
        return _decide_move(agent, policy.hash, event)
    notes = []
    if event.get("ret", 0) < 0:
        notes.append(f"the call failed ({event.get('error')}), but an attempt is decided like a success")
    if kind == "exec":
        path, how = _executable(event)
        if how:
            notes.append(how)
        args = [os.fsdecode(arg) for arg in event["argv"][1:]]
        truncated = event["argv_truncated"]
        if truncated:
            notes.append("argv was cut short: deny and hold rules with argv patterns match on the "
                         "executable alone, allow rules with argv patterns do not match")
        route = indirect_route(path) if path is not None else None
        if route:
            notes.append(f"this is {route}: only an allow rule that names such a path allows it")
        shown = path if path is not None else repr(text(event.get("exec_path") or event.get("filename", "")))
        what = "exec of " + " ".join([shown, *args])
        target = (path, exec_subject(path, args, bool(route), truncated)) if path is not None else None
        return _decide(agent, policy.hash, what, target, EXEC_PRECEDENCE, notes)
    if kind == "sidedoor":
        return _sidedoor(agent, policy.hash, event, notes)
    if kind == "change":
        if event["syscall"] in FD_CHANGES and event.get("fd_opened_for_writing"):
            shown, _ = _path_target(event, "resolved_path", "path")
            return Verdict("allow", None, None, "; ".join([
                f"{event['syscall']} through a descriptor opened for writing: its open was judged as a "
                f"write of {shown}", *notes]), policy.hash, agent.mode)
        # A write of every path it changes; the most severe verdict stands
        # (the first of equals: the order of the call's arguments).
        verdicts = []
        for key, how in changed_paths(event):
            shown, target = _path_target(event, key, "path2" if key == "resolved_path2" else "path")
            verdicts.append(_decide(agent, policy.hash, f"{event['syscall']} {how} {shown}", target,
                                    FILE_PRECEDENCE["write"], notes))
        return max(verdicts, key=lambda v: SEVERITY[v.decision])
    access = "write" if is_write(event["flags"]) else "read"
    shown, target = _path_target(event, "resolved_path", "path")
    return _decide(agent, policy.hash, f"{access} of {shown}", target, FILE_PRECEDENCE[access], notes)


def _decide_move(agent: AgentPolicy, policy_hash: str, event: dict) -> Verdict:
    """Leaving the agent's cgroups is a violation whatever the rules say."""
    where = f"cgroup {text(event['dst_path'])}"
    if event.get("born_by_clone3"):   # clone3(CLONE_INTO_CGROUP): the kernel names it by id only
        where = f"cgroup id {event['dst_cgroup_id']} (born there by clone3 CLONE_INTO_CGROUP)"
    if not event["left"]:
        return Verdict("allow", None, None, f"move to {where}, one of the agent's cgroups",
                       policy_hash, agent.mode)
    return Verdict("violation", agent.on_violation, None,
                   f"move to {where}, out of the agent's cgroups: once an agent, always an agent "
                   f"(on-violation {agent.on_violation})", policy_hash, agent.mode)
