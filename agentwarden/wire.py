"""The one wire schema: every message between agentwarden's processes, and
the records the archive stores.

- Records and ``batch`` messages (probe -> daemon -> tail subscribers).
- PUB topics: ``TOPIC_EVENTS`` (batches) and ``TOPIC_KERNEL_RULES`` (the
  policy's in-kernel deny rules, for the probe and the session supervisor).
- Control requests (CLI -> daemon, REQ/REP) and admin requests on the session
  supervisor's socket (CLI and `agentwarden run` -> supervisor): msgpack maps
  with a string ``cmd``.

A message is a msgpack map ``{"v": SCHEMA_VERSION, "type": ..., ...}``.
Probe -> daemon: ``batch`` messages carrying a list of records. Daemon -> tail
subscribers: ``batch`` messages of records the daemon has enriched. Records are
msgpack maps whose ``kind`` picks the required fields below; extra fields are
allowed (the daemon adds ``agent``, ``resolved_path``, ``seq``...).

Paths and argv items are ``str`` when they are valid UTF-8, else ``bytes``:
the archive keeps the exact bytes the agent used.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import msgpack

SCHEMA_VERSION = 1

PathLike = (str, bytes)
Int = (int,)
Bool = (bool,)
Str = (str,)
OptStr = (str, type(None))

_TASK = {
    "time": Int, "pid": Int, "tid": Int, "ppid": Int, "uid": Int, "gid": Int,
    "comm": PathLike, "cgroup_id": Int, "agent_cgroup_id": Int,
}

# kind -> required field -> accepted types. The one definition of a record.
RECORD_FIELDS: dict[str, dict[str, tuple]] = {
    "exec": {**_TASK, "syscall": Str, "filename": PathLike, "exec_path": PathLike,
             "argv": (list,), "argv_truncated": Bool, "dirfd": Int, "at_flags": Int,
             "ret": Int, "error": OptStr, "died_before_return": Bool,
             "filename_unreadable": Bool, "filename_truncated": Bool,
             "killed_in_kernel": Bool, "kernel_rule": OptStr,
             # a session exec that ran something else than the daemon approved: killed
             "not_approved": Bool},
    "open": {**_TASK, "syscall": Str, "path": PathLike, "dirfd": Int, "flags": Int,
             "mode": Int, "resolve": Int, "ret": Int, "error": OptStr,
             "path_unreadable": Bool, "path_truncated": Bool,
             "killed_in_kernel": Bool, "kernel_rule": OptStr},
    # Repeated opens folded in the kernel come as one open record with two more
    # fields (checked by validate_record): `count`, the opens it stands for,
    # made between its `time` and `last_time` (see docs/architecture.md).
    "chdir": {**_TASK, "syscall": Str, "path": PathLike, "dirfd": Int, "ret": Int,
              "error": OptStr, "path_unreadable": Bool, "path_truncated": Bool},
    "fork": {**_TASK, "child_pid": Int},
    # A descriptor made, copied, changed or closed (`syscall`: dup, dup2, dup3,
    # fcntl_dupfd, fcntl_dupfd_cloexec, fcntl_setfd, close, close_range,
    # pidfd_open, pidfd_getfd): `fd` the one acted on, `arg` the call's other
    # number (see struct aw_fd), `ret` the new fd; `cloexec` whether the new
    # fd is close-on-exec. Calls that failed are not recorded, except close and
    # close_range, recorded as they start (ret 0). Archived like every event, so
    # that the archive alone re-derives each resolved path (their cost: in the
    # real-tools test a third of the agent's archived bytes, mostly closes).
    # Closes, copies and F_SETFD of fds the resolver does not follow (read-only
    # regular files, devices, FIFOs, sockets) are counted in the kernel instead
    # (kernel_fd_skipped); the open or copy that made such an fd has an extra
    # `fd_unfollowed: True` (see docs/architecture.md).
    "fd": {**_TASK, "syscall": Str, "fd": Int, "arg": Int, "ret": Int, "error": OptStr,
           "cloexec": Bool},
    # A file changed without being opened (`syscall`: unlink, unlinkat, rmdir,
    # rename, renameat, renameat2, truncate, ftruncate, chmod, fchmod, fchmodat,
    # fchmodat2, chown, lchown, fchown, fchownat, link, linkat, symlink,
    # symlinkat, mkdir, mkdirat): `path` and `dirfd` the first path argument
    # (rename, link: the old name; symlink: the link's content), `path2` and
    # `dirfd2` the second (the new name; "" when the call has none); the fd
    # calls (ftruncate, fchmod, fchown) have no path, `dirfd` is their fd.
    # `mode` (chmod, mkdir), `new_uid`/`new_gid` (chown; -1 unchanged),
    # `length` (truncate), `at_flags` (the *at calls' flags). Judged by the
    # write rules, like a write-open of each path it changes.
    "change": {**_TASK, "syscall": Str, "path": PathLike, "dirfd": Int, "path2": PathLike,
               "dirfd2": Int, "mode": Int, "new_uid": Int, "new_gid": Int, "length": Int,
               "at_flags": Int, "ret": Int, "error": OptStr, "path_unreadable": Bool,
               "path_truncated": Bool, "path2_unreadable": Bool, "path2_truncated": Bool,
               "killed_in_kernel": Bool, "kernel_rule": OptStr},
    # A side door: a call that reaches files without the open syscalls, or
    # changes what paths mean (`door`, as the policy's [agent.NAME.syscalls]
    # names it: io_uring, open_by_handle, unshare, setns, mount, chroot,
    # pivot_root). `fd` its descriptor argument (AT_FDCWD if none), `arg` its
    # flags (io_uring_setup: entries), `path` its path argument ("" if none).
    "sidedoor": {**_TASK, "syscall": Str, "door": Str, "fd": Int, "arg": Int, "path": PathLike,
                 "ret": Int, "error": OptStr, "path_unreadable": Bool, "path_truncated": Bool,
                 "killed_in_kernel": Bool, "kernel_rule": OptStr},
    "exit": dict(_TASK),
    # An agent's process moved to another cgroup (cgroup_attach_task): the task
    # fields are the mover's (the moved process itself, usually), agent_cgroup_id
    # the moved process's agent cgroup. `left`: the destination is not its agent's
    # (an untagged cgroup, another agent's) -- a violation, and the process stays
    # its agent's wherever it goes. `dst_agent_cgroup_id`: the tagged cgroup that
    # holds the destination, else 0; `kill_pending`: moved by another task where
    # the policy kills, it dies at its next watched call.
    "move": {**_TASK, "moved_pid": Int, "dst_cgroup_id": Int, "dst_agent_cgroup_id": Int,
             "dst_path": PathLike, "dst_path_truncated": Bool, "left": Bool,
             "killed_in_kernel": Bool, "kernel_rule": OptStr, "kill_pending": Bool},
    # Records lost somewhere: `stage` says where, `count` how many.
    "gap": {"time": Int, "stage": Str, "count": Int, "detail": OptStr},
    # Periodic counters of one stage ("probe", "daemon").
    "health": {"time": Int, "stage": Str, "counters": (dict,)},
    # The tagged cgroups the probe watches: {str(cgroup id): {"agent", "path", "level",
    # "watched"}, plus the attribution xattrs that are set: "session", "task",
    # "on_behalf_of", "user" (see cgroups.ATTRIBUTION_XATTRS)}.
    "tags": {"time": Int, "agents": (dict,)},
    # An exec, open, change or side door the policy does not allow, and what was done about it.
    "violation": {"time": Int, "agent": Str, "pid": Int, "comm": PathLike, "event": Str,
                  "event_seq": (int, type(None)), "attempted": Str, "decision": Str,
                  "rule": OptStr, "reason": Str, "policy_hash": Str, "mode": Str,
                  "action": Str, "action_taken": Str},
    # A policy load: `status` loaded or refused (then the old one stays in force).
    "policy": {"time": Int, "status": Str, "policy_hash": OptStr, "files": (list,),
               "detail": OptStr},
    # A held syscall of an `agentwarden run` session and what became of it:
    # pending, approval (one of several needed), approved, denied, timed-out, abandoned.
    "hold": {"time": Int, "hold_id": Str, "state": Str, "session": Str, "agent": Str,
             "on_behalf_of": Str, "task": Str, "pid": Int, "action": Str, "rule": OptStr,
             "policy_hash": Str, "required": Int, "approvers": (list,), "reason": OptStr,
             "waited": (int, float),
             # each approval and the denial: {uid, name, reason, time[, login_uid]}, the uid
             # from the kernel (SO_PEERCRED); root counts once whatever sudo says
             "approvals": (list,), "denial": (dict, type(None))},
             # extra: `agent_says`, AGENTWARDEN_REASON from the held process's environment
             # (the agent's own claim), when it is set
    # A held call let through (`hold_id` approved it, or `remembered`: that hold's
    # remembered approval), sent by the supervisor before the call continues.
    # `event` is the kind of the kernel record the call makes (exec, open, or
    # null for rename/unlink/truncate), `paths` its path arguments as passed,
    # `flags` an open's; the daemon adds `hold_id` (or `remembered_from`) to that
    # record of thread `tid`.
    "release": {"time": Int, "hold_id": Str, "remembered": Bool, "session": Str, "agent": Str,
                "on_behalf_of": Str, "task": Str, "tid": Int, "syscall": Str, "event": OptStr,
                "paths": (list,), "flags": Int},
    # The seccomp supervision of an `agentwarden run` session starting (its listener
    # handed over), ending (no process left under the filter, or, with `detail`, its
    # listener gone with a stopped service: `holds_ended`) or `resumed` by a restarted
    # supervisor: extra `holds_resumed` (ids still pending), `redecided` and `failed`
    # (ids of calls the dead process had received: decided again, or failed with EPERM).
    "supervision": {"time": Int, "state": Str, "session": Str, "agent": Str, "on_behalf_of": Str,
                    "task": Str, "user": Str, "host": Str, "cgroup": Str, "pid": Int},
    # An admin's action from the CLI (freeze, thaw, kill), with who did it.
    "admin": {"time": Int, "action": Str, "agent": OptStr, "uid": Int, "user": Str,
              "result": Str},
    # Who an agent acts for: one per tagged cgroup (or `agentwarden run`), restated
    # when it changes, at each daemon start and at the start of each archive segment.
    # `status` active or ended; events and violations carry its `session` id.
    "session": {"time": Int, "session": Str, "status": Str, "agent": Str, "source": Str,
                "cgroup_id": Int, "cgroup": OptStr, "person": OptStr, "task": OptStr,
                "user": OptStr, "host": Str, "boot_id": Str, "policy_hash": OptStr},
    # The probe watching or not, from the daemon's watch guard: `state` watching,
    # stopped (asked to), lost (exited or silent: agents frozen) or restored.
    "watch": {"time": Int, "state": Str, "detail": Str, "probe_pid": (int, type(None))},
    # The archive about itself: `event` torn-tail-cut, damaged-tail, retention,
    # disk-full, disk-ok, key-changed; details in extra fields (see daemon/archive.py).
    "archive": {"time": Int, "event": Str, "detail": OptStr},
    # A change to a tracked file (the policy's files.track; agentwarden.drift) and
    # what became of it. `state`: changed (by an agent: `before` and `after` are
    # store.observe's facts, the content kept in the drift store by its sha256),
    # expired (its approval's time ran out: reported until an admin acts),
    # reverted and accepted (an admin's answer: `admin` = {uid, name, ...} from
    # SO_PEERCRED), baseline (an admin recorded the file as it is). `source`:
    # session (captured by the supervisor before the call went through) or
    # outside (after the fact, from the kernel's records; before = the baseline).
    # `hold_id`, `approvers` and `reason` when a hold let it through, `expires`
    # (ns) when its approval has a limit.
    "drift": {"time": Int, "change_id": Str, "state": Str, "path": PathLike, "agent": OptStr,
              "session": OptStr, "person": OptStr, "task": OptStr, "syscalls": (list,),
              "hold_id": OptStr, "approvers": (list,), "reason": OptStr, "policy_hash": OptStr,
              "source": Str, "before": (dict, type(None)), "after": (dict, type(None)),
              "expires": (int, type(None)), "admin": (dict, type(None))},
    # A fleet decision (agentwarden/fleet): `event` refused (not signed by a key in
    # fleet_admin_keys, a bad signature, another host's, too old, no such pending
    # hold) or accepted; extra fields `hold_id`, `signer` (the key's fingerprint).
    "fleet": {"time": Int, "event": Str, "detail": Str},
}

# Records of what a task did, as the probe sends them; the daemon resolves
# their paths and decides the ones in DECIDED_KINDS.
EVENT_KINDS = ("exec", "open", "chdir", "fork", "exit", "fd", "change", "sidedoor", "move")
DECIDED_KINDS = ("exec", "open", "change", "sidedoor", "move")
# What an in-kernel deny rule applies to: "open" covers the paths of changes too.
KERNEL_RULE_APPLIES = ("exec", "open")

# A policy's decisions, least severe first; where two verdicts apply, the more
# severe one stands.
DECISIONS = ("allow", "hold", "violation", "deny")
SEVERITY = {decision: rank for rank, decision in enumerate(DECISIONS)}

TOPIC_EVENTS = b"events"
TOPIC_KERNEL_RULES = b"kernel-rules"

MESSAGE_TYPES = ("batch",)
# Bounds that keep a hostile or broken sender from making us allocate wildly.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_RECORDS_PER_BATCH = 100_000
MAX_CONTROL_BYTES = 1 << 20
MAX_ADMIN_REQUEST_BYTES = 64 * 1024   # one datagram on the supervisor's socket
MAX_ADMIN_REPLY_BYTES = 1 << 20
# The supervisor's admin socket: `launch` gives the session launcher its filter
# and instance, `register` hands over a session's listener fd (both root's, on
# one connection); the rest are admins' requests (`show`: one pending hold with its context).
ADMIN_COMMANDS = ("launch", "register", "holds", "show", "approve", "deny",
                  "decide")   # a signed fleet decision, forwarded by the daemon
# drift (agentwarden.drift): an admin reverts or accepts a change, or records
# files as they are; the supervisor does it, so who did is the kernel's word.
# A revert is two requests: drift-revert (checked, a token granted), then the
# admin's process writes and says drift-reverted (token; error if it did not).
DRIFT_COMMANDS = ("drift-revert", "drift-accept", "drift-baseline", "drift-reverted")


class WireError(ValueError):
    """A message that does not follow the schema; it is counted and dropped."""


@dataclass
class Batch:
    source: str
    seq: int
    records: list[dict[str, Any]]


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def encode_batch(source: str, seq: int, records: list[dict[str, Any]]) -> bytes:
    return pack({"v": SCHEMA_VERSION, "type": "batch", "source": source, "seq": seq,
                 "records": records})


def encode_packed_batch(source: str, seq: int, packed: list[bytes]) -> bytes:
    """encode_batch's very bytes, from records each already packed as pack() would."""
    packer = msgpack.Packer(use_bin_type=True)
    head = [packer.pack_map_header(5)]
    for item in ("v", SCHEMA_VERSION, "type", "batch", "source", source, "seq", seq, "records"):
        head.append(packer.pack(item))
    head.append(packer.pack_array_header(len(packed)))
    return b"".join(head) + b"".join(packed)


