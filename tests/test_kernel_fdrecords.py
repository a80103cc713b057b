"""The kernel skips the fd records user space does not need -- the closes,
copies and F_SETFD of read-only regular files, devices, pipes and sockets --
and counts them (`kernel_fd_skipped`), while every path of real tools still
resolves and the fds user space follows (directories, regular files opened
for writing, O_PATH fds, anon inodes, any fd of a shared table) keep their
records, whatever order an agent makes, copies and closes them in."""
from __future__ import annotations

import json
import sys
import uuid

import pytest

from conftest import events_of, wait_for
from test_kernel_enforce import _policy, _violations
from test_kernel_realtools import DRIVER, PY, TOOLS, _tree

pytestmark = pytest.mark.kernel


def _skipped(warden) -> int:
    return warden.status()["probe"]["health"]["kernel_fd_skipped"]


def test_tools_resolve_every_path_and_skipped_fd_records_are_counted(warden, agent_cgroup, tmp_path):
    agent = f"fdrec-{uuid.uuid4().hex[:6]}"
    cg = agent_cgroup(agent)
    work = tmp_path / "work"
    src = work / "src"
    count = _tree(src)
    (work / "tmp").mkdir()
    warden.set_policy(agent, _policy(agent, "enforce", "kill", TOOLS, read_allow=["/**"],
                                     write_allow=[f"{work}/**", "/dev/null"]))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "LC_ALL": "C"}
    steps = [
        ("grep -r", ["grep", "-r", "-l", "needle", "src"], work),
        ("find", ["find", "src", "-name", "*.txt"], work),
        ("cp -r", ["cp", "-r", "src", "copy"], work),
        ("tar create", ["tar", "-cf", "src.tar", "src"], work),
        ("tar extract", ["tar", "-xf", "src.tar", "-C", "tmp"], work),
        ("rm -r", ["rm", "-r", "copy", "tmp/src"], work),
    ]
    warden.settle()
    before = _skipped(warden)
    driver = cg.run([PY, "-c", DRIVER], cwd=work, env=env, timeout=300,
                    input=json.dumps([[name, argv, str(cwd), env] for name, argv, cwd in steps]).encode())
    assert driver.returncode == 0, driver.stderr.decode(errors="replace")
    results = json.loads(driver.stdout)
    assert {name: r[0] for name, r in results.items()} == {name: 0 for name, _, _ in steps}, results
    warden.settle()
    # The last step's records, read back once archived (settle() follows the
    # probe's counts; once, in a full run, the archive did not hold rm's yet).
    expected_unlinks = {str(work / "copy" / p.relative_to(src)) for p in src.rglob("*.txt")}

    def tools_records() -> list[dict] | None:
        tools = [r for r in events_of(warden.records(), cg.id) if r.get("comm") in ("grep", "find", "cp", "tar", "rm")]
        unlinked = {r.get("resolved_path") for r in tools if r["comm"] == "rm" and r["kind"] == "change"}
        return tools if expected_unlinks <= unlinked else None
    tools = wait_for(tools_records, timeout=60, interval=0.5, what="rm's unlink records in the archive")
    skipped = _skipped(warden) - before
    assert _violations(warden, agent) == []

    # Every path the tools named resolves, to where it is.
    unresolved = [(r["comm"], r["kind"], r.get("syscall"), r["path"]) for r in tools
                  if r["kind"] in ("open", "change", "chdir") and r["ret"] >= 0 and r["path"]
                  and not r.get("resolved_path")]
    assert unresolved == []
    grep_opens = {r["resolved_path"] for r in tools if r["comm"] == "grep" and r["kind"] == "open"}
    assert {str(p) for p in src.rglob("*.txt")} <= grep_opens
    rm_unlinks = {r["resolved_path"] for r in tools if r["comm"] == "rm" and r["kind"] == "change"}
    assert expected_unlinks <= rm_unlinks

    # The files under src are only read: no record of a close or copy of
    # theirs went out (each was counted instead; grep alone closes one per file).
    sent = [(r["comm"], r["syscall"], r["resolved_path"]) for r in tools if r["kind"] == "fd"
            and (r.get("resolved_path") or "").endswith(".txt")
            and r["resolved_path"].startswith(str(src))]
    assert sent == []
    marked = sum(1 for r in tools if r["kind"] == "open" and r.get("fd_unfollowed"))
    assert marked >= count and skipped >= count, (marked, skipped, count)
    # Directory fds keep their records: fts's copies and closes of them resolve.
    dir_closes = {r["resolved_path"] for r in tools if r["kind"] == "fd" and r["syscall"] == "close"
                  and r["comm"] in ("find", "rm")}
    assert str(src / "d0") in dir_closes


