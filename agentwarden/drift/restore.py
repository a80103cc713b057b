"""Putting a tracked file back as it was before a change: its bytes, mode and
owner, or its absence. Never through a symlink: the parent directory is opened
with openat2(RESOLVE_NO_SYMLINKS), the file itself is looked at without
following it and replaced by a rename inside that directory. Every refusal is
decided before anything is written (`check`, which the supervisor runs before
it lets an admin's process revert, and `revert` again)."""
from __future__ import annotations

import ctypes
import difflib
import errno
import hashlib
import os
import stat
import uuid

from agentwarden.paths import AT_FDCWD, RESOLVE_NO_SYMLINKS, open_how, openat2

from .store import DriftError, Store, observe, same

DIFF_LINES = 400             # lines of a diff `drift show` prints at most



def open_directory(path: str) -> int:
    """An O_PATH fd of directory path, resolved without following any symlink:
    openat2(RESOLVE_NO_SYMLINKS), or where a seccomp filter bars openat2
    (ENOSYS: systemd-nspawn's), one component at a time with O_NOFOLLOW."""
    how = open_how(os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, 0, RESOLVE_NO_SYMLINKS)
    fd = openat2(AT_FDCWD, os.fsencode(path), how)
    if fd >= 0:
        return fd
    code = ctypes.get_errno()
    if code == errno.ENOSYS:
        return _walk(path)
    if code == errno.ELOOP:
        raise DriftError(f"{path} passes through a symlink; not followed, nothing written")
    raise DriftError(f"cannot open {path}: {os.strerror(code)}; nothing written")


def _walk(path: str) -> int:
    flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open("/", flags)
    try:
        for name in [part for part in os.path.normpath(path).split("/") if part]:   # no .. left
            try:
                step = os.open(name, flags, dir_fd=fd)
            except NotADirectoryError:
                if stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise DriftError(f"{path} passes through a symlink; not followed, nothing written") from None
                raise DriftError(f"cannot open {path}: {os.strerror(errno.ENOTDIR)}; nothing written") from None
            except OSError as exc:
                raise DriftError(f"cannot open {path}: {exc.strerror}; nothing written") from None
            os.close(fd)
            fd = step
    except BaseException:
        os.close(fd)
        raise
    return fd


def content_of(store: Store, facts: dict, what: str) -> bytes:
    """The kept content of a file observation; DriftError when it was not kept."""
    if not facts.get("stored"):
        raise DriftError(f"only the hash of the {what} content was kept ({facts.get('size')} bytes, more "
                         "than drift_store_max): it cannot be restored")
    return store.get(facts["sha256"])


def refusal(path: str, now: dict) -> str | None:
    """Why what is at path now must not be replaced, or None."""
    if now["kind"] == "directory":
        return f"{path} is now a directory; nothing written"
    if now["kind"] == "symlink":
        return f"{path} is now a symlink (to {now.get('target', '?')}); not followed, nothing written"
    if now["kind"] not in ("file", "absent"):
        return f"{path} is now a {now['kind']} file; nothing written"
    return None


def check(store: Store, change: dict, force: bool) -> bytes | None:
    """Whether change's `before` may be put back at its path, without writing
    anything: its content (None: the file is to be absent). DriftError when
    the change was already answered, the file diverged (unless force), the
    path is now a directory or a symlink, a directory on the way is a symlink,
    or the store's copy is missing or corrupted."""
    path, before = change["path"], change["before"]
    if change.get("admin"):
        raise DriftError(f"{change['id']} was already {change['admin']['state']} by {change['admin']['name']}")
    now = observe(path)
    why = refusal(path, now)
    if why:
        raise DriftError(why)
    after = change.get("after")
    if after is not None and not same(after, now) and not force:
        raise DriftError(f"{path} diverged: it changed since {change['id']} (now "
                         f"{_short(now)}, the change left {_short(after)}); `drift revert {change['id']} "
                         "--force` puts the old content back anyway")
    if before["kind"] not in ("file", "absent"):
        raise DriftError(f"{path} was a {before['kind']} before {change['id']}: only files are restored")
    data = content_of(store, before, "before") if before["kind"] == "file" else None
    os.close(open_directory(os.path.dirname(path) or "/"))
    return data