def pack_with_last(packed_map: bytes, key: str, value: Any) -> bytes:
    """pack() of a map, from pack() of it without key, with key added last."""
    first = packed_map[0]
    if 0x80 <= first <= 0x8F:
        count, start = first & 0x0F, 1
    elif first == 0xDE:
        count, start = int.from_bytes(packed_map[1:3], "big"), 3
    elif first == 0xDF:
        count, start = int.from_bytes(packed_map[1:5], "big"), 5
    else:
        raise ValueError("not a packed map")
    packer = msgpack.Packer(use_bin_type=True)
    return packer.pack_map_header(count + 1) + packed_map[start:] + packer.pack(key) + packer.pack(value)


def validate_record(record: Any) -> dict[str, Any]:
    if type(record) is dict:
        kind = record.get("kind")
        fast = _FAST_CHECKS.get(kind) if type(kind) is str else None
        if fast is not None:
            getter, valid = fast
            try:
                signature = tuple(map(type, getter(record)))
            except KeyError:
                signature = None
            # Validity depends only on the fields' types: a signature seen valid once is valid.
            if signature in valid and (kind != "exec" or all(type(a) in PathLike for a in record["argv"])):
                if kind == "open" and "count" in record:
                    _validate_count(record)
                return record
    _validate_slowly(record)
    if record["kind"] == "open" and "count" in record:
        _validate_count(record)
    getter, valid = _FAST_CHECKS[record["kind"]]
    if type(record) is dict and len(valid) < MAX_SIGNATURES:
        valid.add(tuple(map(type, getter(record))))
    return record


