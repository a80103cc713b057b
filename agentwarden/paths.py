"""Paths as the kernel's syscalls take them, and their lexical normal form.

Policy rules, the daemon's process model and the session supervisor all
compare normalised absolute paths; this is the one definition of that form.
"""
from __future__ import annotations

AT_FDCWD = -100          # dirfd meaning "relative to the working directory"
AT_EMPTY_PATH = 0x1000   # *at() flag: act on dirfd itself when the path is ""


def normalise(path: str) -> str:
    """Lexical normalisation of an absolute path; keeps no '//' prefix."""
    if path[:1] == "/" and "//" not in path and "/." not in path and (path == "/" or path[-1] != "/"):
        return path   # already normal (most are): no empty, '.' or '..' component
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
        else:
            parts.append(part)
    return "/" + "/".join(parts)
