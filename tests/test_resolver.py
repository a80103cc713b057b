"""Path resolution from the event stream: cwd and fd tracking, exec, fork, /proc fallback."""
from __future__ import annotations

import os

import pytest

from agentwarden.daemon.resolver import O_CLOEXEC, Descriptor, Resolver
from agentwarden.paths import AT_FDCWD, normalise

# Above PID_MAX_LIMIT (2**22): /proc/<pid> can never exist, so the fallback finds nothing.
PARENT = 5_000_000
CHILD = 5_000_001
O_DIRECTORY = os.O_DIRECTORY


@pytest.mark.parametrize("path,expected", [
    ("/", "/"),
    ("", "/"),
    ("/a/b", "/a/b"),
    ("/a/b/", "/a/b"),
    ("//a//b", "/a/b"),
    ("/a/./b/.", "/a/b"),
    ("/a/b/../c", "/a/c"),
    ("/a/b/../../..", "/"),
    ("/../etc/passwd", "/etc/passwd"),
    ("/a/../../b/./../c/", "/c"),
    ("/a/.../b", "/a/.../b"),
    ("/a/..b/c", "/a/..b/c"),
    ("/tmp/\udcff/x/..", "/tmp/\udcff"),
])
def test_normalise(path, expected):
    assert normalise(path) == expected


def _task(kind, pid, ppid=0, **fields):
    return {"kind": kind, "pid": pid, "ppid": ppid, **fields}


def open_(pid, path, ret=3, dirfd=AT_FDCWD, flags=0, unreadable=False, truncated=False):
    return _task("open", pid, syscall="openat", path=path, dirfd=dirfd, flags=flags, ret=ret,
                 path_unreadable=unreadable, path_truncated=truncated)


def chdir(pid, path, ret=0, unreadable=False, truncated=False):
    return _task("chdir", pid, syscall="chdir", path=path, dirfd=AT_FDCWD, ret=ret,
                 path_unreadable=unreadable, path_truncated=truncated)


def fchdir(pid, fd, ret=0):
    return _task("chdir", pid, syscall="fchdir", path="", dirfd=fd, ret=ret,
                 path_unreadable=False, path_truncated=False)


def exec_(pid, filename, exec_path="", ret=0, dirfd=AT_FDCWD, unreadable=False, truncated=False):
    return _task("exec", pid, filename=filename, exec_path=exec_path, dirfd=dirfd, ret=ret,
                 filename_unreadable=unreadable, filename_truncated=truncated)


def fd_(pid, syscall, fd, ret=0, arg=0, cloexec=False):
    return _task("fd", pid, syscall=syscall, fd=fd, arg=arg, ret=ret, cloexec=cloexec)


def fork(pid, child, ppid=0):
    return _task("fork", pid, ppid=ppid, child_pid=child)


def annotated(resolver, record):
    resolver.annotate(record)
    return record


def resolved(resolver, record):
    return annotated(resolver, record)["resolved_path"]


@pytest.fixture
def r():
    """A resolver that has seen PARENT chdir to /home/agent."""
    resolver = Resolver()
    assert resolved(resolver, chdir(PARENT, "/home/agent")) == "/home/agent"
    return resolver


def test_relative_opens_follow_chdir(r):
    assert resolved(r, open_(PARENT, "main.py")) == "/home/agent/main.py"
    assert resolved(r, open_(PARENT, "./src/../README")) == "/home/agent/README"
    assert resolved(r, open_(PARENT, "../../etc/shadow")) == "/etc/shadow"
    assert resolved(r, chdir(PARENT, "src//lib/")) == "/home/agent/src/lib"
    assert resolved(r, open_(PARENT, "x.c")) == "/home/agent/src/lib/x.c"
    assert resolved(r, chdir(PARENT, "..")) == "/home/agent/src"
    assert resolved(r, open_(PARENT, "y.c")) == "/home/agent/src/y.c"
    # absolute paths ignore the cwd but are normalised
    assert resolved(r, open_(PARENT, "/etc//./hosts")) == "/etc/hosts"


