"""The archive's on-disk format (format 2): shared by the daemon's writer and
every reader (verify, show, search, replay, export).

The archive directory (root's alone: 0700, files 0600)::

    segment-<first seq, 16 digits>.awseg       the active segment, and sealed ones not yet compressed
    segment-<first seq>.awseg.xz / .awseg.z     a sealed segment, compressed whole (xz or zlib)
    head                                        the last fsynced seq and its chain hash
    lock                                        flock()ed by the daemon that writes the archive

A segment is a stream of msgpack objects::

    header  ["agentwarden-archive", 2, header_body, header_mac]
            header_body = msgpack map {first_seq, prev_hash, host, boot_id, created, key_id}
    record  [seq, body, chain]            once per record, seq increasing by one
            body  = the record, msgpack (the wire schema; `seq` lives in the envelope)
            chain = H("aw-record", chain of seq-1 || seq as 8 bytes big-endian || body)

H is BLAKE2b-256 (hashlib), keyed with the archive key when there is one, and
personalised per use. The chain of the record before seq 0 is GENESIS; a
segment's ``prev_hash`` is the chain of the record before its ``first_seq``, so
the chain runs unbroken through every segment. Changing, removing, reordering or
inserting a record breaks it; so does removing a whole segment (the next header
no longer continues from its predecessor). The head file, rewritten after each
fsync, names the last durable record: cutting records off the end breaks that.
Without a key anyone can recompute the chain; with one, only its holder can.
"""
from __future__ import annotations

import hashlib
import lzma
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import msgpack

from agentwarden.errors import AgentwardenError
from agentwarden.wire import pack

MAGIC = "agentwarden-archive"
FORMAT = 2
HASH_BYTES = 32
GENESIS = bytes(HASH_BYTES)
SEGMENT_SUFFIX = ".awseg"
COMPRESSED_SUFFIXES = {".xz": "xz", ".z": "zlib"}
SEGMENT_NAME = re.compile(r"^segment-(\d{16})\.awseg(\.xz|\.z)?\Z")
HEAD_FILE = "head"
LOCK_FILE = "lock"
KEY_MIN, KEY_MAX = 16, 64  # bytes; BLAKE2b takes keys up to 64 bytes

_PERSON_RECORD = b"aw-record"
_PERSON_HEADER = b"aw-header"
_PERSON_HEAD = b"aw-head"
_PERSON_KEY_ID = b"aw-key-id"


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries (a new, renamed or removed file) durable:
    the daemon's archive and the fleet collector's per-host copies."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArchiveError(AgentwardenError):
    pass


class NewerFormat(ArchiveError):
    """A segment of a format this agentwarden does not know: never touched."""


class TornHeader(ArchiveError):
    """A segment whose header was never completely written (a crash while rotating)."""


def segment_name(first_seq: int, compressed: str | None = None) -> str:
    suffix = {"xz": ".xz", "zlib": ".z", None: ""}[compressed]
    return f"segment-{first_seq:016d}{SEGMENT_SUFFIX}{suffix}"


# ---- hashing -------------------------------------------------------------------

def chain_hash(key: bytes, prev: bytes, seq: int, body: bytes) -> bytes:
    h = hashlib.blake2b(prev, digest_size=HASH_BYTES, key=key, person=_PERSON_RECORD)
    h.update(seq.to_bytes(8, "big"))
    h.update(body)
    return h.digest()


def _mac(key: bytes, person: bytes, data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=HASH_BYTES, key=key, person=person).digest()


def key_id(key: bytes) -> str | None:
    """A short public name of a key (not the key): which key made a segment."""
    return hashlib.blake2b(key, digest_size=8, person=_PERSON_KEY_ID).hexdigest() if key else None


