"""The tools agents really run, in a real tagged agent cgroup whose policy
allows them, raise no false alarms: every path they open resolves.

fts-style tools (grep -r, find, rm -r) and tar open files relative to
directory descriptors they copied with fcntl(F_DUPFD_CLOEXEC) or dup; git,
make, compileall and pip fork, exec and use *at() calls of their own. The
policy kills on a violation, as an agent's would: an unresolved path would
kill the tool and fail it. The tools are started as an agent starts them: by
a process of its own (here a Python driver) with subprocess."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import textwrap
import uuid
import zipfile

import pytest

from test_kernel_enforce import _policy, _violations

pytestmark = pytest.mark.kernel

PY = "/usr/bin/python3"
TOOLS = ["/usr/bin/grep", "/usr/bin/find", "/usr/bin/rm", "/usr/bin/cp", "/usr/bin/tar",
         "/usr/bin/gzip", "/usr/bin/mkdir", "/usr/bin/git", "/usr/lib/git-core/**", "/usr/bin/make",
         "/usr/bin/python3*", "/usr/bin/sh", "/usr/bin/dash", "/bin/sh", "/bin/dash",
         # pip's user agent asks lsb_release, which runs these
         "/usr/bin/lsb_release", "/usr/bin/getopt", "/usr/bin/cut", "/usr/bin/tr", "/usr/bin/uname"]


# Runs [name, argv, cwd, env] steps from stdin; prints {name: [status, stdout, stderr tail]}.
DRIVER = """
import json, subprocess, sys
done = {}
for name, argv, cwd, env in json.load(sys.stdin):
    r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, timeout=120)
    done[name] = [r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")[-500:]]
json.dump(done, sys.stdout)
"""


def _tree(root, depth: int = 3, width: int = 3, files: int = 6) -> int:
    """Nested directories of small text files; returns how many files."""
    count = 0
    dirs = [root]
    for _ in range(depth):
        dirs = [d / f"d{i}" for d in dirs for i in range(width)]
        for d in dirs:
            d.mkdir(parents=True)
            for _ in range(files):
                (d / f"note{count}.txt").write_text(f"note {count}\nneedle\n")
                count += 1
    return count


def _wheel(directory, name: str = "awtiny", version: str = "1.0"):
    """A one-module wheel, written by hand (no build backend needed)."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": b"VALUE = 42\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    lines = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{path},sha256={digest},{len(data)}")
    files[f"{dist}/RECORD"] = ("\n".join(lines + [f"{dist}/RECORD,,"]) + "\n").encode()
    path = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for member, data in files.items():
            z.writestr(member, data)
    return path


def test_real_tools_raise_no_false_alarms(warden, agent_cgroup, tmp_path):
    agent = f"tools-{uuid.uuid4().hex[:6]}"
    cg = agent_cgroup(agent)
    work = tmp_path / "work"
    src = work / "src"
    count = _tree(src)
    (work / "tmp").mkdir()
    project = work / "project"
    (project / "pkg").mkdir(parents=True)
    (project / "pkg" / "__init__.py").write_text("")
    (project / "pkg" / "mod.py").write_text("def f():\n    return 1\n")
    (project / "in.txt").write_text("input\n")
    (project / "Makefile").write_text(textwrap.dedent("""\
        all: out/copy.txt out/count.txt
        out:
        \tmkdir -p out
        out/copy.txt: in.txt | out
        \tcp in.txt out/copy.txt
        out/count.txt: in.txt | out
        \tcd out && grep -c input ../in.txt > count.txt
        """))
    wheel = _wheel(tmp_path)
    warden.set_policy(agent, _policy(agent, "enforce", "kill", TOOLS, read_allow=["/**"],
                                     write_allow=[f"{work}/**", "/dev/null"]))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work / "tmp"), "LC_ALL": "C",
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "agent", "GIT_AUTHOR_EMAIL": "a@example.com",
           "GIT_COMMITTER_NAME": "agent", "GIT_COMMITTER_EMAIL": "a@example.com",
           "PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    steps = [
        ("grep -r", ["grep", "-r", "-l", "needle", str(src)], work),
        ("find", ["find", "src", "-name", "*.txt"], work),
        ("cp -r", ["cp", "-r", "src", "copy"], work),
        ("tar create", ["tar", "-cf", "src.tar", "src"], work),
        ("tar extract", ["tar", "-xf", "src.tar", "-C", "tmp"], work),
        ("rm -r", ["rm", "-r", "copy", "tmp/src"], work),
        ("git init", ["git", "init", "-q", "."], project),
        ("git add", ["git", "add", "-A"], project),
        ("git commit", ["git", "commit", "-q", "-m", "first"], project),
        ("make", ["make", "-s"], project),
        ("compileall", [PY, "-m", "compileall", "-q", "pkg"], project),
        ("pip install", [PY, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile",
                         "--target", str(work / "site"), str(wheel)], work),
    ]
    driver = cg.run([PY, "-c", DRIVER], cwd=work, env=env, timeout=600,
                    input=json.dumps([[name, argv, str(cwd), env] for name, argv, cwd in steps]).encode())
    assert driver.returncode == 0, driver.stderr.decode(errors="replace")
    results = json.loads(driver.stdout)
    failed = {name: (status, err) for name, (status, _, err) in results.items() if status != 0}
    warden.settle()
    violations = _violations(warden, agent)
    # Shown per program: how many, and the first one's attempt, reason and action.
    by_program: dict[str, list] = {}
    for v in violations:
        entry = by_program.setdefault(v["comm"], [0, v["attempted"], v["reason"], v["action_taken"]])
        entry[0] += 1
    assert by_program == {} and failed == {}, f"\nviolations: {by_program}\nfailed: {failed}"
    # The work was done.
    assert len(results["grep -r"][1].splitlines()) == count
    assert len(results["find"][1].splitlines()) == count
    assert not (work / "copy").exists() and (work / "src.tar").stat().st_size > 0
    assert (project / "out" / "count.txt").read_text() == "1\n"
    assert list((project / "pkg" / "__pycache__").glob("mod.*.pyc"))
    assert (work / "site" / "awtiny" / "__init__.py").read_text() == "VALUE = 42\n"
    assert os.path.isdir(project / ".git" / "objects")
