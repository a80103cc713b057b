"""A performed write-open (daemon/supervisor/perform.py, and its C twin in
daemon/fastpath.c) is made with the credentials the task has at that call:
the supervisor switches only what differs from its own, so what a task
dropped between two writes must never be used for the second, and what one
task of a session had must never carry over to another's call.

Real tasks under `agentwarden run` (python3 as root): they drop groups, gid
and uid, or one capability, or change their umask, between writes to real
directories whose permissions tell the credentials apart; once with the
compiled fast path (the shared warden) and once with Python alone."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import textwrap
from pathlib import Path

import pytest

from test_kernel_sessions import _name, _policy, start_run, supervisor_health, warden_of_its_own
from test_kernel_writerace import performed

pytestmark = pytest.mark.kernel

NOBODY = 65534
PYTHON = ["/usr/bin/*"]

# Run as root in the session. Prints one line per write: "<name> ok <uid> <mode>" or "<name> EACCES".
TASK = textwrap.dedent(r"""
    import ctypes, os, sys
    root_only, nobodys, shared = sys.argv[1:4]

    def say(*words):   # one write(2) per line: parent and child share the pipe
        os.write(1, (" ".join(map(str, words)) + "\n").encode())

    def write(path, name):
        try:
            with open(os.path.join(path, name), "w") as f:
                f.write(name)
        except PermissionError:
            say(name, "EACCES")
            return
        try:
            st = os.stat(os.path.join(path, name))
        except PermissionError:   # made, but not by these credentials
            say(name, "made-unseen")
            return
        say(name, "ok", st.st_uid, oct(st.st_mode & 0o777))

    # 1. umask between two writes: the second file has the new one.
    os.umask(0o000)
    write(shared, "umask-000")
    os.umask(0o077)
    write(shared, "umask-077")
    os.umask(0o022)

    # 2. one capability dropped: root writing into nobody's 0700 directory
    #    needs CAP_DAC_OVERRIDE; without it the same write is refused.
    write(nobodys, "with-dac-override")
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()
    assert libc.capget(ctypes.byref(header), data) == 0
    CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2
    data[0].effective &= ~((1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH))
    assert libc.capset(ctypes.byref(header), data) == 0, ctypes.get_errno()
    write(nobodys, "without-dac-override")
    data[0].effective |= (1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH)   # from permitted
    assert libc.capset(ctypes.byref(header), data) == 0, ctypes.get_errno()
    write(nobodys, "dac-override-again")

    # 3. a child drops to nobody; parent (root) and child take turns: the
    #    child's writes are nobody's every time, right after root's.
    to_child, from_parent = os.pipe()
    to_parent, from_child = os.pipe()
    pid = os.fork()
    if pid == 0:
        write(root_only, "child-still-root")
        os.setgroups([])
        os.setgid(NOBODY := 65534)
        os.setuid(NOBODY)
        for i in range(20):
            os.read(to_child, 1)
            write(root_only, f"nobody-{i}")
            write(shared, f"nobody-shared-{i}")
            os.write(from_child, b"x")
        os._exit(0)
    for i in range(20):
        write(root_only, f"root-{i}")
        os.write(from_parent, b"x")
        os.read(to_parent, 1)
    _, status = os.waitpid(pid, 0)
    # 4. the parent drops too, and cannot come back.
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    write(root_only, "parent-as-nobody")
    try:
        os.setuid(0)
        say("regained root")
    except PermissionError:
        pass
    write(root_only, "parent-still-nobody")
    sys.exit(os.waitstatus_to_exitcode(status))
""")


@contextlib.contextmanager
def _shared_warden(warden, agent_cgroup, tmp_path):
    agent = _name("creds")
    agent_cgroup(agent)
    yield warden, agent


@pytest.fixture
def dirs():
    """In a directory nobody can reach (pytest's are root's alone)."""
    base = Path(tempfile.mkdtemp(prefix="aw-creds-", dir="/tmp"))
    base.chmod(0o755)
    out = {"root_only": base / "root-only", "nobodys": base / "nobodys", "shared": base / "shared"}
    out["root_only"].mkdir(mode=0o700)
    out["nobodys"].mkdir(mode=0o700)
    os.chown(out["nobodys"], NOBODY, NOBODY)
    out["shared"].mkdir()
    out["shared"].chmod(0o777)
    yield out
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("side", ["fast path", "python"])
def test_a_task_that_drops_credentials_has_its_next_write_made_with_the_lesser_ones(
        side, warden, agent_cgroup, tmp_path, dirs):
    own = (warden_of_its_own(agent_cgroup, tmp_path, "credspy", {"AGENTWARDEN_EXEC_FAST_PATH": "false"})
           if side == "python" else _shared_warden(warden, agent_cgroup, tmp_path))
    with own as (w, agent):
        w.set_policy(agent, _policy(agent, on_violation="alert", exec_allow=PYTHON,
                                    write_allow=[f"{d}/**" for d in dirs.values()]))
        before = performed(supervisor_health(w))
        proc = start_run(w, agent, ["/usr/bin/python3", "-c", TASK, str(dirs["root_only"]), str(dirs["nobodys"]),
                                    str(dirs["shared"])])
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        # Every write above was performed by the supervisor, none continued.
        writes = len(out.splitlines())
        supervisor_health(w, lambda h: performed(h) >= before + writes)
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert "child-still-root" in lines, out
    assert "regained" not in out
    assert lines["umask-000"] == "ok 0 0o666" and lines["umask-077"] == "ok 0 0o600"
    assert lines["with-dac-override"] == "ok 0 0o644"
    assert lines["without-dac-override"] == "EACCES"
    assert lines["dac-override-again"] == "ok 0 0o644"
    assert lines["child-still-root"].startswith("ok 0 ")
    for i in range(20):
        assert lines[f"root-{i}"].startswith("ok 0 "), (i, lines[f"root-{i}"])
        assert lines[f"nobody-{i}"] == "EACCES", (i, lines[f"nobody-{i}"])
        assert lines[f"nobody-shared-{i}"] == f"ok {NOBODY} 0o644", (i, lines[f"nobody-shared-{i}"])
    assert lines["parent-as-nobody"] == "EACCES" and lines["parent-still-nobody"] == "EACCES"
    # Nothing appeared where the task was refused.
    assert not (dirs["nobodys"] / "without-dac-override").exists()
    assert not any(p.name.startswith(("nobody-", "parent-")) for p in dirs["root_only"].iterdir())