def load_key(path: Path, required: bool, check_owner: bool = True) -> bytes:
    """The archive key: 16 to 64 bytes in a root-only file. b"" (unkeyed) when
    the file does not exist and was not asked for explicitly."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if required:
            raise ArchiveError(f"archive key file {path} does not exist") from None
        return b""
    except PermissionError:
        raise ArchiveError(f"cannot read the archive key {path}: permission denied (run with sudo)") from None
    if check_owner and (st.st_uid != 0 or st.st_mode & 0o077):
        raise ArchiveError(f"archive key file {path} must be owned by root and readable by root only "
                           f"(it is uid {st.st_uid}, mode {st.st_mode & 0o777:04o}); "
                           f"fix: chown root: {path} && chmod 600 {path}")
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise ArchiveError(f"cannot read the archive key {path}: {exc.strerror}") from None
    if not KEY_MIN <= len(key) <= KEY_MAX:
        raise ArchiveError(f"archive key file {path} holds {len(key)} bytes; it needs {KEY_MIN} to "
                           f"{KEY_MAX} (make one: head -c 32 /dev/urandom > {path})")
    return key


# ---- headers and the head file --------------------------------------------------

@dataclass(frozen=True)
class Header:
    first_seq: int
    prev_hash: bytes
    host: str
    boot_id: str
    created: int          # unix ns
    key_id: str | None    # None: the segment is not keyed
    mac: bytes
    body: bytes

    def mac_ok(self, key: bytes) -> bool:
        return _mac(key, _PERSON_HEADER, self.body) == self.mac


def encode_header(key: bytes, first_seq: int, prev_hash: bytes, host: str, boot_id: str,
                  created: int) -> bytes:
    body = pack({"first_seq": first_seq, "prev_hash": prev_hash, "host": host,
                 "boot_id": boot_id, "created": created, "key_id": key_id(key)})
    return pack([MAGIC, FORMAT, body, _mac(key, _PERSON_HEADER, body)])


def decode_header(obj: Any) -> Header:
    """A header from the first object of a segment; ArchiveError says what is wrong."""
    if not (isinstance(obj, list) and len(obj) == 4 and obj[0] == MAGIC):
        raise ArchiveError("does not start with an agentwarden archive header")
    if obj[1] != FORMAT:
        raise NewerFormat(f"has format {obj[1]!r}; this agentwarden reads format {FORMAT}")
    body, mac = obj[2], obj[3]
    if not isinstance(body, bytes) or not isinstance(mac, bytes):
        raise ArchiveError("has a malformed header")
    try:
        fields = msgpack.unpackb(body, raw=False)
        header = Header(fields["first_seq"], fields["prev_hash"], fields["host"], fields["boot_id"],
                        fields["created"], fields["key_id"], mac, body)
    except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
        raise ArchiveError(f"has a malformed header ({exc.__class__.__name__})") from None
    if not (isinstance(header.first_seq, int) and header.first_seq >= 0
            and isinstance(header.prev_hash, bytes) and len(header.prev_hash) == HASH_BYTES
            and isinstance(header.created, int) and isinstance(header.host, str)
            and isinstance(header.boot_id, str) and isinstance(header.key_id, (str, type(None)))):
        raise ArchiveError("has a header with fields of the wrong type")
    return header


@dataclass(frozen=True)
class Head:
    seq: int
    chain: bytes
    segment: str
    time: int
    key_id: str | None
    mac: bytes
    body: bytes

    def mac_ok(self, key: bytes) -> bool:
        return _mac(key, _PERSON_HEAD, self.body) == self.mac


def encode_head(key: bytes, seq: int, chain: bytes, segment: str, now: int) -> bytes:
    body = pack({"seq": seq, "chain": chain, "segment": segment, "time": now, "key_id": key_id(key)})
    return pack([MAGIC, FORMAT, body, _mac(key, _PERSON_HEAD, body)])


def read_head(directory: Path) -> Head | None:
    """The head file; None when there is none. ArchiveError when it is unreadable."""
    try:
        raw = (directory / HEAD_FILE).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ArchiveError(f"cannot read {directory / HEAD_FILE}: {exc.strerror}") from None
    try:
        obj = msgpack.unpackb(raw, raw=False)
        if not (isinstance(obj, list) and len(obj) == 4 and obj[0] == MAGIC and obj[1] == FORMAT):
            raise ValueError("not a head record")
        fields = msgpack.unpackb(obj[2], raw=False)
        head = Head(fields["seq"], fields["chain"], fields["segment"], fields["time"],
                    fields["key_id"], obj[3], obj[2])
        if not (isinstance(head.seq, int) and isinstance(head.chain, bytes)):
            raise ValueError("fields of the wrong type")
    except (ValueError, TypeError, KeyError, IndexError, msgpack.UnpackException) as exc:
        raise ArchiveError(f"the head file {directory / HEAD_FILE} is damaged ({exc})") from None
    return head


# ---- segment files ---------------------------------------------------------------

@dataclass(frozen=True)
class SegmentFile:
    path: Path
    first_seq: int          # from the name; the header is what counts
    compression: str | None  # None, "xz" or "zlib"

    @property
    def base(self) -> Path:
        """The uncompressed name (the same for a segment before and after compression)."""
        return self.path.parent / segment_name(self.first_seq)


def list_segments(directory: Path) -> list[SegmentFile]:
    """Segment files by first seq. When a crash left a segment both plain and
    compressed, the plain one is listed (the writer removes the other)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        raise ArchiveError(f"there is no archive at {directory}") from None
    except PermissionError:
        raise ArchiveError(f"cannot read the archive {directory}: permission denied "
                           "(it is root's alone: run with sudo)") from None
    found: dict[int, SegmentFile] = {}
    for name in names:
        match = SEGMENT_NAME.match(name)
        if not match:
            continue
        first = int(match.group(1))
        compression = COMPRESSED_SUFFIXES.get(match.group(2)) if match.group(2) else None
        if first in found and found[first].compression is None:
            continue
        found[first] = SegmentFile(directory / name, first, compression)
    return [found[k] for k in sorted(found)]


