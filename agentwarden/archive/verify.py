"""Verify an archive: the hash chain through every record and segment, the head
file, and that any missing start is accounted for by retention records. Every
record is read (a map of a known kind); the archive's own records are checked
against the schema, since verify acts on them.

The first problem found (in seq order) is reported with the segment file, the
seq and the byte offset, and why; verification stops there, because everything
after a break is suspect. Effects of crashes the daemon recovered from (a torn
tail it cut) are notes, not problems.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agentwarden import wire

from .segments import (GENESIS, ArchiveError, Head, SegmentReader, chain_hash, decode_body, key_id,
                       list_segments, load_segment, read_head)

# archive events that mean records were lost or cannot be read: problems
PROBLEM_EVENTS = {"lost-durable": "records the head file had confirmed durable were lost",
                  "damaged-tail": "the daemon found unreadable bytes in a segment",
                  "damaged-segment": "the daemon set aside a segment it could not read",
                  "head-damaged": "the daemon found the head file damaged"}


@dataclass
class Problem:
    why: str
    segment: str | None = None
    seq: int | None = None
    offset: int | None = None

    def where(self) -> str:
        parts = []
        if self.seq is not None:
            parts.append(f"record seq {self.seq}")
        if self.segment:
            parts.append(f"in {self.segment}" + (f" at byte {self.offset}" if self.offset is not None else ""))
        return " ".join(parts) or "archive"

    def __str__(self) -> str:
        return f"{self.where()}: {self.why}"


@dataclass
class Report:
    directory: Path
    problem: Problem | None = None
    notes: list[str] = field(default_factory=list)
    records: int = 0
    segments: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    keyed: bool = False
    head: Head | None = None
    retained: list[dict] = field(default_factory=list)   # retention records found

    @property
    def ok(self) -> bool:
        return self.problem is None


class _Stop(Exception):
    pass


class _Verifier:
    def __init__(self, directory: Path, key: bytes | None):
        self.directory = directory
        self.key = key
        self.report = Report(directory)
        self.expected: int | None = None   # next seq
        self.chain = GENESIS
        self.head_chain_seen: bytes | None = None

    def fail(self, why: str, segment: str | None = None, seq: int | None = None,
             offset: int | None = None) -> None:
        self.report.problem = Problem(why, segment, seq, offset)
        raise _Stop

    def run(self) -> Report:
        try:
            self._run()
        except _Stop:
            pass
        return self.report

    def _key_for(self, name: str, segment_key_id: str | None) -> bytes:
        if segment_key_id is None:
            if self.key:
                self.fail("is not keyed, but a key was given: it was written without the key "
                          "(the daemon had none then) or replaced by someone without it", name)
            return b""
        self.report.keyed = True
        if self.key is None:
            raise ArchiveError(f"the archive is keyed (key id {segment_key_id}): give the key "
                               "with --key FILE")
        if key_id(self.key) != segment_key_id:
            self.fail(f"is keyed with key id {segment_key_id}, not with the given key "
                      f"(id {key_id(self.key)})", name)
        return self.key

    def _run(self) -> None:
        report = self.report
        try:
            head = read_head(self.directory)
        except ArchiveError as exc:
            self.fail(str(exc))
        report.head = head
        segments = list_segments(self.directory)
        if not segments:
            if head is not None and head.seq >= 0:
                self.fail(f"there are no segments, but the head file says seq {head.seq} was durable")
            report.notes.append("the archive is empty")
            return
        first_header = None
        for index, segment in enumerate(segments):
            name = segment.path.name
            try:
                reader = SegmentReader(load_segment(segment))
            except ArchiveError as exc:
                self.fail(str(exc), name)
            header = reader.header
            key = self._key_for(name, header.key_id)
            if not header.mac_ok(key):
                self.fail("its header does not match its hash: the header was changed", name, offset=0)
            if header.first_seq != segment.first_seq:
                self.fail(f"its name says it starts at seq {segment.first_seq}, its header says "
                          f"{header.first_seq}: renamed", name, offset=0)
            if first_header is None:
                first_header = header
                self.expected, self.chain = header.first_seq, header.prev_hash
                report.first_seq = header.first_seq
            elif header.first_seq > self.expected:
                self.fail(f"records seq {self.expected}..{header.first_seq - 1} are missing before this "
                          "segment: a segment was removed (retention only ever removes the oldest), or "
                          "records were cut from the end of the one before", name, header.first_seq, 0)
            elif header.first_seq < self.expected:
                self.fail(f"it starts at seq {header.first_seq}, but the segment before ends at seq "
                          f"{self.expected - 1}: segments overlap (a copy or a replacement)",
                          name, header.first_seq, 0)
            elif header.prev_hash != self.chain:
                self.fail("it does not continue the hash chain of the segment before: one of the two "
                          "was replaced or rewritten", name, header.first_seq, 0)
            report.segments += 1
            self._records(reader, name, key, head)
            tail = reader.tail
            if tail:
                last = index == len(segments) - 1
                if not last or not tail.torn:
                    self.fail(f"{tail.detail} ({tail.length} bytes) after seq {self.expected - 1}: "
                              "damaged or edited", name, self.expected, tail.offset)
                report.notes.append(
                    f"{name} ends with {tail.detail} at byte {tail.offset}: a write in progress, or "
                    "a crash; the daemon cuts it (and records that) when it starts")
        report.last_seq = self.expected - 1
        self._check_head(head, first_header, segments[-1].path.name)
        self._check_start(first_header, segments[0].path.name)

    def _records(self, reader: SegmentReader, name: str, key: bytes, head: Head | None) -> None:
        entries = list(reader.entries())
        seqs = [e.seq for e in entries]
        for position, entry in enumerate(entries):
            if entry.seq != self.expected:
                if entry.seq > self.expected and self.expected in seqs[position:]:
                    self.fail(f"found where seq {self.expected} belongs, which comes later: records "
                              "were swapped or moved", name, entry.seq, entry.offset)
                if entry.seq > self.expected:
                    self.fail(f"follows seq {self.expected - 1}: records {self.expected}..{entry.seq - 1} "
                              "were removed", name, entry.seq, entry.offset)
                self.fail(f"follows seq {self.expected - 1}: a record is repeated or out of order",
                          name, entry.seq, entry.offset)
            if chain_hash(key, self.chain, entry.seq, entry.body) != entry.chain:
                self.fail("its hash does not match: the record was changed"
                          + (", or rehashed without the key" if key else ""), name, entry.seq, entry.offset)
            # The hash vouches for the content; the record is read to find the
            # archive's own records (retention, recoveries).
            try:
                record = decode_body(entry.body)
            except Exception as exc:  # msgpack raises several unrelated types
                self.fail(f"is not a msgpack record ({exc.__class__.__name__})", name, entry.seq, entry.offset)
            kind = record.get("kind")
            if kind not in wire.RECORD_FIELDS:
                self.fail(f"has an unknown kind {kind!r}", name, entry.seq, entry.offset)
            if kind == "archive":
                try:
                    wire.validate_record(record)
                except wire.WireError as exc:
                    self.fail(f"is not a valid record: {exc}", name, entry.seq, entry.offset)
                self._archive_event(record, name, entry.seq, entry.offset)
            self.chain = entry.chain
            self.expected += 1
            self.report.records += 1
            if head is not None and entry.seq == head.seq:
                self.head_chain_seen = entry.chain

    def _archive_event(self, record: dict, name: str, seq: int, offset: int) -> None:
        event = record["event"]
        if event in PROBLEM_EVENTS:
            self.fail(f"{PROBLEM_EVENTS[event]}: {record['detail']}", name, seq, offset)
        if event == "retention":
            self.report.retained.append(record)
        elif event in ("torn-tail-cut", "torn-header-removed"):
            self.report.notes.append(f"seq {seq}: the daemon recovered from a crash: {record['detail']}")

    def _check_head(self, head: Head | None, first_header, last_name: str) -> None:
        report = self.report
        if head is None:
            self.fail("there is no head file, so nothing shows where the archive ended: it was "
                      "removed (the daemon writes it at its first sync)")
        key = self.key if head.key_id is not None else b""
        if head.key_id is not None and (self.key is None or key_id(self.key) != head.key_id):
            self.fail(f"the head file is keyed with key id {head.key_id}, not with the given key")
        if not head.mac_ok(key or b""):
            self.fail("the head file does not match its hash: it was changed")
        if head.seq > report.last_seq:
            self.fail(f"the archive ends at seq {report.last_seq}, but the head file says seq {head.seq} "
                      f"was durable: records {report.last_seq + 1}..{head.seq} were cut off the end",
                      last_name, report.last_seq + 1)
        if head.seq == report.first_seq - 1:   # nothing fsynced yet since the head was written
            self.head_chain_seen = first_header.prev_hash
        elif head.seq < report.first_seq:
            self.fail(f"the head file names seq {head.seq}, before the start of the archive "
                      f"(seq {report.first_seq}): it was replaced by an old copy")
        if self.head_chain_seen != head.chain:
            self.fail("differs from the record the head file confirmed as durable: the end of the "
                      "archive was rewritten", seq=head.seq)

    def _check_start(self, first_header, first_name: str) -> None:
        if first_header.first_seq == 0 and first_header.prev_hash == GENESIS:
            return
        for record in self.report.retained:
            if record.get("last_seq") == first_header.first_seq - 1 and \
                    record.get("last_hash") == first_header.prev_hash.hex():
                deleted = len(self.report.retained)
                self.report.notes.append(
                    f"records 0..{first_header.first_seq - 1} were deleted by retention "
                    f"({deleted} segment{'s' if deleted != 1 else ''} recorded in this archive)")
                for other in self.report.retained:
                    if (self.directory / other.get("segment", "")).exists():
                        self.report.notes.append(f"{other['segment']} is still present although retention "
                                                 "recorded its deletion (a crash in between)")
                return
        self.fail(f"the archive starts at seq {first_header.first_seq}: records 0.."
                  f"{first_header.first_seq - 1} are missing and no retention record accounts for them "
                  "(segments deleted by hand)", first_name, first_header.first_seq, 0)


def verify(directory: Path, key: bytes | None) -> Report:
    """Check the whole archive. ``key``: the archive key, b"" for an unkeyed
    archive, None when none is at hand (a keyed archive then raises ArchiveError)."""
    return _Verifier(directory, key).run()