def test_failed_chdir_keeps_the_cwd(r):
    assert resolved(r, chdir(PARENT, "/nonexistent", ret=-2)) == "/nonexistent"
    assert resolved(r, open_(PARENT, "f")) == "/home/agent/f"


def test_fchdir_through_an_fd_from_an_earlier_open(r):
    assert resolved(r, open_(PARENT, "/srv/data/", ret=5, flags=O_DIRECTORY)) == "/srv/data"
    assert resolved(r, fchdir(PARENT, 5)) == "/srv/data"
    assert resolved(r, open_(PARENT, "f")) == "/srv/data/f"


def test_fchdir_to_an_unknown_fd_makes_the_cwd_unknown(r):
    assert resolved(r, fchdir(PARENT, 9)) is None
    assert resolved(r, open_(PARENT, "f")) is None
    assert resolved(r, open_(PARENT, "/abs")) == "/abs"


def test_failed_open_does_not_register_an_fd(r):
    assert resolved(r, open_(PARENT, "/etc", ret=-13)) == "/etc"
    assert r.processes[PARENT].fds == {}
    resolved(r, open_(PARENT, "/etc", ret=3))
    assert r.processes[PARENT].fds == {3: Descriptor("/etc", False)}


def test_openat_with_dirfd(r):
    assert resolved(r, open_(PARENT, "/etc", ret=7, flags=O_DIRECTORY)) == "/etc"
    assert resolved(r, open_(PARENT, "passwd", dirfd=7, ret=8)) == "/etc/passwd"
    assert resolved(r, open_(PARENT, "../root/.ssh/id_rsa", dirfd=7)) == "/root/.ssh/id_rsa"
    # an absolute path ignores dirfd
    assert resolved(r, open_(PARENT, "/tmp/x", dirfd=7)) == "/tmp/x"
    # an empty path (AT_EMPTY_PATH) is the fd itself
    assert resolved(r, open_(PARENT, "", dirfd=7)) == "/etc"
    # but an empty path relative to the cwd is not resolved
    assert resolved(r, open_(PARENT, "")) is None
    # an fd never seen, of a process /proc cannot show: unresolved
    assert resolved(r, open_(PARENT, "passwd", dirfd=42)) is None


def test_fork_inherits_cwd_and_fds_then_diverges(r):
    resolved(r, open_(PARENT, "/etc", ret=4, flags=O_DIRECTORY))
    f = annotated(r, fork(PARENT, CHILD, ppid=77))
    assert f["ppid"] == 77
    assert resolved(r, open_(CHILD, "a")) == "/home/agent/a"
    assert resolved(r, open_(CHILD, "hosts", dirfd=4)) == "/etc/hosts"
    # the child's record gets its parent pid from the fork
    child_open = annotated(r, open_(CHILD, "b"))
    assert child_open["ppid"] == PARENT
    # later changes in one do not leak into the other
    resolved(r, chdir(CHILD, "/tmp"))
    resolved(r, open_(CHILD, "/var", ret=4, flags=O_DIRECTORY))
    assert resolved(r, open_(PARENT, "a")) == "/home/agent/a"
    assert resolved(r, open_(PARENT, "hosts", dirfd=4)) == "/etc/hosts"
    assert resolved(r, open_(CHILD, "a")) == "/tmp/a"
    assert resolved(r, open_(CHILD, "log", dirfd=4)) == "/var/log"


def test_fork_record_ppid_comes_from_the_parent_state(r):
    grandchild = CHILD + 1
    annotated(r, fork(PARENT, CHILD))
    f = annotated(r, fork(CHILD, grandchild))
    assert f["ppid"] == PARENT
    assert annotated(r, open_(grandchild, "x"))["ppid"] == CHILD
    # a ppid the kernel already knew is kept
    assert annotated(r, open_(grandchild, "x", ret=-1) | {"ppid": 12})["ppid"] == 12


