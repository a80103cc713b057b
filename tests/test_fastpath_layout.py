"""bpf/fastpath.h, one definition on three sides: Python builds its structs
from the header's text (agentwarden.headers.header_struct) and reads its
constants; these tests hold that view against what gcc compiled into the
fast path (offsets and sizes its library exports) and what BCC compiled into
the BPF program (the maps' leaf types), as the decoder's layouts are held
against agentwarden.h (test_kernel_pipeline)."""
from __future__ import annotations

import ctypes
import re

import pytest

from agentwarden.daemon import fastpath
from agentwarden.headers import FAST_HEADER, bpf_dir, header_constants, header_struct

STRUCTS = re.findall(r"^struct (\w+) \{", (bpf_dir() / FAST_HEADER).read_text(), re.M)


def python_view(name: str) -> dict[str, tuple[int, int]]:
    """field -> (offset, size), and "" -> (0, the struct's size)."""
    cls = header_struct(name)
    return {"": (0, ctypes.sizeof(cls)),
            **{field: (getattr(cls, field).offset, getattr(cls, field).size) for field, _ in cls._fields_}}


@pytest.fixture(scope="module")
def lib():
    lib, why = fastpath.load()
    if lib is None:
        pytest.fail(f"the fast path library is part of the product (make setup builds it): {why}")
    return lib


def test_the_header_declares_the_shared_structs():
    assert set(STRUCTS) == {"aw_approved", "aw_exec_stash", "aw_approval_slot", "aw_fast_forward",
                            "aw_approved_interpreters"}


def test_python_view_matches_the_compiled_fast_path(lib):
    lib.aw_fast_layout.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_char_p),
                                   ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32)]
    compiled: dict[str, dict[str, tuple[int, int]]] = {}
    type_, field, offset, size = ctypes.c_char_p(), ctypes.c_char_p(), ctypes.c_uint32(), ctypes.c_uint32()
    i = 0
    while lib.aw_fast_layout(i, type_, field, offset, size) == 0:
        compiled.setdefault(type_.value.decode(), {})[field.value.decode()] = (offset.value, size.value)
        i += 1
    assert compiled == {name: python_view(name) for name in STRUCTS}


def test_counters_are_one_dense_list_the_library_keeps(lib):
    constants = header_constants(FAST_HEADER)
    indices = sorted(v for k, v in constants.items() if k.startswith("AW_FAST_COUNTER_"))
    assert indices == list(range(constants["AW_FAST_COUNTERS"])) == list(range(len(fastpath.COUNTERS)))
    assert lib.aw_fast_counter_count() == len(fastpath.COUNTERS) and lib.aw_fast_abi() == fastpath.ABI


@pytest.mark.kernel
def test_python_view_matches_the_bpf_program(kernel):
    from agentwarden.probe import loader
    bpf = loader.compile_and_attach()
    try:
        for map_name, struct_name in (("approved_exec", "aw_approved"), ("approval_slots", "aw_approval_slot"),
                                      ("exec_stash", "aw_exec_stash"),
                                      ("approved_interpreters", "aw_approved_interpreters")):
            leaf = bpf[map_name.encode()].Leaf
            compiled = {"": (0, ctypes.sizeof(leaf)),
                        **{f: (getattr(leaf, f).offset, getattr(leaf, f).size) for f, *_ in leaf._fields_}}
            assert compiled == python_view(struct_name), map_name
    finally:
        bpf.cleanup()