def _decompress(data: bytes, compression: str | None, limit: int = -1) -> bytes:
    if compression == "xz":
        return lzma.LZMADecompressor().decompress(data, max_length=limit)
    if compression == "zlib":
        d = zlib.decompressobj()
        return d.decompress(data, limit if limit > 0 else 0)
    return data if limit < 0 else data[:limit]


def load_segment(segment: SegmentFile, limit: int = -1) -> bytes:
    """A segment's bytes (decompressed); follows a segment compressed meanwhile."""
    candidates = [segment.path] + ([] if segment.compression else
                                   [segment.base.with_name(segment.base.name + s)
                                    for s in COMPRESSED_SUFFIXES])
    for path in candidates:
        compression = COMPRESSED_SUFFIXES.get(path.suffix) if path != segment.base else None
        try:
            with open(path, "rb") as f:
                raw = f.read() if limit < 0 else f.read(limit if not compression else 1 << 16)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ArchiveError(f"cannot read {path}: {exc.strerror}") from None
        try:
            return _decompress(raw, compression, limit)
        except (lzma.LZMAError, zlib.error, EOFError) as exc:
            raise ArchiveError(f"{path.name} cannot be decompressed: {exc}") from None
    raise ArchiveError(f"{segment.path.name} vanished while it was read (retention or "
                       "compression by the daemon?); run again")


def decompress_bytes(data: bytes, compression: str | None) -> bytes:
    return _decompress(data, compression)


def compress_bytes(data: bytes, compression: str) -> bytes:
    packer = compressor(compression)
    return packer.compress(data) + packer.flush()


def compressor(compression: str) -> Any:
    """A streaming compressor (compress(), flush()) making what compress_bytes makes:
    the daemon compresses a sealed segment piece by piece, never whole in memory."""
    if compression == "xz":
        return lzma.LZMACompressor(preset=1)  # as small as preset 6 here, seven times faster
    if compression == "zlib":
        return zlib.compressobj(9)
    raise ValueError(compression)


def decompressed_pieces(f: Any, compression: str, piece: int = 1 << 20) -> Iterator[bytes]:
    """A compressed segment's content read from file f, at most piece bytes at
    a time (memory stays bounded however well it compressed). Raises
    ArchiveError when the stream is damaged or ends early."""
    try:
        if compression == "xz":
            unpacker = lzma.LZMADecompressor()
            while not unpacker.eof:
                data = f.read(piece) if unpacker.needs_input else b""
                if unpacker.needs_input and not data:
                    raise ArchiveError("the compressed stream ends early")
                yield unpacker.decompress(data, max_length=piece)
        elif compression == "zlib":
            unpacker = zlib.decompressobj()
            while not unpacker.eof:
                data = unpacker.unconsumed_tail or f.read(piece)
                if not data:
                    raise ArchiveError("the compressed stream ends early")
                yield unpacker.decompress(data, piece)
        else:
            raise ValueError(compression)
    except (lzma.LZMAError, zlib.error) as exc:
        raise ArchiveError(f"cannot be decompressed: {exc}") from None


@dataclass
class Entry:
    seq: int
    body: bytes
    chain: bytes
    offset: int  # byte offset of the record in the (decompressed) segment