def test_exec_drops_close_on_exec_fds(r):
    resolved(r, open_(PARENT, "/etc", ret=3, flags=O_DIRECTORY | O_CLOEXEC))
    resolved(r, open_(PARENT, "/var", ret=4, flags=O_DIRECTORY))
    # a failed exec keeps every fd
    annotated(r, exec_(PARENT, "/nonexistent", ret=-2))
    assert resolved(r, open_(PARENT, "passwd", dirfd=3, ret=-1)) == "/etc/passwd"
    annotated(r, exec_(PARENT, "/usr/bin/true"))
    assert resolved(r, open_(PARENT, "passwd", dirfd=3, ret=-1)) is None
    assert resolved(r, open_(PARENT, "log", dirfd=4, ret=-1)) == "/var/log"
    # exec keeps the cwd
    assert resolved(r, open_(PARENT, "a", ret=-1)) == "/home/agent/a"


def test_exec_resolves_filename_and_exec_path(r):
    e = annotated(r, exec_(PARENT, "./bin/../run.sh", exec_path="./run.sh"))
    assert e["resolved_filename"] == "/home/agent/run.sh"
    assert e["resolved_exec_path"] == "/home/agent/run.sh"
    e = annotated(r, exec_(PARENT, "/usr/bin/env"))
    assert e["resolved_filename"] == "/usr/bin/env"
    assert e["resolved_exec_path"] is None
    resolved(r, open_(PARENT, "/opt/tools", ret=6, flags=O_DIRECTORY))
    e = annotated(r, exec_(PARENT, "tool", dirfd=6))
    assert e["resolved_filename"] == "/opt/tools/tool"


@pytest.mark.parametrize("flags", [{"unreadable": True}, {"truncated": True}])
def test_unreadable_or_truncated_paths_resolve_to_none(r, flags):
    assert resolved(r, open_(PARENT, "/etc/passwd", **flags)) is None
    e = annotated(r, exec_(PARENT, "/usr/bin/ls", exec_path="/usr/bin/ls", **flags))
    assert e["resolved_filename"] is None
    # the kernel's own copy of the path still resolves
    assert e["resolved_exec_path"] == "/usr/bin/ls"
    # an fd opened through an unusable path is not tracked
    resolved(r, open_(PARENT, "/etc", ret=5, **flags))
    assert resolved(r, open_(PARENT, "x", dirfd=5)) is None
    # a chdir to an unusable path makes every later relative path unresolvable
    assert resolved(r, chdir(PARENT, "/tmp", **flags)) is None
    assert resolved(r, open_(PARENT, "x")) is None
    assert resolved(r, open_(PARENT, "/abs/x")) == "/abs/x"


def test_unknown_process_falls_back_to_proc_and_gets_nothing():
    r = Resolver()
    rec = annotated(r, open_(PARENT, "relative"))
    assert rec["resolved_path"] is None
    assert rec["ppid"] == 0
    assert r.proc_fallbacks == 1
    assert resolved(r, open_(PARENT, "/abs/./x")) == "/abs/x"
    assert r.proc_fallbacks == 1  # now known
    # a child of an unknown process inherits the unknown cwd
    annotated(r, fork(PARENT, CHILD))
    assert resolved(r, open_(CHILD, "relative")) is None


def test_unknown_process_that_exists_reads_proc(tmp_path):
    r = Resolver()
    pid = os.getpid()
    rec = annotated(r, open_(pid, "x", ret=-1))
    assert rec["resolved_path"] == os.path.join(os.getcwd(), "x")
    assert rec["ppid"] == os.getppid()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert resolved(r, open_(pid, "y", dirfd=fd, ret=-1)) == f"{tmp_path}/y"
    finally:
        os.close(fd)


