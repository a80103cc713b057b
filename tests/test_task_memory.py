"""TaskMemory reads a task's strings and argv the way the supervisor reads a
notified syscall's arguments: here out of this very process (a process may
read itself with either method), including at the edge of an unmapped page."""
from __future__ import annotations

import ctypes
import mmap
import os

import pytest

from agentwarden import seccomp_notify as sn

PAGE = sn.TaskMemory.PAGE
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


@pytest.fixture(params=["process_vm_readv", "/proc/PID/mem"])
def memory(request, monkeypatch):
    monkeypatch.setattr(sn.TaskMemory, "use_vm_readv", request.param == "process_vm_readv")
    with sn.TaskMemory(os.getpid()) as mem:
        yield mem
    # The fallback must not have been taken behind the test's back.
    assert sn.TaskMemory.use_vm_readv == (request.param == "process_vm_readv")


@pytest.fixture
def page_before_a_hole():
    """The address of a mapped page whose next page is unmapped."""
    base = libc.mmap(None, 2 * PAGE, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert base not in (None, ctypes.c_void_p(-1).value)
    assert libc.munmap(base + PAGE, PAGE) == 0
    yield base
    libc.munmap(base, PAGE)


def test_string_and_argv(memory):
    args = [ctypes.create_string_buffer(s) for s in (b"/usr/bin/sed", b"-i", b"s/a/b/", b"x" * 3000)]
    argv = (ctypes.c_void_p * 5)(*[ctypes.addressof(a) for a in args], None)
    pointers = memory.pointers(ctypes.addressof(argv), 4096)
    assert pointers == [ctypes.addressof(a) for a in args]
    assert [memory.string(p) for p in pointers] == [b"/usr/bin/sed", b"-i", b"s/a/b/", b"x" * 3000]
    words = (ctypes.c_uint64 * 2)(0o1101, 7)
    assert memory.u64s(ctypes.addressof(words), 2) == (0o1101, 7)


def test_a_string_may_end_at_the_last_byte_before_a_hole(memory, page_before_a_hole):
    text = b"/etc/" + b"p" * 100
    ctypes.memmove(page_before_a_hole + PAGE - len(text) - 1, text + b"\0", len(text) + 1)
    assert memory.string(page_before_a_hole + PAGE - len(text) - 1) == text


def test_a_string_that_runs_into_a_hole_is_unreadable(memory, page_before_a_hole):
    ctypes.memset(page_before_a_hole, ord("a"), PAGE)  # no NUL before the hole
    assert memory.string(page_before_a_hole + PAGE - 300) is None
    assert memory.string(page_before_a_hole + PAGE) is None


def test_argv_may_end_at_a_hole_but_not_run_into_it(memory, page_before_a_hole):
    name = ctypes.create_string_buffer(b"true")
    end = page_before_a_hole + PAGE
    ctypes.memmove(end - 16, bytes((ctypes.c_void_p * 2)(ctypes.addressof(name), None)), 16)
    assert memory.pointers(end - 16, 4096) == [ctypes.addressof(name)]
    ctypes.memmove(end - 16, bytes((ctypes.c_void_p * 2)(ctypes.addressof(name), ctypes.addressof(name))), 16)
    assert memory.pointers(end - 16, 4096) is None   # no NULL before the hole


def test_an_argv_array_across_a_page_boundary(memory):
    block = ctypes.create_string_buffer(3 * PAGE)
    start = (ctypes.addressof(block) // PAGE + 1) * PAGE - 12   # unaligned, across the boundary
    name = ctypes.create_string_buffer(b"ls")
    ctypes.memmove(start, bytes((ctypes.c_void_p * 3)(ctypes.addressof(name), ctypes.addressof(name), None)), 24)
    assert memory.pointers(start, 4096) == [ctypes.addressof(name)] * 2


def test_limits_are_kept(memory):
    long = ctypes.create_string_buffer(b"y" * 5000)
    assert memory.string(ctypes.addressof(long), limit=4096) is None
    fits, too_long = (ctypes.create_string_buffer(b"z" * n) for n in (4095, 4096))
    assert memory.string(ctypes.addressof(fits), limit=4096) == b"z" * 4095
    assert memory.string(ctypes.addressof(too_long), limit=4096) is None
    many = (ctypes.c_void_p * 11)(*([ctypes.addressof(long)] * 10), None)
    assert len(memory.pointers(ctypes.addressof(many), 4)) == 4


def test_a_task_that_is_gone_is_unreadable():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    buf = ctypes.create_string_buffer(b"gone")
    with sn.TaskMemory(pid) as mem:
        assert mem.string(ctypes.addressof(buf)) is None