def revert(store: Store, change: dict, force: bool) -> dict:
    """Restores change's `before` at its path, as this process (its
    credentials, its mount namespace); what the path is afterwards. Refused
    (DriftError, nothing written) for every reason `check` gives."""
    path, before = change["path"], change["before"]
    data = check(store, change, force)
    parent, name = os.path.split(path)
    directory = open_directory(parent or "/")
    try:
        try:
            st = os.stat(name, dir_fd=directory, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and (stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            link = {} if stat.S_ISDIR(st.st_mode) else {"target": os.readlink(name, dir_fd=directory)}
            raise DriftError(refusal(path, {"kind": "directory" if stat.S_ISDIR(st.st_mode) else "symlink",
                                            **link}))
        try:
            if data is None:
                if st is not None:
                    os.unlink(name, dir_fd=directory)
            else:
                _replace(directory, name, data, before)
        except OSError as exc:   # the path is as it was: the temporary file is gone
            raise DriftError(f"cannot write {path}: {exc.strerror}; nothing written") from None
    finally:
        os.close(directory)
    return observe(path, store)


def _replace(directory: int, name: str, data: bytes, facts: dict) -> None:
    temporary = f".{name}.aw-revert-{uuid.uuid4().hex[:8]}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=directory)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            # The mode while the file is still ours (no CAP_FOWNER needed), then
            # the owner; chown clears set-id bits, so those are set again after it.
            os.fchmod(fd, facts["mode"])
            os.fchown(fd, facts["uid"], facts["gid"])
            if facts["mode"] & (stat.S_ISUID | stat.S_ISGID):
                os.fchmod(fd, facts["mode"])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, name, src_dir_fd=directory, dst_dir_fd=directory)
    except BaseException:
        try:
            os.unlink(temporary, dir_fd=directory)
        except OSError:
            pass
        raise


def _short(facts: dict | None) -> str:
    if not facts:
        return "unknown"
    if facts["kind"] == "file":
        return f"sha256:{facts['sha256'][:12]}, {facts['size']} bytes, mode {facts['mode']:o}, " \
               f"{facts['uid']}:{facts['gid']}"
    return facts["kind"]


def describe(facts: dict | None) -> str:
    """One observation for people."""
    return _short(facts)


def read_now(path: str) -> dict[str, bytes]:
    """The content of path as it is now (not following a symlink), by its
    sha256, for a diff against what the store holds; {} when not a file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return {}
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read()
    finally:
        os.close(fd)
    return {hashlib.sha256(data).hexdigest(): data}


def diff(store: Store, path: str, before: dict | None, after: dict | None,
         known: dict[str, bytes] | None = None) -> list[str]:
    """A unified diff of two observations of path when both contents are kept
    (in the store, or in known: sha256 -> bytes) and are text; else their
    sizes and hashes (and modes, owners)."""
    def text(facts: dict | None) -> list[str] | None:
        if facts is None or facts["kind"] == "absent":
            return []
        if facts["kind"] != "file":
            return None
        if known and facts.get("sha256") in known:
            data = known[facts["sha256"]]
        elif not facts.get("stored"):
            return None
        else:
            try:
                data = store.get(facts["sha256"])
            except DriftError:
                return None
        if b"\0" in data:
            return None
        try:
            return data.decode("utf-8").splitlines(keepends=True)
        except UnicodeDecodeError:
            return None

    old, new = text(before), text(after)
    lines = [f"before: {_short(before)}", f"after:  {_short(after)}"]
    if old is None or new is None:
        return lines + ["(binary, or content not kept: sizes and hashes only)"]
    body = [line.rstrip("\n") for line in difflib.unified_diff(old, new, f"a{path}", f"b{path}")]
    if len(body) > DIFF_LINES:
        body = body[:DIFF_LINES] + [f"... ({len(body) - DIFF_LINES} more lines)"]
    return lines + (body or ["(content unchanged)"])