def test_exit_forgets_the_process(r):
    annotated(r, _task("exit", PARENT))
    assert PARENT not in r.processes
    assert resolved(r, open_(PARENT, "x")) is None
    annotated(r, _task("exit", CHILD + 99))  # never seen: no error


def test_least_recently_used_process_is_evicted():
    r = Resolver(max_processes=2)
    for pid in (PARENT, CHILD, CHILD + 1):
        resolved(r, chdir(pid, f"/p{pid}"))
    assert list(r.processes) == [CHILD, CHILD + 1]
    resolved(r, open_(CHILD, "x"))  # touch CHILD
    resolved(r, chdir(CHILD + 2, "/q"))
    assert list(r.processes) == [CHILD, CHILD + 2]


def test_non_utf8_paths_round_trip_as_bytes(r):
    assert resolved(r, open_(PARENT, b"/tmp/\xff//x")) == b"/tmp/\xff/x"
    assert resolved(r, open_(PARENT, b"caf\xe9")) == b"/home/agent/caf\xe9"
    # valid UTF-8 given as bytes comes back as str
    assert resolved(r, open_(PARENT, "é".encode())) == "/home/agent/é"
    assert resolved(r, chdir(PARENT, b"/data/\xfe\xff")) == b"/data/\xfe\xff"
    assert resolved(r, open_(PARENT, "plain")) == b"/data/\xfe\xff/plain"
    assert resolved(r, open_(PARENT, b"..")) == "/data"
    assert resolved(r, open_(PARENT, b"\x80", ret=9, flags=O_DIRECTORY)) == b"/data/\xfe\xff/\x80"
    assert resolved(r, open_(PARENT, "f", dirfd=9)) == b"/data/\xfe\xff/\x80/f"
    e = annotated(r, exec_(PARENT, b"./\xff", exec_path=b"./\xff"))
    assert e["resolved_filename"] == e["resolved_exec_path"] == b"/data/\xfe\xff/\xff"


def test_fts_walks_through_a_copied_directory_fd(r):
    """grep -r, find, rm -r: open a directory, copy the fd with
    fcntl(F_DUPFD_CLOEXEC), close the original, open entries relative to the copy."""
    assert resolved(r, open_(PARENT, "src", ret=3, flags=O_DIRECTORY | O_CLOEXEC)) == "/home/agent/src"
    copy = annotated(r, fd_(PARENT, "fcntl_dupfd_cloexec", 3, ret=4, arg=3, cloexec=True))
    assert copy["resolved_path"] == "/home/agent/src"
    assert annotated(r, fd_(PARENT, "close", 3))["resolved_path"] == "/home/agent/src"
    assert resolved(r, open_(PARENT, "note47.txt", dirfd=4, ret=3)) == "/home/agent/src/note47.txt"
    assert resolved(r, open_(PARENT, "d0", dirfd=4, ret=5, flags=O_DIRECTORY)) == "/home/agent/src/d0"
    assert resolved(r, fchdir(PARENT, 5)) == "/home/agent/src/d0"
    assert resolved(r, open_(PARENT, "x")) == "/home/agent/src/d0/x"


@pytest.mark.parametrize("syscall,cloexec", [("dup", False), ("dup2", False), ("dup3", True),
                                             ("fcntl_dupfd", False), ("fcntl_dupfd_cloexec", True)])
def test_every_copy_names_the_same_file_and_keeps_its_own_cloexec(r, syscall, cloexec):
    resolved(r, open_(PARENT, "/srv", ret=3, flags=O_DIRECTORY | O_CLOEXEC))
    annotated(r, fd_(PARENT, syscall, 3, ret=9, arg=9, cloexec=cloexec))
    assert resolved(r, open_(PARENT, "a", dirfd=9, ret=-1)) == "/srv/a"
    annotated(r, exec_(PARENT, "/usr/bin/true"))
    assert resolved(r, open_(PARENT, "a", dirfd=9, ret=-1)) == (None if cloexec else "/srv/a")
    assert resolved(r, open_(PARENT, "a", dirfd=3, ret=-1)) is None


