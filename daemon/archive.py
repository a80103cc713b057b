"""The msgpack archive: append-only segment files of wire records.

Each record gets a sequence number ``seq``, strictly increasing across
segments and restarts. Segments rotate by size. A torn tail (a crash in the
middle of a write) is skipped by readers and cut by the writer at start, and the
cut is recorded. The archive directory is root's alone (0700).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterator

import msgpack

from agentwarden.wire import pack

SEGMENT_PREFIX = "segment-"
SEGMENT_SUFFIX = ".msgpack"
SEGMENT_BYTES = 64 * 1024 * 1024


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"{SEGMENT_PREFIX}*{SEGMENT_SUFFIX}"))


def _read_segment(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Records of one segment and the byte offset where the intact part ends."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    records, good_end = [], 0
    with open(path, "rb") as f:
        unpacker.feed(f.read())
    while True:
        try:
            record = unpacker.unpack()
        except msgpack.OutOfData:
            break
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            break
        records.append(record)
        good_end = unpacker.tell()
    return records, good_end


def read_records(directory: Path) -> Iterator[dict[str, Any]]:
    """Every intact record, oldest first."""
    for path in segments(directory):
        records, _ = _read_segment(path)
        yield from records


class ArchiveWriter:
    def __init__(self, directory: Path, segment_bytes: int = SEGMENT_BYTES):
        self.directory = directory
        self.segment_bytes = segment_bytes
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        self.seq = 0
        self.pending: list[bytes] = []
        self.file = None
        self.size = 0
        self._recover()

    def _recover(self) -> None:
        existing = segments(self.directory)
        if not existing:
            self._open_new()
            return
        last = existing[-1]
        records, good_end = _read_segment(last)
        for record in reversed(records):
            if isinstance(record.get("seq"), int):
                self.seq = record["seq"] + 1
                break
        self.file = open(last, "ab")
        self.size = good_end
        torn = os.path.getsize(last) - good_end
        if torn:
            self.file.truncate(good_end)
            self.append({"kind": "gap", "time": time.time_ns(), "stage": "archive",
                         "count": 1, "detail": f"cut a torn tail of {torn} bytes from {last.name}"})

    def _open_new(self) -> None:
        if self.file:
            self.file.close()
        name = f"{SEGMENT_PREFIX}{time.time_ns():020d}-{self.seq:012d}{SEGMENT_SUFFIX}"
        fd = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.file = os.fdopen(fd, "ab")
        self.size = 0

    def append(self, record: dict[str, Any]) -> int:
        record["seq"] = self.seq
        self.seq += 1
        self.pending.append(pack(record))
        return record["seq"]

    def flush(self) -> None:
        if not self.pending:
            return
        data = b"".join(self.pending)
        self.pending = []
        if self.size and self.size + len(data) > self.segment_bytes:
            self._open_new()
        self.file.write(data)
        self.file.flush()
        self.size += len(data)

    def sync(self) -> None:
        self.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file:
            self.sync()
            self.file.close()
            self.file = None
