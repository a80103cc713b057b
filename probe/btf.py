"""Offsets of kernel struct fields, from the running kernel's own BTF.

The BPF program reads no kernel struct through the (often other-version)
headers BCC compiles against. Where it must look at a kernel object -- the
file behind a descriptor, to skip the fd records user space has no use for
(bpf/agentwarden.bpf.c, "which fd records go out") -- it reads at the
offsets this module takes from /sys/kernel/btf/vmlinux, the description of
this very kernel, passed as cflags. No BTF, or a field not found: no offsets,
and the program records every descriptor change as before.
"""
from __future__ import annotations

import struct
from pathlib import Path

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")

BTF_MAGIC = 0xEB9F
KIND_INT, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 3, 4, 5, 6
KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_DECL_TAG, KIND_ENUM64 = 13, 14, 15, 17, 19
# Bytes that follow a type's 12-byte header: fixed, or per vlen entry.
_FIXED_TAIL = {KIND_INT: 4, KIND_ARRAY: 12, KIND_VAR: 4, KIND_DECL_TAG: 4}
_PER_ENTRY = {KIND_STRUCT: 12, KIND_UNION: 12, KIND_ENUM: 8, KIND_FUNC_PROTO: 8, KIND_DATASEC: 12,
              KIND_ENUM64: 12}

# (struct, field) -> the cflag the program reads its byte offset from.
FD_FILE_FIELDS = {
    ("task_struct", "files"): "AW_OFF_TASK_FILES",
    ("files_struct", "count"): "AW_OFF_FILES_COUNT",
    ("files_struct", "fdt"): "AW_OFF_FILES_FDT",
    ("fdtable", "max_fds"): "AW_OFF_FDT_MAX_FDS",
    ("fdtable", "fd"): "AW_OFF_FDT_FD",
    ("file", "f_inode"): "AW_OFF_FILE_INODE",
    ("file", "f_flags"): "AW_OFF_FILE_FLAGS",
    ("inode", "i_mode"): "AW_OFF_INODE_MODE",
    # the identity of an opened file, for folding repeated opens
    ("inode", "i_sb"): "AW_OFF_INODE_SB",
    ("inode", "i_ino"): "AW_OFF_INODE_INO",
    ("inode", "i_generation"): "AW_OFF_INODE_GENERATION",
}


class BtfError(ValueError):
    pass


class Btf:
    """The structs and unions of a BTF blob: name -> type id, and each one's
    members as (name offset, type id, bit offset)."""

    def __init__(self, data: bytes):
        if len(data) < 24:
            raise BtfError("BTF shorter than its header")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data)
        if magic != BTF_MAGIC:
            raise BtfError(f"not BTF (magic {magic:#x})")
        type_off, type_len, str_off, _str_len = struct.unpack_from("<IIII", data, 8)
        self.strings = data[hdr_len + str_off:]
        self.composites: dict[int, tuple[int, list[tuple[int, int, int]]]] = {}   # id -> (name off, members)
        self.by_name: dict[str, int] = {}
        pos, end, type_id = hdr_len + type_off, hdr_len + type_off + type_len, 1
        header = struct.Struct("<III")
        member = struct.Struct("<III")
        while pos < end:
            name_off, info, _size = header.unpack_from(data, pos)
            kind, vlen, kind_flag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
            pos += 12
            if kind in (KIND_STRUCT, KIND_UNION):
                members = []
                for i in range(vlen):
                    m_name, m_type, m_offset = member.unpack_from(data, pos + 12 * i)
                    members.append((m_name, m_type, m_offset & 0xFFFFFF if kind_flag else m_offset))
                self.composites[type_id] = (name_off, members)
                if name_off and kind == KIND_STRUCT:
                    self.by_name.setdefault(self.name(name_off), type_id)
            pos += _FIXED_TAIL.get(kind, 0) + _PER_ENTRY.get(kind, 0) * vlen
            type_id += 1

    def name(self, offset: int) -> str:
        return self.strings[offset:self.strings.index(b"\0", offset)].decode()

    def offset(self, struct_name: str, field: str) -> int:
        """Byte offset of field in struct struct_name (through anonymous
        structs and unions); BtfError when there is none."""
        type_id = self.by_name.get(struct_name)
        if type_id is None:
            raise BtfError(f"no struct {struct_name}")
        found = self._find(type_id, field)
        if found is None:
            raise BtfError(f"no field {field} in struct {struct_name}")
        if found % 8:
            raise BtfError(f"{struct_name}.{field} is a bit field")
        return found // 8

    def _find(self, type_id: int, field: str) -> int | None:
        for m_name, m_type, bits in self.composites[type_id][1]:
            if m_name and self.name(m_name) == field:
                return bits
            if not m_name and m_type in self.composites:
                inner = self._find(m_type, field)
                if inner is not None:
                    return bits + inner
        return None


def fd_file_cflags(path: Path = VMLINUX_BTF) -> tuple[list[str], str | None]:
    """The -D flags that let the program look at the file behind an fd, and
    None; or no flags and why not."""
    try:
        btf = Btf(path.read_bytes())
        return [f"-D{flag}={btf.offset(s, f)}" for (s, f), flag in FD_FILE_FIELDS.items()], None
    except (OSError, BtfError) as exc:
        return [], f"{path}: {exc}"
    except (struct.error, ValueError, KeyError) as exc:   # a blob cut short or corrupt
        return [], f"{path}: unreadable BTF ({exc})"