def test_dup2_replaces_what_the_target_fd_named(r):
    resolved(r, open_(PARENT, "/a", ret=3, flags=O_DIRECTORY))
    resolved(r, open_(PARENT, "/b", ret=4, flags=O_DIRECTORY))
    annotated(r, fd_(PARENT, "dup2", 3, ret=4, arg=4))
    assert resolved(r, open_(PARENT, "x", dirfd=4, ret=-1)) == "/a/x"
    # onto itself: nothing changes, not even close-on-exec
    resolved(r, open_(PARENT, "/c", ret=5, flags=O_DIRECTORY | O_CLOEXEC))
    annotated(r, fd_(PARENT, "dup2", 5, ret=5, arg=5))
    assert r.processes[PARENT].fds[5] == Descriptor("/c", True)


def test_fcntl_setfd_changes_close_on_exec(r):
    resolved(r, open_(PARENT, "/keep", ret=3, flags=O_DIRECTORY | O_CLOEXEC))
    resolved(r, open_(PARENT, "/drop", ret=4, flags=O_DIRECTORY))
    annotated(r, fd_(PARENT, "fcntl_setfd", 3, arg=0))
    annotated(r, fd_(PARENT, "fcntl_setfd", 4, arg=1))
    annotated(r, exec_(PARENT, "/usr/bin/true"))
    assert set(r.processes[PARENT].fds) == {3}


def test_a_closed_fd_number_reused_by_an_unfollowed_call_is_unknown(r):
    """A socket or pipe takes a closed number: the old path must not stick to it."""
    resolved(r, open_(PARENT, "/allowed", ret=3, flags=O_DIRECTORY))
    annotated(r, fd_(PARENT, "close", 3, ret=-4))  # EINTR: closed all the same
    assert resolved(r, open_(PARENT, "key", dirfd=3, ret=-1)) is None


def test_an_fd_opened_through_an_unresolvable_path_forgets_the_old_one(r):
    resolved(r, open_(PARENT, "/allowed", ret=3, flags=O_DIRECTORY))
    resolved(r, open_(PARENT, "/x", ret=3, unreadable=True))
    assert resolved(r, open_(PARENT, "key", dirfd=3, ret=-1)) is None
    # and a copy of an fd the model cannot name is unknown too
    resolved(r, open_(PARENT, "/allowed", ret=4, flags=O_DIRECTORY))
    annotated(r, fd_(PARENT, "dup2", 3, ret=4, arg=4))
    assert resolved(r, open_(PARENT, "key", dirfd=4, ret=-1)) is None


@pytest.mark.parametrize("cloexec", [False, True])
def test_close_range(r, cloexec):
    for fd, path in ((3, "/a"), (4, "/b"), (8, "/c")):
        resolved(r, open_(PARENT, path, ret=fd, flags=O_DIRECTORY))
    annotated(r, fd_(PARENT, "close_range", 4, arg=0xFFFFFFFF, cloexec=cloexec))
    fds = r.processes[PARENT].fds
    if cloexec:
        assert fds == {3: Descriptor("/a", False), 4: Descriptor("/b", True), 8: Descriptor("/c", True)}
    else:
        assert fds == {3: Descriptor("/a", False)}


def test_pidfd_getfd_copies_the_other_process_fd(r):
    other = CHILD + 7
    resolved(r, chdir(other, "/"))
    resolved(r, open_(other, "/etc", ret=5, flags=O_DIRECTORY))
    annotated(r, fd_(PARENT, "pidfd_open", -1, ret=6, arg=other, cloexec=True))
    assert resolved(r, open_(PARENT, "x", dirfd=6, ret=-1)) is None  # a pidfd is no directory
    annotated(r, fd_(PARENT, "dup", 6, ret=7))  # a copy of a pidfd is a pidfd
    got = annotated(r, fd_(PARENT, "pidfd_getfd", 7, ret=8, arg=5, cloexec=True))
    assert got["resolved_path"] == "/etc"
    assert resolved(r, open_(PARENT, "passwd", dirfd=8, ret=-1)) == "/etc/passwd"
    # a pidfd of a process never seen: /proc, which has nothing here
    annotated(r, fd_(PARENT, "pidfd_open", -1, ret=9, arg=CHILD + 8, cloexec=True))
    assert annotated(r, fd_(PARENT, "pidfd_getfd", 9, ret=10, arg=5, cloexec=True))["resolved_path"] is None


