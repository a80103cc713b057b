"""The C headers shipped in ``agentwarden.bpf``, read by Python.

The kernel program and the supervisor's fast path share their structs, sizes
and codes through these headers; Python reads the ``#define AW_* <int>``
constants from the same text instead of retyping them, and builds the simple
structs of fastpath.h as ctypes classes from it.
"""
from __future__ import annotations

import ctypes
import re
from functools import cache
from importlib import resources
from pathlib import Path

EVENT_HEADER = "agentwarden.h"   # kernel -> user event records
FAST_HEADER = "fastpath.h"       # what the supervisor shares with the program and its fast path
_DEFINE = re.compile(r"^#define\s+(AW_\w+)\s+(-?(?:0x[0-9a-fA-F]+|\d+))\s*(?:/\*.*\*/\s*)?$", re.M)
_INCLUDE = re.compile(r'^#include\s+"([\w.]+)"', re.M)
_FIELD = re.compile(r"(u32|s32|u64|s64|char)\s+(\w+)(?:\[(\w+)\])?")
_TYPES = {"u32": ctypes.c_uint32, "s32": ctypes.c_int32, "u64": ctypes.c_uint64, "s64": ctypes.c_int64,
          "char": ctypes.c_char}


def bpf_dir() -> Path:
    """Where the BPF C source and its headers are installed."""
    return Path(str(resources.files("agentwarden.bpf")))


@cache
def _text(header: str) -> str:
    return (bpf_dir() / header).read_text()


def header_constants(header: str = EVENT_HEADER) -> dict[str, int]:
    """The `#define AW_* <int>` constants of a header and of those it includes."""
    text = _text(header)
    constants: dict[str, int] = {}
    for included in _INCLUDE.findall(text):
        constants |= header_constants(included)
    return constants | {name: int(value, 0) for name, value in _DEFINE.findall(text)}


@cache
def header_struct(name: str, header: str = FAST_HEADER) -> type[ctypes.Structure]:
    """`struct name` of a header as a ctypes class, when every field is one
    u32/s32/u64/s64, or a char array sized by a number or an AW_* constant."""
    found = re.search(rf"^struct {name} \{{\n(.*?)^\}};", _text(header), re.M | re.S)
    if found is None:
        raise KeyError(f"no struct {name} in {header}")
    constants = header_constants(header)
    fields = []
    for declaration in re.sub(r"/\*.*?\*/", "", found.group(1), flags=re.S).split(";")[:-1]:
        field = _FIELD.fullmatch(declaration.strip())
        if field is None:
            raise ValueError(f"struct {name} in {header}: cannot read {declaration.strip()!r}")
        kind, field_name, length = field.groups()
        ctype = _TYPES[kind]
        if length is not None:
            ctype = ctype * (int(length) if length.isdigit() else constants[length])
        fields.append((field_name, ctype))
    return type(name, (ctypes.Structure,), {"_fields_": fields})
