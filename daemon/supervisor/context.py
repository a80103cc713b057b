"""What an approver sees of a hold (`agentwarden holds show`), read by the
supervisor while the held thread waits in its syscall (stopped there, so its
ancestry, command lines, cwd and environment stay put): the process's
ancestry up to the session's first process, the agent's own claim
(AGENTWARDEN_REASON in its environment), and the files the call names.

Files are looked up relative to the task's root (openat2 RESOLVE_IN_ROOT, no
magic links) as O_PATH handles, a last symlink not followed except for the
program an exec runs (exec follows it too); only regular files are then
opened, through the handle, never blocking.
Their content (hash, diff) is shown only when the task itself may read them
(the mode bits against its filesystem uid and groups): the supervisor is root,
and an approver must not learn through a hold what the agent could not read.
"""
from __future__ import annotations

import ctypes
import difflib
import errno
import hashlib
import os
import stat

from agentwarden import seccomp_notify as sn
from agentwarden.paths import RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS, open_how, openat2

from ..resolver import proc_link, proc_ppid

MAX_ANCESTRY = 32
MAX_COMMAND_TEXT = 4096        # characters of one process's command line shown
MAX_ENVIRON = 1 << 20          # bytes of /proc/PID/environ read
MAX_ENVIRONMENT_ITEMS = 4096   # variables of an exec's environment read
MAX_REASON = 1000              # characters of AGENTWARDEN_REASON kept
MAX_HASH_BYTES = 64 << 20      # larger files: size only
MAX_DIFF_INPUT = 1 << 20       # each side of a diff
MAX_DIFF_LINES = 200
MAX_DIFF_BYTES = 64 << 10
REASON_VARIABLE = b"AGENTWARDEN_REASON="



def _status_fields(pid: int) -> dict[str, list[str]]:
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: v.split() for k, _, v in (line.partition(":") for line in f)}
    except OSError:
        return {}


def thread_group(tid: int) -> int:
    """The process (thread group) of a thread; the tid itself when unknown."""
    tgid = _status_fields(tid).get("Tgid")
    return int(tgid[0]) if tgid else tid


def credentials(pid: int) -> tuple[int, set[int]] | None:
    """The filesystem uid and the gids (fs gid and supplementary) of a task."""
    fields = _status_fields(pid)
    try:
        return int(fields["Uid"][3]), {int(fields["Gid"][3]), *map(int, fields.get("Groups", []))}
    except (KeyError, IndexError, ValueError):
        return None


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def ancestry(tid: int, top: int) -> list[dict]:
    """The held thread's process and its ancestors, nearest first, up to and
    including `top` (the session's first process): pid, argv, cwd."""
    chain, pid = [], thread_group(tid)
    while pid > 1 and len(chain) < MAX_ANCESTRY:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                raw = f.read(MAX_COMMAND_TEXT + 1)
        except OSError:
            break
        argv = [_text(a) for a in raw[:MAX_COMMAND_TEXT].split(b"\0")]
        if argv and argv[-1] == "":
            argv.pop()
        chain.append({"pid": pid, "argv": argv, "argv_truncated": len(raw) > MAX_COMMAND_TEXT,
                      "cwd": proc_link(pid, "cwd")})
        if pid == top:
            break
        pid = proc_ppid(pid)
    return chain


def _reason_in(items) -> str | None:
    for item in items:
        if item.startswith(REASON_VARIABLE):
            return _text(item[len(REASON_VARIABLE):])[:MAX_REASON] or None
    return None


def agent_reason(n: sn.Notification, syscall: str) -> str | None:
    """AGENTWARDEN_REASON as the held process states it: for an exec, in the
    environment it hands the new program (`AGENTWARDEN_REASON=... git push`),
    else, or when absent there, in its own (/proc/PID/environ). The agent's
    own claim, never an authorisation."""
    if syscall in ("execve", "execveat"):
        try:
            with sn.TaskMemory(n.pid) as mem:
                pointers = mem.pointers(n.args[2 if syscall == "execve" else 3], MAX_ENVIRONMENT_ITEMS) or []
                found = _reason_in(item for item in map(mem.string, pointers) if item is not None)
        except OSError:
            found = None
        if found is not None:
            return found
    try:
        with open(f"/proc/{n.pid}/environ", "rb") as f:
            return _reason_in(f.read(MAX_ENVIRON).split(b"\0"))
    except OSError:
        return None


def _may_read(st: os.stat_result, creds: tuple[int, set[int]] | None) -> bool:
    if creds is None:
        return False
    uid, gids = creds
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IRUSR)
    if st.st_gid in gids:
        return bool(st.st_mode & stat.S_IRGRP)
    return bool(st.st_mode & stat.S_IROTH)


