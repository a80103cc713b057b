"""What approvers and agents see of a hold, without a kernel session: the
diff's bounds, the files' facts and whose content is shown, the agent's
claim, the stderr line's guards, and the text of `holds show`."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from types import SimpleNamespace

from agentwarden import render
from agentwarden.daemon.supervisor import context
from agentwarden.daemon.supervisor.tell import tell


def test_a_diff_is_unified_bounded_and_never_of_binary_content():
    small = context.unified_diff(b"a\nmode=safe\n", b"a\nmode=fast", "f", "f (new)")
    assert small["text"].splitlines() == ["--- f", "+++ f (new)", "@@ -1,2 +1,2 @@", " a", "-mode=safe",
                                          "+mode=fast", "\\ No newline at end of file"]
    assert not small["truncated"] and not small["binary"]
    old = "".join(f"{i}\n" for i in range(1000)).encode()
    big = context.unified_diff(old, old.replace(b"\n", b" changed\n"), "f", "f")
    assert big["truncated"] and len(big["text"].splitlines()) == context.MAX_DIFF_LINES
    wide = context.unified_diff(b"x\n", b"y" * (context.MAX_DIFF_BYTES * 2) + b"\n", "f", "f")
    assert wide["truncated"] and len(wide["text"]) <= context.MAX_DIFF_BYTES
    assert context.unified_diff(b"\0\1", b"text\n", "f", "f") == {"binary": True}
    assert context.unified_diff(b"\xff\xfe", b"text\n", "f", "f") == {"binary": True}


def test_file_facts_hash_only_what_the_agent_may_read_and_do_not_follow_a_last_link(tmp_path):
    me = os.getpid()
    secret = tmp_path / "secret"
    secret.write_bytes(b"s3cret\n")
    secret.chmod(0o600)
    owner = (os.getuid(), {os.getgid()})
    facts, content = context.file_facts(me, str(secret), False, owner, keep=100)
    assert facts == {"path": str(secret), "size": 7, "sha256": hashlib.sha256(b"s3cret\n").hexdigest()}
    assert content == b"s3cret\n"
    stranger = (os.getuid() + 4242, {os.getgid() + 4242})
    facts, content = context.file_facts(me, str(secret), False, stranger, keep=100)
    assert facts["size"] == 7 and "sha256" not in facts and content is None
    assert facts["note"] == "content not shown: the agent may not read it"
    link = tmp_path / "link"
    link.symlink_to(secret)
    assert context.file_facts(me, str(link), False, owner)[0]["note"] == f"a symbolic link to {secret}"
    followed = context.file_facts(me, str(link), True, owner)[0]
    assert followed["real_path"] == str(secret) and "sha256" in followed
    assert context.file_facts(me, str(tmp_path / "none"), False, owner)[0]["note"] == "does not exist"
    assert context.file_facts(me, str(tmp_path), False, owner)[0]["note"] == "not a regular file"
    os.mkfifo(tmp_path / "fifo")   # looked at, never opened
    assert context.file_facts(me, str(tmp_path / "fifo"), False, owner)[0]["note"] == "not a regular file"


def test_a_rename_over_a_missing_file_shows_all_of_it_as_new(tmp_path):
    (tmp_path / "tmp").write_text("new\n")
    shown = context.call_context(os.getpid(), "rename", [str(tmp_path / "tmp"), str(tmp_path / "target")])
    assert shown["files"][1]["note"] == "does not exist"
    assert "+new" in shown["diff"]["text"].splitlines()


def test_the_agents_claim_comes_from_its_environment():
    child = subprocess.Popen([sys.executable, "-c", "print(flush=True); input()"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, env={**os.environ, "AGENTWARDEN_REASON": "tests need it"})
    try:
        child.stdout.readline()   # its exec is complete (Popen returns at the point of no return)
        n = SimpleNamespace(pid=child.pid, args=[0] * 6)
        assert context.agent_reason(n, "openat") == "tests need it"
    finally:
        child.communicate(b"\n")


def _child(stderr):
    return subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                            stderr=stderr)


def test_the_agent_is_told_on_its_stderr_only_where_it_could_write(tmp_path):
    piped = _child(subprocess.PIPE)
    assert tell(piped.pid, "h1-ab12 denied by root: no")
    assert piped.communicate(b"")[1] == b"agentwarden: h1-ab12 denied by root: no\n"

    log = tmp_path / "log"
    with open(log, "w") as f:
        written = _child(f)
    assert tell(written.pid, "held")
    written.communicate(b"")
    assert log.read_text() == "agentwarden: held\n"

    # fd 2 open read-only: the supervisor (root) must not write there.
    readonly = tmp_path / "readonly"
    readonly.write_text("untouched\n")
    with open(readonly) as f:
        reading = _child(f)
    assert not tell(reading.pid, "held")
    reading.communicate(b"")
    assert readonly.read_text() == "untouched\n"

    # Not a terminal, a pipe or a file (/dev/null here): nothing is opened.
    quiet = _child(subprocess.DEVNULL)
    assert not tell(quiet.pid, "held")
    quiet.communicate(b"")
    assert not tell(quiet.pid, "gone")


def test_holds_show_text():
    hold = {"id": "h1-ab12", "agent": "coder", "session": "s-1", "on_behalf_of": "alice", "task": "fix #12",
            "user": "coder", "host": "h", "waited": 3.2, "timeout_in": 296.8, "approvals": [], "required": 1,
            "action": "rename /w/.x -> /w/conf", "rule": None, "agent_says": "config fix",
            "approved_by": [], "syscall": "rename",
            "files": [{"path": "/w/.x", "size": 5, "sha256": "ab"},
                      {"path": "/w/conf", "note": "content not shown: the agent may not read it", "size": 9}],
            "diff": {"binary": False, "text": "--- a\n+++ b\n-x\n+y\n", "truncated": True},
            "ancestry": [{"pid": 12, "argv": ["sed", "-i"], "argv_truncated": False, "cwd": "/w"}],
            "recent": [{"time": 0, "action": "exec /usr/bin/sed", "verdict": "allowed"}]}
    text = render.hold_detail(hold)
    assert text[:3] == render.holds([hold])
    assert "    session s-1 of agent coder on h (on_behalf_of alice, task fix #12, user coder)" in text
    assert "    agent says (its own claim, unverified): config fix" in text
    assert "    /w/.x: 5 bytes, sha256 ab" in text
    assert "    /w/conf: 9 bytes, content not shown: the agent may not read it" in text
    assert "diff: (cut short)" in text and "    +y" in text
    assert "    12      sed -i  (cwd /w)" in text
    assert text[-1].endswith("allowed                  exec /usr/bin/sed")
    binary = render.hold_detail({**hold, "diff": {"binary": True}, "agent_says": None})
    assert "diff: binary content (sizes and hashes above)" in binary and not any("agent says" in l for l in binary)


def test_holds_show_text_of_an_exec():
    hold = {"id": "h2", "agent": "a", "session": "s", "on_behalf_of": "", "task": "", "user": "root", "host": "h",
            "waited": 0, "timeout_in": 1, "approvals": [], "required": 1, "action": "exec python3", "rule": "r",
            "program": {"path": "/usr/bin/python3", "real_path": "/usr/bin/python3.11", "size": 1, "sha256": "cd"},
            "ancestry": [], "recent": []}
    assert "    /usr/bin/python3 (really /usr/bin/python3.11): 1 bytes, sha256 cd" in render.hold_detail(hold)