def _validate_count(record: dict) -> None:
    """The fields of a record of repeated opens."""
    count, last = record["count"], record.get("last_time")
    if type(count) is not int or count < 1 or type(last) is not int:
        raise WireError(f"open record has a malformed count ({count!r}) or last_time ({last!r})")


def _validate_slowly(record: Any) -> None:
    """The schema check field by field, with the error that names what is wrong."""
    if not isinstance(record, dict):
        raise WireError(f"record is {type(record).__name__}, not a map")
    kind = record.get("kind")
    fields = RECORD_FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise WireError(f"unknown record kind {kind!r}")
    for name, types in fields.items():
        value = record.get(name, _MISSING)
        if value is _MISSING:
            raise WireError(f"{kind} record lacks field {name!r}")
        # bool is an int subclass; an int field must not accept True.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise WireError(f"{kind} record field {name!r} has type {type(value).__name__}")
    if kind == "exec" and not all(isinstance(a, PathLike) for a in record["argv"]):
        raise WireError("exec record field 'argv' has an item that is not str or bytes")


# kind -> (getter of "kind" and its fields, the tuples of their types found valid):
# records on the wire come from msgpack, whose few types make few signatures.
_FAST_CHECKS: dict[str, tuple[Any, set]] = {
    kind: (operator.itemgetter("kind", *fields), set()) for kind, fields in RECORD_FIELDS.items()}
