"""The archive's format: segments, their hash chain, reading and verifying.

The daemon writes archives (``agentwarden.daemon.archive``); ``agentwarden log``
reads and verifies them. Both use this package, so it lives in the core.
"""
