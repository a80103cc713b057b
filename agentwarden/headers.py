"""The C headers shipped in ``agentwarden.bpf``, read by Python.

The kernel program and the supervisor's fast path share their structs, sizes
and codes through these headers; Python reads the ``#define AW_* <int>``
constants from the same text instead of retyping them.
"""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

EVENT_HEADER = "agentwarden.h"
_DEFINE = re.compile(r"^#define\s+(AW_\w+)\s+(-?(?:0x[0-9a-fA-F]+|\d+))\s*(?:/\*.*\*/\s*)?$", re.M)


def bpf_dir() -> Path:
    """Where the BPF C source and its headers are installed."""
    return Path(str(resources.files("agentwarden.bpf")))


def header_constants(header_text: str | None = None) -> dict[str, int]:
    """The `#define AW_* <int>` constants of the one event header."""
    if header_text is None:
        header_text = (bpf_dir() / EVENT_HEADER).read_text()
    return {name: int(value, 0) for name, value in _DEFINE.findall(header_text)}
