"""File changes under `agentwarden run` without a race: the supervisor
performs an allowed write-open, rename, unlink or truncate itself, on the path
it checked (daemon/supervisor/perform.py), so a thread that swaps the path
buffer after the check changes nothing it was not allowed to.

Real attacker (tests/attackers/write_race.c: a thread flipping a path buffer
between an allowed and two forbidden paths while eight threads open, creat,
openat2, truncate, rename and unlink through it), real tools (sed -i, cp,
tar x, git commit, >>, touch, mkdir -p, rm -r) whose results under `run --user
nobody` must equal the same script's run bare as nobody: content, mode, owner.
A control run with perform_file_changes = false shows the attacker wins
there: the test can fail."""
from __future__ import annotations

import hashlib
import os
import stat
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from test_kernel_sessions import SHELL, _name, _policy, start_run, supervisor_health, warden_of_its_own

pytestmark = pytest.mark.kernel

ATTACKER = Path(__file__).parent / "attackers" / "write_race.c"
RACE_SECONDS = 10
TOOLS = ["/usr/bin/*", "/bin/*", "/usr/sbin/*", "/usr/lib/git-core/*"]
NOBODY = 65534


@pytest.fixture(scope="module")
def racer(tmp_path_factory) -> Path:
    binary = tmp_path_factory.mktemp("racer") / "write_race"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(binary), str(ATTACKER)], check=True)
    binary.chmod(0o755)
    binary.parent.chmod(0o755)
    return binary


def _battlefield(tmp_path: Path) -> dict:
    """ok/ (writes allowed), no/ (forbidden): a file there, a name that must never appear."""
    ok, no = tmp_path / "ok", tmp_path / "no"
    ok.mkdir()
    no.mkdir()
    forbidden = no / "file"
    forbidden.write_text("the original\n")
    os.utime(forbidden, (1_000_000_000, 1_000_000_000))
    return {"allowed": ok / "file", "forbidden": forbidden, "missing": no / "made",
            "spare": ok / "spare", "no": no}


def _state(f: dict) -> tuple:
    st = f["forbidden"].stat()
    return (f["forbidden"].read_bytes(), st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode,
            sorted(os.listdir(f["no"])))


def performed(health: dict) -> int:
    """Calls performed for tasks: by the supervisor's Python and its fast path."""
    return health.get("performed", 0) + health.get("fast", {}).get("performed", 0)


def _race(warden, agent: str, racer: Path, f: dict) -> tuple[int, int]:
    proc = start_run(warden, agent, [str(racer), str(f["allowed"]), str(f["forbidden"]), str(f["missing"])
                                     [:len(str(f["allowed"]))], str(f["spare"]), str(RACE_SECONDS)])
    out, err = proc.communicate(timeout=RACE_SECONDS + 120)
    assert proc.returncode == 0, err[-2000:]
    _, calls, _, ok = out.split()
    return int(calls), int(ok)