def test_fork_inherits_copied_fds(r):
    resolved(r, open_(PARENT, "/srv", ret=3, flags=O_DIRECTORY))
    annotated(r, fd_(PARENT, "dup", 3, ret=4))
    annotated(r, fork(PARENT, CHILD))
    annotated(r, fd_(PARENT, "close", 4))
    assert resolved(r, open_(CHILD, "a", dirfd=4, ret=-1)) == "/srv/a"
    assert resolved(r, open_(PARENT, "a", dirfd=4, ret=-1)) is None


def change(pid, syscall, path="", path2="", dirfd=AT_FDCWD, dirfd2=AT_FDCWD, **flags):
    return _task("change", pid, syscall=syscall, path=path, dirfd=dirfd, path2=path2, dirfd2=dirfd2,
                 path_unreadable=flags.get("unreadable", False), path_truncated=False,
                 path2_unreadable=flags.get("unreadable2", False), path2_truncated=False)


def test_changes_resolve_both_paths_against_their_dirfds():
    r = Resolver()
    r.annotate(chdir(PARENT, "/work"))
    r.annotate(open_(PARENT, "/src", ret=5, flags=O_DIRECTORY))
    rename = change(PARENT, "renameat2", "a", "../dst/b", dirfd=5)
    r.annotate(rename)
    assert (rename["resolved_path"], rename["resolved_path2"]) == ("/src/a", "/dst/b")
    unlink = change(PARENT, "unlink", "x/../y")
    r.annotate(unlink)
    assert (unlink["resolved_path"], unlink["resolved_path2"]) == ("/work/y", None)
    # an unreadable second path is unresolved, never guessed
    link = change(PARENT, "linkat", "/etc/passwd", "p", dirfd2=5, unreadable2=True)
    r.annotate(link)
    assert (link["resolved_path"], link["resolved_path2"]) == ("/etc/passwd", None)


def test_fd_changes_and_fd_links_name_the_fds_file():
    """ftruncate/fchmod/fchown have no path: their fd's file. /proc/self/fd/N
    (glibc's fchmodat without fchmodat2) names the process's own fd N."""
    r = Resolver()
    r.annotate(chdir(PARENT, "/work"))
    r.annotate(open_(PARENT, "notes.txt", ret=4, flags=os.O_WRONLY))
    r.annotate(open_(PARENT, "/etc/shadow", ret=5, flags=os.O_PATH))
    written = change(PARENT, "fchmod", dirfd=4)
    r.annotate(written)
    assert (written["resolved_path"], written["fd_opened_for_writing"]) == ("/work/notes.txt", True)
    read_only = change(PARENT, "fchown", dirfd=5)
    r.annotate(read_only)
    assert (read_only["resolved_path"], read_only["fd_opened_for_writing"]) == ("/etc/shadow", False)
    for record, expected in [(change(PARENT, "ftruncate", dirfd=4), "/work/notes.txt"),
                             (change(PARENT, "fchmodat", "/proc/self/fd/5"), "/etc/shadow"),
                             (change(PARENT, "chmod", f"/proc/{PARENT}/fd/5"), "/etc/shadow"),
                             (change(PARENT, "chmod", "/proc/1/fd/5"), "/proc/1/fd/5"),  # another's: lexical
                             (change(PARENT, "fchown", dirfd=9), None)]:               # unknown fd
        r.annotate(record)
        assert record["resolved_path"] == expected, record


