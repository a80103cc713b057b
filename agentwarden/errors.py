"""Errors that reach a user as one clear line (the CLI prints them, no traceback),
and the exit codes they end with (the table is docs/cli.md)."""

EXIT_OK = 0
EXIT_PROBLEM = 1        # found a problem, or refused / denied
EXIT_USAGE = 2          # bad command line, option or setting
EXIT_UNREACHABLE = 3    # the daemon is not running, or does not answer
EXIT_PERMISSION = 4     # needs root or the admin group
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


class AgentwardenError(Exception):
    """A failure the user can act on; the message says what and how to fix it."""
    exit_code = EXIT_PROBLEM


class UsageProblem(AgentwardenError):
    """The command line (or a setting) asks for something that cannot be."""
    exit_code = EXIT_USAGE


class NoPermission(AgentwardenError):
    """This user may not do that; the message says who may."""
    exit_code = EXIT_PERMISSION


class NeedsRoot(NoPermission):
    def __init__(self, what: str):
        super().__init__(f"{what} needs root (CAP_BPF, CAP_SYS_ADMIN): run it with sudo")