def test_a_thread_flipping_the_path_never_changes_the_forbidden_file(warden, agent_cgroup, racer, tmp_path):
    agent = _name("race")
    cg = agent_cgroup(agent)
    f = _battlefield(tmp_path)
    # "missing" has the allowed path's length: no/made is no/file's length too.
    assert len(str(f["missing"])) == len(str(f["allowed"])) == len(str(f["forbidden"]))
    # alert: a refused call fails with EPERM and the attacker races on for all 10 s.
    warden.set_policy(agent, _policy(agent, on_violation="alert", exec_allow=[str(racer)],
                                     write_allow=[f"{tmp_path}/ok/**"]))
    before = _state(f)
    performed_before = performed(supervisor_health(warden))
    calls, succeeded = _race(warden, agent, racer, f)
    # The forbidden file: same content, inode, mtime, size and mode; nothing new beside it.
    assert _state(f) == before
    assert not f["missing"].exists()
    # The race was on: thousands of calls, the allowed ones done, the swapped ones refused.
    assert calls > 1000 and succeeded > 100, (calls, succeeded)
    health = supervisor_health(warden, lambda h: performed(h) >= performed_before + succeeded // 2)
    assert health["refused"] > 0
    if health.get("fast_path") == "running":   # most opens done in C, the rest in Python
        assert health["fast"]["performed"] > 0 and health.get("performed", 0) > 0
    warden.settle()
    records = warden.records()
    done_records = [r for r in records if r.get("performed") and r.get("agent") == agent]
    assert done_records, "no record of a performed call"
    # Every performed call's record names an allowed path: what was done is what was checked.
    done = {r.get("resolved_path") for r in done_records if r["ret"] >= 0}
    assert done and all(p and p.startswith(f"{tmp_path}/ok/") for p in done), sorted(map(str, done))[:10]
    refusals = [r for r in records if r["kind"] == "violation" and r["agent"] == agent]
    assert refusals and all(r["action_taken"] == "refused: EPERM" for r in refusals)
    assert any(str(f["forbidden"]) in r["attempted"] for r in refusals)


def test_python_alone_performs_as_safely(kernel, agent_cgroup, racer, tmp_path):
    """Without the compiled fast path every call is performed in Python
    (perform.py): the same attacker, the same result."""
    f = _battlefield(tmp_path)
    with warden_of_its_own(agent_cgroup, tmp_path, "py", {"AGENTWARDEN_EXEC_FAST_PATH": "false"}) as (warden, agent):
        warden.set_policy(agent, _policy(agent, on_violation="alert", exec_allow=[str(racer)],
                                         write_allow=[f"{tmp_path}/ok/**"]))
        before = _state(f)
        calls, succeeded = _race(warden, agent, racer, f)
        assert _state(f) == before and not f["missing"].exists()
        assert calls > 1000 and succeeded > 100, (calls, succeeded)
        assert supervisor_health(warden, lambda h: h.get("performed", 0) >= succeeded // 2)


def test_with_continue_the_same_attacker_wins(kernel, agent_cgroup, racer, tmp_path):
    """The control: letting calls continue after the check (the old way) is
    raced within the same 10 s, so the test above can fail."""
    f = _battlefield(tmp_path)
    env = {"AGENTWARDEN_PERFORM_FILE_CHANGES": "false"}
    with warden_of_its_own(agent_cgroup, tmp_path, "cont", env) as (warden, agent):
        warden.set_policy(agent, _policy(agent, on_violation="alert", exec_allow=[str(racer)],
                                         write_allow=[f"{tmp_path}/ok/**"]))
        before = _state(f)
        _race(warden, agent, racer, f)
        assert not f["forbidden"].exists() or _state(f) != before or f["missing"].exists()


# ---- real tools: the same results as without agentwarden ------------------------------------

SCRIPT = r"""
set -e
umask 027
mkdir -p a/b/c
echo one > a/f
echo x >> a/f
touch a/b/t
sed -i s/one/two/ a/f
cp a/f a/b/c/g
cp -r a a2
tar xf "$ARCHIVE" -C a2
mkdir repo
cd repo
git init -q .
echo hi > r
git add r
git commit -q -m message
git rev-parse HEAD
cd ..
rm -r a2/b
cat a/f
# the subshell's stdout is a pipe nobody's shell made: nobody may reopen it
cat a/f | (cat > /dev/stdout) | cat > a/reopened
echo gone > /dev/null
ln -s a/f link
mv a/b/t a/b/t2
"""


def _tree(root: Path) -> dict:
    """Every entry below root: type, mode, owner; content outside .git (whose
    index holds inode numbers and times)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        st = path.lstat()
        content = None
        if stat.S_ISREG(st.st_mode) and "/.git/" not in f"/{rel}":
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(path)
        out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, content)
    return out


@pytest.fixture
def shared_tmp():
    """A directory nobody can reach (pytest's are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="aw-writerace-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_real_tools_under_run_as_nobody_give_what_they_give_without_it(warden, agent_cgroup, shared_tmp):
    agent = _name("tools")
    agent_cgroup(agent)
    tmp_path = shared_tmp
    source = tmp_path / "src"
    (source / "d").mkdir(parents=True)
    (source / "d" / "x").write_text("from tar\n")
    (source / "d" / "x").chmod(0o751)
    os.utime(source / "d" / "x", (1_500_000_000, 1_500_000_000))
    archive = tmp_path / "t.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(source / "d", arcname="d")
    archive.chmod(0o644)
    bare, held = tmp_path / "bare", tmp_path / "held"
    for work in (bare, held):
        work.mkdir()
        os.chown(work, NOBODY, NOBODY)
    warden.set_policy(agent, _policy(agent, on_violation="alert", exec_allow=TOOLS + SHELL,
                                     write_allow=[f"{held}/**", "/dev/null", "/dev/stdout"]))
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "ARCHIVE": str(archive), "LANG": "C",
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org",
           "GIT_AUTHOR_DATE": "2024-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2024-01-01T00:00:00Z"}
    command = ["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items()), "/bin/sh", "-c", SCRIPT]
    plain = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--init-groups", *command],
                           cwd=bare, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr
    performed_before = performed(supervisor_health(warden))
    proc = subprocess.Popen([sys.executable, "-m", "agentwarden", "run", "--agent", agent,
                             "--user", "nobody", "--", *command], cwd=held, env=warden.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out == plain.stdout and "two\nx\n" in out
    assert _tree(held) == _tree(bare)
    owners = {(uid, gid) for _, _, uid, gid, _ in _tree(held).values()}
    assert owners == {(NOBODY, NOBODY)}
    assert _tree(held)["a/f"][1] == 0o640   # the task's umask 027, not the supervisor's
    assert (held / "a" / "reopened").read_text() == "two\nx\n"   # through /dev/stdout
    # Done by the supervisor, and not one false alarm.
    supervisor_health(warden, lambda h: performed(h) >= performed_before + 20)
    warden.settle()
    records = warden.records()
    violations = [r for r in records if r["kind"] == "violation" and r["agent"] == agent]
    assert violations == [], "\n".join(str(x) for x in [(r["kind"], r.get("syscall"), r.get("path"), r.get("ret"), r.get("performed"),
                               r.get("time")) for r in records if r.get("pid") == violations[0]["pid"]])


def test_a_task_in_a_mount_namespace_of_its_own_is_written_for_in_its_own(warden, agent_cgroup, tmp_path):
    """Another mount namespace (or a chroot): the supervisor takes the task's
    root for the call (perform.py chroots its thread into /proc/TID/root), so
    the write lands where the task's own would -- here on a tmpfs mounted in
    the task's namespace alone, which the supervisor's namespace does not have."""
    agent = _name("mntns")
    agent_cgroup(agent)
    ok = tmp_path / "ok"
    ok.mkdir()
    warden.set_policy(agent, _policy(agent, on_violation="alert", exec_allow=TOOLS + SHELL,
                                     write_allow=[f"{ok}/**"]))
    script = (f"mount -t tmpfs none {ok} && echo inside > {ok}/f && cat {ok}/f && "
              f"mv {ok}/f {ok}/g && ls {ok}")
    proc = start_run(warden, agent, ["/usr/bin/unshare", "-m", "--propagation", "private", "/bin/sh", "-c", script])
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out == "inside\ng\n"
    assert list(ok.iterdir()) == []   # the host's directory was never written