@dataclass
class Tail:
    """What follows the last readable object of a segment."""
    offset: int
    length: int
    torn: bool   # an incomplete object (or zeros): what a crash mid-write leaves
    detail: str


class SegmentReader:
    """Parses one segment: the header, then each record envelope in turn.
    After entries() is exhausted, ``tail`` says what (if anything) could not be
    read at the end."""

    def __init__(self, data: bytes):
        self.data = data
        self.tail: Tail | None = None
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(data), 1),
                                          strict_map_key=False)
        self._unpacker.feed(data)
        self.offset = 0
        first = self._next()
        if first is None:
            if self.tail is None or self.tail.torn:
                raise TornHeader(f"has no complete header ({len(data)} bytes)")
            raise ArchiveError("does not start with an agentwarden archive header")
        if not data.strip(b"\0"):
            raise TornHeader(f"holds only {len(data)} zero bytes")
        self.header = decode_header(first)
        self.header_end = self.offset

    def _next(self) -> Any:
        try:
            obj = self._unpacker.unpack()
        except msgpack.OutOfData:
            rest = len(self.data) - self.offset
            if rest:
                self.tail = Tail(self.offset, rest, True, f"{rest} bytes of an incomplete record")
            return None
        except Exception as exc:  # msgpack raises several unrelated types
            self._damaged(f"unreadable bytes ({exc.__class__.__name__})")
            return None
        self.offset = self._unpacker.tell()
        return obj

    def _damaged(self, detail: str) -> None:
        rest = self.data[self.offset:]
        if not rest.strip(b"\0"):
            self.tail = Tail(self.offset, len(rest), True, f"{len(rest)} zero bytes")
        else:
            self.tail = Tail(self.offset, len(rest), False, detail)

    def entries(self) -> Iterator[Entry]:
        while True:
            start = self.offset
            obj = self._next()
            if obj is None:
                return
            if not (isinstance(obj, list) and len(obj) == 3 and type(obj[0]) is int
                    and isinstance(obj[1], bytes) and isinstance(obj[2], bytes)
                    and len(obj[2]) == HASH_BYTES):
                self.offset = start
                self._damaged("an object that is not a record envelope [seq, body, hash]")
                return
            yield Entry(obj[0], obj[1], obj[2], start)


def decode_body(body: bytes) -> dict[str, Any]:
    record = msgpack.unpackb(body, raw=False, strict_map_key=False)
    if not isinstance(record, dict):
        raise ValueError("the record is not a map")
    return record


def read_header(segment: SegmentFile) -> Header:
    """Only the header: for compressed segments, only the start is decompressed."""
    data = load_segment(segment, limit=4096)
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=8192)
    unpacker.feed(data)
    try:
        return decode_header(unpacker.unpack())
    except ArchiveError as exc:
        raise ArchiveError(f"{segment.path.name} {exc}") from None
    except Exception:
        raise ArchiveError(f"{segment.path.name} has no readable header") from None


@dataclass
class Item:
    """One record as readers see it, with the segment it came from."""
    seq: int
    chain: bytes
    record: dict[str, Any]
    header: Header
    segment: str


def read_items(directory: Path, errors: list[str] | None = None) -> Iterator[Item]:
    """Every readable record, oldest first, without checking the chain (that is
    verify's job). What cannot be read is skipped and, with ``errors``, said."""
    for segment in list_segments(directory):
        yield from segment_items(segment, errors)


def segment_items(segment: SegmentFile, errors: list[str] | None = None) -> Iterator[Item]:
    """One segment's readable records, as read_items gives them."""
    try:
        reader = SegmentReader(load_segment(segment))
    except ArchiveError as exc:
        if errors is not None:
            errors.append(f"{segment.path.name}: {exc}")
        return
    for entry in reader.entries():
        try:
            record = decode_body(entry.body)
        except Exception:
            if errors is not None:
                errors.append(f"{segment.path.name}: record seq {entry.seq} is unreadable")
            continue
        record["seq"] = entry.seq
        yield Item(entry.seq, entry.chain, record, reader.header, segment.path.name)
    if reader.tail and errors is not None and not reader.tail.torn:
        errors.append(f"{segment.path.name}: {reader.tail.detail} at byte {reader.tail.offset}")


def read_records(directory: Path) -> Iterator[dict[str, Any]]:
    """Every readable record, oldest first, with its ``seq``."""
    for item in read_items(directory):
        yield item.record
