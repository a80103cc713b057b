"""Logs and alerts with fields: the systemd journal under systemd, plain
stderr otherwise.

One mechanism for everything agentwarden tells the journal: `setup_logging()`
gives the process's log lines python3-systemd's JournalHandler when its stderr
is the journal (systemd sets JOURNAL_STREAM to stderr's device:inode), and
`send()` is how holds and violations (daemon/notify.py) reach it with their
AGENTWARDEN_* fields (`fields()`), so that `journalctl AGENTWARDEN_AGENT=coder`
or `journalctl -o json` finds them. A log call adds fields the same way:
``log.warning("...", extra=journal.fields(agent="coder"))``.
"""
from __future__ import annotations

import logging
import os
import stat
from typing import Any, Mapping

JOURNAL_SOCKET = "/run/systemd/journal/socket"  # where libsystemd sends (fixed)
IDENTIFIER = "agentwarden"
PREFIX = "AGENTWARDEN_"

try:  # python3-systemd (Debian), a dependency of the package
    from systemd import journal as _journal
except ImportError:  # pragma: no cover - then every entry goes to stderr
    _journal = None


def fields(**values: Any) -> dict[str, str]:
    """AGENTWARDEN_<KEY> fields of the values that are set; lists joined with commas."""
    out = {}
    for key, value in values.items():
        if value in (None, "", []):
            continue
        out[PREFIX + key.upper()] = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return out


def available(socket_path: str = JOURNAL_SOCKET) -> bool:
    """Whether entries can be sent to a journal here."""
    if _journal is None:
        return False
    try:
        return stat.S_ISSOCK(os.stat(socket_path).st_mode)
    except OSError:
        return False


def send(message: str, priority: int, entry_fields: Mapping[str, str],
         identifier: str = IDENTIFIER) -> None:
    """One journal entry; OSError when the journal does not take it."""
    _journal.send(MESSAGE=message, PRIORITY=str(priority), SYSLOG_IDENTIFIER=identifier, **entry_fields)


def stderr_is_journal(environ: Mapping[str, str] | None = None) -> bool:
    """systemd connected this process's stderr to the journal (JOURNAL_STREAM names it)."""
    stream = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    try:
        st = os.fstat(2)
        return bool(inode) and (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):
        return False


def setup_logging(name: str, level: int = logging.INFO) -> str:
    """The process's log lines: to the journal with fields when stderr is the
    journal, else to stderr as "agentwarden-NAME: message". Returns which."""
    root = logging.getLogger()
    if root.handlers:   # configured already (as logging.basicConfig would leave it)
        return "as configured"
    if stderr_is_journal() and available():
        handler: logging.Handler = _journal.JournalHandler(SYSLOG_IDENTIFIER=f"{IDENTIFIER}-{name}")
        where = "journal"
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"{IDENTIFIER}-{name}: %(message)s"))
        where = "stderr"
    root.addHandler(handler)
    root.setLevel(level)
    return where