def _handle_in_root(pid: int, path: str, follow: bool) -> int:
    """An O_PATH fd of path as the task sees it: it opens nothing (no device
    acts on it) and, without follow, is the symbolic link itself."""
    root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        how = open_how(os.O_PATH | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW), 0,
                       RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
        fd = openat2(root, os.fsencode(path), how)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path)
        return fd
    finally:
        os.close(root)


def _hash(handle: int, keep: int) -> tuple[str | None, bytes | None]:
    """sha256 of the regular file behind an O_PATH handle (None when it grew
    past MAX_HASH_BYTES), and its content if it is at most keep bytes."""
    fd = os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        digest, content, total = hashlib.sha256(), [], 0
        while total <= MAX_HASH_BYTES and (chunk := os.read(fd, 1 << 20)):
            digest.update(chunk)
            total += len(chunk)
            if total <= keep:
                content.append(chunk)
    finally:
        os.close(fd)
    if total > MAX_HASH_BYTES:
        return None, None
    return digest.hexdigest(), b"".join(content) if total <= keep else None


def file_facts(pid: int, path: str | None, follow: bool, creds, keep: int = 0) -> tuple[dict, bytes | None]:
    """What a path names now, as the task sees it: type, size, sha256 (when the
    task may read it, up to MAX_HASH_BYTES); and its content when it is a
    readable regular file of at most `keep` bytes."""
    facts: dict = {"path": path}
    if path is None:
        facts["note"] = "the path could not be resolved"
        return facts, None
    try:
        handle = _handle_in_root(pid, path, follow)
    except OSError as exc:
        facts["note"] = "does not exist" if exc.errno == errno.ENOENT else f"cannot be opened: {exc.strerror}"
        return facts, None
    try:
        st = os.fstat(handle)
        if stat.S_ISLNK(st.st_mode):
            facts["note"] = f"a symbolic link to {os.readlink(f'/proc/{pid}/root{path}')}"
            return facts, None
        if follow:
            facts["real_path"] = proc_link(os.getpid(), f"fd/{handle}")
        if not stat.S_ISREG(st.st_mode):
            facts["note"] = "not a regular file"
            return facts, None
        facts["size"] = st.st_size
        if not _may_read(st, creds):
            facts["note"] = "content not shown: the agent may not read it"
            return facts, None
        digest, content = _hash(handle, keep) if st.st_size <= MAX_HASH_BYTES else (None, None)
        if digest is None:
            facts["note"] = f"not hashed: larger than {MAX_HASH_BYTES >> 20} MiB"
            return facts, None
        facts["sha256"] = digest
        return facts, content
    except OSError as exc:
        facts["note"] = f"cannot be read: {exc.strerror}"
        return facts, None
    finally:
        os.close(handle)


def _is_text(data: bytes) -> bool:
    if b"\0" in data[:8192]:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def unified_diff(old: bytes, new: bytes, old_name: str, new_name: str) -> dict:
    """old against new, bounded to MAX_DIFF_LINES lines and MAX_DIFF_BYTES."""
    if not (_is_text(old) and _is_text(new)):
        return {"binary": True}
    lines, size, truncated = [], 0, False
    for line in difflib.unified_diff(old.decode().splitlines(keepends=True),
                                     new.decode().splitlines(keepends=True), old_name, new_name):
        if len(lines) >= MAX_DIFF_LINES or size + len(line) > MAX_DIFF_BYTES:
            truncated = True
            break
        lines.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
        size += len(line)
    return {"binary": False, "text": "".join(lines), "truncated": truncated}


def call_context(pid: int, syscall: str, paths: list[str | None]) -> dict:
    """The files a held call names: for an exec the program it would run (its
    real path and sha256), for a file change each path's size and sha256, for
    a rename of one file over another the diff of the target's content against
    what replaces it."""
    creds = credentials(pid)
    if syscall in ("execve", "execveat"):
        facts, _ = file_facts(pid, paths[0], True, creds)
        return {"program": facts}
    if syscall.startswith("rename") and len(paths) == 2:
        source, source_data = file_facts(pid, paths[0], False, creds, MAX_DIFF_INPUT)
        target, target_data = file_facts(pid, paths[1], False, creds, MAX_DIFF_INPUT)
        out: dict = {"files": [source, target]}
        if target.get("note") == "does not exist":
            target_data = b""   # a new file: all of it is new
        if "sha256" in source and ("sha256" in target or target_data == b""):
            if source_data is None or target_data is None:
                out["diff"] = {"note": f"no diff: a file is larger than {MAX_DIFF_INPUT >> 20} MiB"}
            else:
                out["diff"] = unified_diff(target_data, source_data, paths[1],
                                           f"{paths[1]} (replaced by {paths[0]})")
        return out
    return {"files": [file_facts(pid, path, False, creds)[0] for path in paths]}
