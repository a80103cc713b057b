"""Errors that reach a user as one clear line (the CLI prints them, no traceback)."""


class AgentwardenError(Exception):
    """A failure the user can act on; the message says what and how to fix it."""


class NeedsRoot(AgentwardenError):
    def __init__(self, what: str):
        super().__init__(f"{what} needs root (CAP_BPF, CAP_SYS_ADMIN): run it with sudo")