MAX_SIGNATURES = 256   # per kind; past it the slow check runs (odd input must not grow memory)


_MISSING = object()


def decode_batch(raw: bytes) -> Batch:
    """Parse and validate one message; raise WireError on anything malformed."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise WireError(f"message of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        msg = msgpack.unpackb(raw, raw=False, strict_map_key=False,
                              max_array_len=MAX_RECORDS_PER_BATCH)
    except Exception as exc:  # msgpack raises several unrelated types
        raise WireError(f"not msgpack: {exc.__class__.__name__}: {exc}") from None
    if not isinstance(msg, dict):
        raise WireError("message is not a map")
    # type(): True == 1 and 1.0 == 1, neither is a schema version.
    if type(msg.get("v")) is not int or msg["v"] != SCHEMA_VERSION:
        raise WireError(f"schema version {msg.get('v')!r}, expected {SCHEMA_VERSION}")
    if msg.get("type") not in MESSAGE_TYPES:
        raise WireError(f"unknown message type {msg.get('type')!r}")
    source, seq, records = msg.get("source"), msg.get("seq"), msg.get("records")
    if not isinstance(source, str) or not isinstance(seq, int) or isinstance(seq, bool):
        raise WireError("batch lacks a source name or sequence number")
    if not isinstance(records, list):
        raise WireError("batch records is not a list")
    for record in records:
        validate_record(record)
    return Batch(source, seq, records)


def text(value: str | bytes) -> str:
    """A path or argv item for display: bytes that are not UTF-8 shown escaped."""
    return value if isinstance(value, str) else value.decode("utf-8", "backslashreplace")


def from_c(raw: bytes) -> str | bytes:
    """A C string from the kernel, as str when it is UTF-8, else the bytes."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def decode_control(raw: bytes) -> dict[str, Any]:
    """A control request: a map with a string ``cmd``."""
    if len(raw) > MAX_CONTROL_BYTES:
        raise WireError(f"control request of {len(raw)} bytes exceeds {MAX_CONTROL_BYTES}")
    try:
        msg = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as exc:
        raise WireError(f"control request is not msgpack: {exc.__class__.__name__}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("cmd"), str):
        raise WireError("control request must be a map with a string 'cmd'")
    return msg


def encode_control(cmd: str, **args: Any) -> bytes:
    return pack({"cmd": cmd, **args})


def decode_reply(raw: bytes) -> dict[str, Any]:
    """A reply of the daemon or the supervisor: a map."""
    try:
        reply = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as exc:
        raise WireError(f"reply is not msgpack: {exc.__class__.__name__}") from None
    if not isinstance(reply, dict):
        raise WireError("reply is not a map")
    return reply


def decode_admin_request(raw: bytes) -> dict[str, Any]:
    """A request on the supervisor's socket: a control request of at most
    MAX_ADMIN_REQUEST_BYTES (the socket reads no more)."""
    if len(raw) > MAX_ADMIN_REQUEST_BYTES:
        raise WireError(f"request of {len(raw)} bytes exceeds {MAX_ADMIN_REQUEST_BYTES}")
    return decode_control(raw)


# The probe's watch socket (probe/watch_now.py): `run` has its new session
# cgroup watched at once; the supervisor asks how a cgroup is watched.
PROBE_COMMANDS = {"watch": ("cgroup",), "tag": ("cgroup_id",), "agent": ("agent",)}


def decode_probe_request(raw: bytes) -> dict[str, Any]:
    """A request on the probe's watch socket: one of PROBE_COMMANDS with its field."""
    msg = decode_admin_request(raw)
    fields = PROBE_COMMANDS.get(msg["cmd"])
    if fields is None:
        raise WireError(f"unknown probe command {msg['cmd']!r}")
    missing = [f for f in fields if f not in msg]
    if missing:
        raise WireError(f"{msg['cmd']} needs {', '.join(missing)}")
    return msg


def encode_kernel_rules(policy_hash: str | None, rules: list[dict[str, Any]],
                        sidedoors: dict[str, list[str]], kill_on_leave: list[str] = (),
                        exec_prompt: list[str] | None = None) -> bytes:
    """The daemon's in-kernel deny rules; each rule a map of agent, path,
    exact, applies ("exec" or "open") and rule (its text). sidedoors: agent ->
    the side doors its policy allows, for the agents the kernel kills at any
    other (enforcing, on-violation kill or kill-agent). kill_on_leave: the
    agents whose processes the kernel kills when they leave their cgroups.
    exec_prompt: the agents whose exec violations the daemon acts on (their
    exec records wake the probe at once; a message without it: every agent's)."""
    message = {"v": SCHEMA_VERSION, "type": "kernel-rules", "policy_hash": policy_hash,
               "rules": rules, "sidedoors": sidedoors, "kill_on_leave": list(kill_on_leave)}
    if exec_prompt is not None:
        message["exec_prompt"] = list(exec_prompt)
    return pack(message)


_KERNEL_RULE_FIELDS = {"agent": Str, "path": Str, "exact": Bool, "applies": Str, "rule": Str}


def decode_kernel_rules(raw: bytes) -> dict[str, Any]:
    """Parse and validate a kernel-rules message; raise WireError otherwise."""
    try:
        msg = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as exc:
        raise WireError(f"kernel rules are not msgpack: {exc.__class__.__name__}") from None
    if not isinstance(msg, dict) or msg.get("type") != "kernel-rules":
        raise WireError("not a kernel-rules message")
    if not isinstance(msg.get("policy_hash"), OptStr):
        raise WireError("kernel rules: policy_hash is not a string")
    rules = msg.get("rules")
    if not isinstance(rules, list):
        raise WireError("kernel rules: rules is not a list")
    for rule in rules:
        if not isinstance(rule, dict) or any(not isinstance(rule.get(k), t)
                                             for k, t in _KERNEL_RULE_FIELDS.items()):
            raise WireError(f"kernel rules: malformed rule {rule!r}")
        if rule["applies"] not in KERNEL_RULE_APPLIES:
            raise WireError(f"kernel rules: a rule applies to {rule['applies']!r}")
    sidedoors = msg.setdefault("sidedoors", {})
    if not isinstance(sidedoors, dict) or any(
            not isinstance(agent, str) or not isinstance(doors, list)
            or not all(isinstance(door, str) for door in doors) for agent, doors in sidedoors.items()):
        raise WireError("kernel rules: sidedoors is not a map of agent -> list of names")
    leave = msg.setdefault("kill_on_leave", [])
    if not isinstance(leave, list) or not all(isinstance(a, str) for a in leave):
        raise WireError("kernel rules: kill_on_leave is not a list of agent names")
    prompt = msg.get("exec_prompt", [])
    if not isinstance(prompt, list) or not all(isinstance(a, str) for a in prompt):
        raise WireError("kernel rules: exec_prompt is not a list of agent names")
    return msg


# The priority lane (probe/priority.py -> daemon/priority.py): `batch`
# messages of this source carrying copies of the `vital` ring's exec records,
# sent as they are drained, ahead of the in-order stream that also carries them.
PRIORITY_SOURCE = "probe-priority"
