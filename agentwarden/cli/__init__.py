"""The `agentwarden` command: the top layer. It parses, translates errors into
one line and an exit code, and starts the probe and the daemon; everything it
does is in the core (``agentwarden.*``)."""
from .commands import main

__all__ = ["main"]
