"""Who a process is, from the kernel alone: its uid and, for root, the audit
login uid of its session (set at login, kept across sudo). Environment
variables such as SUDO_USER are never asked: any process can set them."""
from __future__ import annotations

import os
import pwd

NO_LOGIN_UID = 0xFFFFFFFF   # (uid_t)-1: the session has no audit login uid


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid:{uid}"


def login_uid(pid: int | str) -> int | None:
    """The audit login uid of a process, or None."""
    try:
        value = int(open(f"/proc/{pid}/loginuid").read())
    except (OSError, ValueError):
        return None
    return None if value == NO_LOGIN_UID else value


def describe(pid: int | str, uid: int) -> tuple[str, int | None]:
    """(name, login uid): "root (logged in as alice)" when root's session
    began as alice; the login uid only when it says more than uid."""
    login = login_uid(pid) if uid == 0 else None
    if login is not None and login != 0:
        return f"root (logged in as {user_name(login)})", login
    return user_name(uid), None


def invoking_user() -> str:
    """The person behind this process when it is not who it runs as: its
    session's login user when that differs from its own uid (sudo), else "".
    What `run` archives as on whose behalf when not told."""
    login = login_uid("self")
    return user_name(login) if login is not None and login != os.getuid() else ""
