"""probe/btf.py: struct field offsets read from a BTF blob (here one built by
hand, as the kernel lays it out: header, types, strings)."""
from __future__ import annotations

import struct

import pytest

from probe.btf import BTF_MAGIC, KIND_INT, KIND_STRUCT, KIND_UNION, Btf, BtfError, fd_file_cflags


def _blob() -> bytes:
    strings = b"\0int\0file\0f_flags\0f_inode\0bits\0b\0"
    name = {s: strings.index(s.encode() + b"\0") for s in ("int", "file", "f_flags", "f_inode", "bits", "b")}

    def head(name_off, kind, vlen, size, kind_flag=0):
        return struct.pack("<III", name_off, kind_flag << 31 | kind << 24 | vlen, size)

    types = b"".join([
        head(name["int"], KIND_INT, 0, 4) + struct.pack("<I", 32),                  # 1: int
        head(name["file"], KIND_STRUCT, 2, 16)                                      # 2: struct file
        + struct.pack("<III", name["f_flags"], 1, 0)
        + struct.pack("<III", 0, 3, 64),                                            # an anonymous union at 8
        head(0, KIND_UNION, 1, 8) + struct.pack("<III", name["f_inode"], 1, 0),     # 3: the union
        head(name["bits"], KIND_STRUCT, 1, 4, kind_flag=1)
        + struct.pack("<III", name["b"], 1, 3 << 24 | 5),                           # 4: a bit field at bit 5
    ])
    header = struct.pack("<HBBIIIII", BTF_MAGIC, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + types + strings


def test_offsets_of_fields_and_of_fields_in_anonymous_unions():
    btf = Btf(_blob())
    assert btf.offset("file", "f_flags") == 0
    assert btf.offset("file", "f_inode") == 8


@pytest.mark.parametrize("struct_name,field,message", [
    ("file", "f_mode", "no field f_mode in struct file"),
    ("inode", "i_mode", "no struct inode"),
    ("bits", "b", "bits.b is a bit field"),
])
def test_what_is_not_there_is_an_error(struct_name, field, message):
    with pytest.raises(BtfError, match=message):
        Btf(_blob()).offset(struct_name, field)


def test_no_usable_btf_gives_no_flags_and_says_why(tmp_path):
    garbage = tmp_path / "vmlinux"
    garbage.write_bytes(b"\0" * 64)
    assert fd_file_cflags(garbage) == ([], f"{garbage}: not BTF (magic 0x0)")
    flags, why = fd_file_cflags(tmp_path / "missing")
    assert flags == [] and "No such file" in why
    small = tmp_path / "small"
    small.write_bytes(_blob())   # a kernel's BTF without the fields the program reads
    assert fd_file_cflags(small) == ([], f"{small}: no struct task_struct")


def test_a_blob_cut_short_gives_no_flags_and_says_why(tmp_path):
    cut = tmp_path / "cut"
    cut.write_bytes(_blob()[:40])
    flags, why = fd_file_cflags(cut)
    assert flags == [] and why.startswith(f"{cut}: ")
