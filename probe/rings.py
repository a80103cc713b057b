"""Reading the BPF ring buffers, each ring on its own -- `vital` while
`events` backs up in the kernel -- and a read can stop after a number of
records, leaving the rest in the kernel ring.

On x86-64 (MappedRing) the probe reads a ring through one mapping of its
pages; libbpf (Ring, through BCC's libbcc as bcc.BPF.open_ring_buffer does)
maps them twice, so that a record that wraps around the end reads as one,
and every page of a ring then counts twice in the probe's RSS (40 MB for the
16 MB `events` and 4 MB `vital` rings)."""
from __future__ import annotations

import ctypes as ct
import mmap
import platform
import struct

from agentwarden.errors import AgentwardenError

# libbpf's ring_buffer_sample_fn (ctypes caches function types: this is BCC's own).
_SAMPLE_FN = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_int)
# A callback that returns this stops the read; libbpf has consumed the record
# it was given (and the callback kept it): nothing is read twice or lost.
_STOP = -1


class Ring:
    def __init__(self, bpf, name: str):
        from bcc import libbcc   # loaded with the program (probe.loader.load_bcc)
        self._lib = libbcc.lib
        self.name = name
        self.fd = bpf[name.encode()].map_fd   # pollable: readable while records wait
        self.records: list[bytes] = []
        self._until = 0   # len(records) at which the current read stops
        self._callback = _SAMPLE_FN(self._take)   # kept alive: libbpf calls it
        self._manager = self._lib.bpf_new_ringbuf(self.fd, self._callback, None)
        if not self._manager:
            raise AgentwardenError(f"cannot read the BPF ring buffer {name!r} (libbpf's ring_buffer__new "
                                   "failed; see its message above)")

    def _take(self, _ctx, data, size) -> int:
        records = self.records
        records.append(ct.string_at(data, size))
        return _STOP if len(records) >= self._until else 0

    def read(self, limit: int | None = None) -> bool:
        """Add the ring's records to `records`, at most `limit` of them (None:
        every one, including those queued while it reads). True when it stopped
        at the limit: records may be left in the ring."""
        self._until = len(self.records) + limit if limit is not None else 1 << 62
        if self._until == len(self.records):
            return True
        return self._lib.bpf_consume_ringbuf(self._manager) < 0

    def take(self) -> list[bytes]:
        records, self.records = self.records, []
        return records

    def close(self) -> None:
        if self._manager:
            self._lib.bpf_free_ringbuf(self._manager)
            self._manager = None


# The kernel's ring layout (include/uapi/linux/bpf.h and kernel/bpf/ringbuf.c):
# a consumer page (its position, the one page user space may write), a
# producer page (its position), then the data pages. Each record starts at an
# 8-byte boundary with an 8-byte header whose first u32 is its length, with
# these two bits: still being written, and discarded.
_RECORD_BUSY = 1 << 31
_RECORD_DISCARDED = 1 << 30
_HEADER_SIZE = 8
_POSITION = struct.Struct("Q")   # native: one 8-byte load or store
_LENGTH = struct.Struct("I")


class MappedRing:
    """A ring read through one read-only mapping of its producer and data
    pages. Relies on x86-64's ordering (loads are not reordered with loads,
    stores not with earlier loads) where libbpf uses acquire/release barriers:
    a record's length read without the busy bit means its bytes are there,
    and the consumer position stored after reading them frees them."""

    def __init__(self, bpf, name: str):
        table = bpf[name.encode()]
        self.name = name
        self.fd = table.map_fd   # pollable: readable while records wait
        self.size = int(table.max_entries)   # data bytes, a power of two
        self.records: list[bytes] = []
        page = mmap.PAGESIZE
        try:
            self._consumer_page = mmap.mmap(self.fd, page, mmap.MAP_SHARED,
                                            mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
            self._pages = mmap.mmap(self.fd, page + self.size, mmap.MAP_SHARED, mmap.PROT_READ,
                                    offset=page)
        except OSError as exc:
            raise AgentwardenError(f"cannot map the BPF ring buffer {name!r}: {exc.strerror}") from None
        # An 8-byte store, as the kernel reads it (a bytewise one could tear).
        self._consumer = ct.c_uint64.from_buffer(self._consumer_page)
        self._data = page   # offset of the data pages in _pages

    def read(self, limit: int | None = None) -> bool:
        """Add the ring's records to `records`, at most `limit` of them (None:
        every one, including those queued while it reads). True when it stopped
        at the limit: records may be left in the ring."""
        pages, data, mask, end = self._pages, self._data, self.size - 1, self._data + self.size
        position = _POSITION.unpack_from
        length_at = _LENGTH.unpack_from
        consumer = self._consumer
        records = self.records
        left = limit if limit is not None else -1
        if left == 0:
            return True
        cons = consumer.value
        while True:
            prod = position(pages, 0)[0]
            if cons >= prod:
                return False
            while cons < prod:
                header = data + (cons & mask)
                length = length_at(pages, header)[0]
                if length & _RECORD_BUSY:
                    return False   # not committed yet: the next read takes it
                size = length & ~_RECORD_DISCARDED
                if not length & _RECORD_DISCARDED:
                    start = data + ((cons + _HEADER_SIZE) & mask)
                    stop = start + size
                    if stop <= end:
                        records.append(pages[start:stop])
                    else:   # wraps around the end of the data pages
                        records.append(pages[start:end] + pages[data:stop - self.size])
                    left -= 1
                cons += (size + _HEADER_SIZE + 7) & ~7
                consumer.value = cons
                if left == 0:
                    return True

    def take(self) -> list[bytes]:
        records, self.records = self.records, []
        return records

    def close(self) -> None:
        if self._pages is not None:
            del self._consumer   # the export of _consumer_page goes with it
            self._consumer_page.close()
            self._pages.close()
            self._pages = None


def open_ring(bpf, name: str):
    """The probe's reader of a BPF ring: one mapping where the ordering allows it."""
    return MappedRing(bpf, name) if platform.machine() == "x86_64" else Ring(bpf, name)