HOSTILE = """
import ctypes, errno, fcntl, os, socket, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
base, plain_path, other_path = sys.argv[1:4]
def attempt(name, dirfd):
    try:
        os.close(os.open(name, os.O_RDONLY, dir_fd=dirfd))
    except OSError as e:
        assert e.errno in (errno.ENOTDIR, errno.EBADF, errno.ENOENT), e
plain = os.open(plain_path, os.O_RDONLY)
d = os.open(base, os.O_RDONLY)                      # a directory, without O_DIRECTORY
attempt("through-plain", plain)                     # ENOTDIR
high = os.dup2(d, 200)                              # a dir copied to a high number
attempt("a", high)
os.dup2(plain, 200)                                 # a plain file over the dir copy
attempt("b", 200)                                   # ENOTDIR: not base/b
cloexec = fcntl.fcntl(d, fcntl.F_DUPFD_CLOEXEC, 300)
attempt("c", cloexec)
libc.syscall(436, 300, 300, 0)                      # close_range(300, 300)
attempt("d", 300)                                   # EBADF: not base/d
pipe_r, pipe_w = os.pipe()
dir_copy = os.dup2(d, 400)
os.dup2(pipe_r, 400)                                # a pipe over a followed fd
attempt("e", 400)                                   # ENOTDIR: not base/e
null = os.open("/dev/null", os.O_WRONLY)            # a device, even written: unfollowed
os.dup2(null, 1)
os.close(null)
opath = os.open(plain_path, os.O_PATH)
os.chmod(f"/proc/self/fd/{opath}", 0o640)           # glibc's fchmodat fallback, through O_PATH
number = os.open(other_path, os.O_RDONLY)
os.close(number)                                    # skipped: the model forgot it at the open
memfd = os.memfd_create("x")
assert memfd == number
os.ftruncate(memfd, 10)                             # not a truncation of other_path
victim = os.open(plain_path, os.O_RDONLY)
os.fchmod(victim, 0o600)                            # a change of plain.txt ...
os.close(victim)                                    # skipped
swapped = os.open(os.path.join(base, "swap.txt"), os.O_RDONLY)
assert swapped == victim                            # ... never told as one of swap.txt
w = os.open(os.path.join(base, "written"), os.O_WRONLY | os.O_CREAT, 0o600)
os.close(w)
stop = threading.Event()
t = threading.Thread(target=stop.wait)
t.start()                                           # the table is shared now
shared = os.open(plain_path, os.O_RDONLY)
os.close(shared)
stop.set(); t.join()
print(json.dumps({"plain": plain, "d": d, "opath": opath, "memfd": memfd, "shared": shared,
                  "pipe_r": pipe_r}), file=sys.stderr)
""".replace("import ctypes", "import json, ctypes")


def test_an_agent_cannot_hide_a_followed_fd_behind_the_rule(warden, agent_cgroup, tmp_path):
    """dup2 of a dir to a high number, a plain file or a pipe dup2'd over it,
    F_DUPFD_CLOEXEC, close_range, an O_PATH fd, a number a memfd takes after
    a skipped close, fchmod of a plain fd whose number another file takes at
    once, and a table shared by a thread: every path resolves to what the fd
    names then, or not at all."""
    cg = agent_cgroup("fdhostile")
    base = tmp_path / "base"
    base.mkdir()
    plain, other = base / "plain.txt", base / "other.txt"
    plain.write_text("p\n")
    other.write_text("o\n")
    (base / "swap.txt").write_text("s\n")
    warden.settle()
    before = _skipped(warden)
    result = cg.run([sys.executable, "-S", "-c", HOSTILE, str(base), str(plain), str(other)])
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    fds = json.loads(result.stderr.decode().splitlines()[-1])
    warden.settle()
    records = events_of(warden.records(), cg.id)
    opens = {r["path"]: r for r in records if r["kind"] == "open"}
    assert opens["a"]["resolved_path"] == str(base / "a")
    assert opens["c"]["resolved_path"] == str(base / "c")
    assert opens["b"]["resolved_path"] != str(base / "b")
    assert opens["d"]["resolved_path"] is None
    assert opens["e"]["resolved_path"] != str(base / "e")
    assert opens["through-plain"]["resolved_path"] != str(base / "through-plain")
    # Which opens the kernel marked: the read-only regular files and the device, not the rest.
    assert opens[str(plain)]["fd_unfollowed"] and opens[str(other)]["fd_unfollowed"]
    assert opens["/dev/null"]["fd_unfollowed"]
    for followed in (str(base), str(base / "written")):
        assert "fd_unfollowed" not in opens[followed], followed
    [opath_open] = [r for r in records if r["kind"] == "open" and r["ret"] == fds["opath"]
                    and r["flags"] & 0o10000000]
    assert "fd_unfollowed" not in opath_open
    # The records that went out: the dir's copies, the plain file over a followed fd,
    # close_range, the writer's close, and the close of a shared table.
    fd_records = [(r["syscall"], r["fd"], r["ret"]) for r in records if r["kind"] == "fd"]
    assert ("dup2", fds["d"], 200) in fd_records
    assert ("dup2", fds["plain"], 200) in fd_records
    assert ("dup2", fds["pipe_r"], 400) in fd_records
    assert ("fcntl_dupfd_cloexec", fds["d"], 300) in fd_records
    assert ("close_range", 300, 0) in fd_records
    assert ("close", fds["shared"], 0) in fd_records
    closes = [r for r in records if r["kind"] == "fd" and r["syscall"] == "close"]
    assert str(base / "written") in {r["resolved_path"] for r in closes}
    # ... and not the close of other.txt, whose number the memfd took.
    start = records.index(opens[str(other)])
    end = next(i for i, r in enumerate(records) if r["kind"] == "change" and r["syscall"] == "ftruncate")
    assert [r for r in records[start:end] if r["kind"] == "fd" and fds["memfd"] in (r["fd"], r["ret"])] == []
    changes = {r["syscall"]: r for r in records if r["kind"] == "change"}
    assert changes["chmod"]["resolved_path"] == str(plain)
    assert changes["fchmod"]["resolved_path"] in (str(plain), None)
    assert changes["ftruncate"]["dirfd"] == fds["memfd"]
    assert changes["ftruncate"]["resolved_path"] != str(other)
    assert _skipped(warden) - before >= 1