def test_a_symlinks_content_resolves_against_the_links_directory():
    r = Resolver()
    r.annotate(chdir(PARENT, "/work"))
    record = change(PARENT, "symlinkat", "../secret/key", "links/k")
    r.annotate(record)
    assert (record["resolved_path"], record["resolved_path2"]) == ("/work/secret/key", "/work/links/k")
    absolute = change(PARENT, "symlink", "/etc/shadow", "/tmp/s")
    r.annotate(absolute)
    assert absolute["resolved_path"] == "/etc/shadow"


def test_an_unfollowed_fd_is_forgotten_since_its_close_is_never_seen():
    """The kernel skips closes and copies of fds it does not follow and marks
    the open or copy that made one (fd_unfollowed): the model forgets the
    number, so that what later takes it unseen (a memfd, a socket, a received
    dir fd) is not taken for that file."""
    r = Resolver()
    r.annotate(chdir(PARENT, "/work"))
    r.annotate(open_(PARENT, "/allowed", ret=3, flags=O_DIRECTORY))
    r.annotate({**open_(PARENT, "/etc/plain", ret=3), "fd_unfollowed": True})   # its close is never seen
    assert 3 not in r.processes[PARENT].fds
    truncated = change(PARENT, "ftruncate", dirfd=3)     # a memfd at 3 by now
    r.annotate(truncated)
    assert truncated["resolved_path"] is None
    assert resolved(r, open_(PARENT, "key", dirfd=3, ret=-1)) is None
    # a copy the kernel marks (made while the table was shared) is forgotten too,
    # and it still replaces what its number named
    r.annotate(open_(PARENT, "/allowed", ret=4, flags=O_DIRECTORY))
    r.annotate({**fd_(PARENT, "dup2", 6, ret=4, arg=4), "fd_unfollowed": True})
    assert 4 not in r.processes[PARENT].fds
    # an open the kernel does not mark (a directory, a writer, O_PATH) is followed
    r.annotate(open_(PARENT, "/etc", ret=5))
    assert resolved(r, open_(PARENT, "hosts", dirfd=5)) == "/etc/hosts"


def test_an_unfollowed_fd_named_by_an_fd_call_is_what_proc_confirms(tmp_path):
    """fchmod, fchown, fexecve or /proc/self/fd/N on a read-only regular file:
    the model has the open's path as a claim, used only when /proc still shows
    it; an agent that closes the fd and opens another file at its number
    before the daemon looks (the close is never seen) gets no path at all."""
    me = os.getpid()
    forbidden, allowed = tmp_path / "forbidden", tmp_path / "allowed"
    forbidden.write_text("f")
    allowed.write_text("a")
    r = Resolver()
    r.annotate(chdir(me, str(tmp_path)))
    fd = os.open(forbidden, os.O_RDONLY)
    try:
        r.annotate({**open_(me, "forbidden", ret=fd), "fd_unfollowed": True})
        assert fd not in r.processes[me].fds
        for record in (change(me, "fchmod", dirfd=fd), change(me, "chmod", f"/proc/self/fd/{fd}")):
            r.annotate(record)
            assert record["resolved_path"] == str(forbidden)
        fchown = change(me, "fchown", dirfd=fd)   # the daemon looks after the swap below
        os.close(fd)
        assert os.open(allowed, os.O_RDONLY) == fd
        r.annotate(fchown)
        assert fchown["resolved_path"] is None
        # a copy made in a shared table names the claim too; a seen close drops it
        r.annotate({**open_(me, "allowed", ret=fd), "fd_unfollowed": True})
        copy = os.dup(fd)
        r.annotate({**fd_(me, "dup", fd, ret=copy), "fd_unfollowed": True})
        assert r.processes[me].claims[copy] == str(allowed)
        os.close(copy)
        r.annotate(fd_(me, "close", copy))
        assert copy not in r.processes[me].claims
    finally:
        os.close(fd)
