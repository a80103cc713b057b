"""Reading the BPF ring buffers: one libbpf consumer per ring (through BCC's
libbcc, as bcc.BPF.open_ring_buffer does), so that the probe reads each ring
on its own -- `vital` while `events` backs up in the kernel -- and a read can
stop after a number of records, leaving the rest in the kernel ring."""
from __future__ import annotations

import ctypes as ct

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
