"""drift's content-addressed store: a file's bytes kept once under their
sha256 (objects/ab/cdef...), written atomically (a temporary file, fsync,
rename), 0600 in 0700 directories; a file larger than the store's limit is
kept by its hash alone. And what a path is now (`observe`), never following a
symlink at its last component."""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from ..errors import AgentwardenError

CHUNK = 1 << 16


class DriftError(AgentwardenError):
    """A drift request that cannot be done; said in one line, nothing written."""


def write_atomic(path: Path, data: bytes) -> None:
    """path holds data, whole or not at all: a temporary sibling, fsync, rename, 0600."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=False) as out:
            out.write(data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)


class Store:
    def __init__(self, root: Path, max_bytes: int):
        """root: the drift directory (settings.drift_dir); max_bytes: the
        largest content kept (setting drift_store_max)."""
        self.objects = root / "objects"
        self.max_bytes = max_bytes

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise DriftError(f"{digest!r} is not a sha256 the store could hold")
        return self.objects / digest[:2] / digest[2:]

    def put(self, data: bytes) -> str:
        """Keeps data (once per content); its sha256."""
        digest = hashlib.sha256(data).hexdigest()
        target = self.path(digest)
        if not target.exists():
            self.objects.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomic(target, data)
        return digest

    def get(self, digest: str) -> bytes:
        """The content kept under digest; DriftError when it is missing or
        its bytes no longer hash to it."""
        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError:
            raise DriftError(f"the store's copy sha256:{digest[:12]} is missing "
                             f"({self.path(digest)})") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise DriftError(f"the store's copy sha256:{digest[:12]} is corrupted: its content "
                             f"hashes to sha256:{actual[:12]} ({self.path(digest)})")
        return data

    def size(self) -> int:
        """Bytes the store's objects take."""
        return sum(f.stat().st_size for f in self.objects.rglob("*") if f.is_file()) \
            if self.objects.exists() else 0


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def observe(path: str, store: Store | None = None) -> dict:
    """What path is now, its last component not followed: {kind: file,
    absent, directory, symlink, other, unreadable}; a file's sha256, size,
    mode, uid, gid and whether its content is in the store (`stored`, kept
    when store is given and it is small enough); a symlink's target."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return {"kind": "absent"}
    except OSError as exc:
        return {"kind": "unreadable", "error": exc.strerror}
    facts = {"kind": _kind(st.st_mode), "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid}
    if facts["kind"] == "symlink":
        try:
            facts["target"] = os.readlink(path)
        except OSError:
            pass
    if facts["kind"] != "file":
        return facts
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return {**facts, "kind": "unreadable", "error": exc.strerror}
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):   # replaced between the lstat and the open
            return {"kind": _kind(st.st_mode), "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid,
                    "gid": st.st_gid}
        keep = store is not None and st.st_size <= store.max_bytes
        digest, kept, size = hashlib.sha256(), [], 0
        while chunk := os.read(fd, CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if keep:
                kept.append(chunk)
                keep = size <= store.max_bytes   # it grew while read: the hash alone
                if not keep:
                    kept = []
    finally:
        os.close(fd)
    facts.update(kind="file", mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                 size=size, sha256=digest.hexdigest(), stored=bool(keep))
    if keep:
        store.put(b"".join(kept))
    return facts


def same(a: dict | None, b: dict | None) -> bool:
    """Whether two observations describe the same file state (content, mode, owner)."""
    if a is None or b is None:
        return False
    keys = ("kind", "sha256", "mode", "uid", "gid", "target")
    return all(a.get(k) == b.get(k) for k in keys)
