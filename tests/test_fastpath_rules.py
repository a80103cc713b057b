"""The fast path's compiled rules (daemon/fastpath.c) against policy.decide().

The C side may answer `allow` alone, so it must never allow what decide()
does not; and for the calls it takes on (normalised ASCII absolute paths, no
indirect route) it should allow all that decide() allows, or the fast path
is slow for no reason. Random policies and calls check both, on the real
library."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from agentwarden import policy as policy_mod
from agentwarden.policy.glob import compile_rule
from agentwarden.daemon import fastpath

AGENT = "coder"


@pytest.fixture(scope="module")
def fast():
    lib, why = fastpath.load()
    if lib is None:
        pytest.fail(f"the fast path library is part of the product (make setup builds it): {why}")
    fast = fastpath.FastPath(lib, {"execve": 59, "open": 2, "openat": 257, "creat": 85})
    yield fast
    fast.set_policy(None)
    fast.stop()


def load(tmp_path: Path, body: str) -> policy_mod.PolicySet:
    (tmp_path / "p.toml").write_text(f'[agent.{AGENT}]\nmode = "enforce"\non-violation = "kill"\n{body}')
    return policy_mod.load_policy([tmp_path])


def toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def exec_allowed_by_python(policy, path: str, args: list[str]) -> bool:
    event = {"kind": "exec", "agent": AGENT, "resolved_filename": path, "exec_path": "",
             "argv": ["argv0", *args], "argv_truncated": False, "ret": 0}
    return policy_mod.decide(event, policy).decision == "allow"


def write_allowed_by_python(policy, path: str, flags: int) -> bool:
    event = {"kind": "open", "agent": AGENT, "resolved_path": path, "path": path, "flags": flags, "ret": 0}
    return policy_mod.decide(event, policy).decision == "allow"


def exec_key(path: str, args: list[str]) -> bytes:
    return fastpath.exec_key(AGENT, path.encode(), [b"argv0", *(a.encode() for a in args)])


def test_rules_decide_like_the_policy(fast, tmp_path):
    policy = load(tmp_path, """
[agent.coder.exec]
allow = ["/usr/bin/*", "/usr/local/bin/tool --safe *", "/opt/**/run", "/srv/app-[0-9]/bin/?x"]
hold = ["/usr/bin/git * push *"]
deny = ["/usr/bin/curl", "/usr/bin/rm -rf *"]
[agent.coder.files]
write-allow = ["/home/coder/work/**", "/tmp/*.txt"]
deny = ["/home/coder/work/.git/**"]
""")
    assert fast.set_policy(policy) == []
    allowed = [("/usr/bin/ls", ["-l"]), ("/usr/bin/git", ["status"]), ("/usr/local/bin/tool", ["--safe"]),
               ("/usr/local/bin/tool", ["--safe", "a", "b"]), ("/opt/run", []), ("/opt/x/y/run", ["z"]),
               ("/srv/app-3/bin/ax", []), ("/usr/bin/rm", ["-r", "x"])]
    forwarded = [("/usr/bin/curl", []),                     # denied
                 ("/usr/bin/git", ["push"]),                 # held
                 ("/usr/bin/git", ["-C", "repo", "push", "origin"]),
                 ("/usr/bin/rm", ["-rf", "/"]),
                 ("/usr/local/bin/tool", ["--unsafe"]),      # no rule allows it
                 ("/usr/local/bin/tool", []),
                 ("/usr/sbin/ls", []), ("/srv/app-x/bin/ax", []), ("/srv/app-3/bin/abx", []),
                 ("/usr/bin/./ls", []), ("/usr//bin/ls", []), ("/usr/bin/ls/", []),   # not normalised
                 ("/usr/bin/caf\u00e9", []), ("/usr/bin/ls", ["caf\u00e9"]),         # not ASCII
                 ("/usr/bin/ld-linux-x86-64.so.2", ["/usr/bin/curl"])]               # indirect
    for path, args in allowed:
        assert exec_allowed_by_python(policy, path, args), (path, args)
        assert fast.rules_allow(exec_key(path, args)), (path, args)
    # Before the arguments are read: decided when no rule matching the path has
    # an argv pattern; otherwise the arguments are read.
    assert fast.exec_path_verdict(AGENT, b"/usr/bin/ls") is True
    assert fast.exec_path_verdict(AGENT, b"/usr/bin/curl") is False        # denied whatever follows
    assert fast.exec_path_verdict(AGENT, b"/usr/bin/git") is None          # git * push * is held
    assert fast.exec_path_verdict(AGENT, b"/usr/local/bin/tool") is None   # allowed with --safe only
    assert fast.exec_path_verdict(AGENT, b"/usr/sbin/ls") is False         # no rule
    assert fast.exec_path_verdict(AGENT, b"/usr/bin/./ls") is None         # the supervisor normalises it
    assert fast.exec_path_verdict("other", b"/usr/bin/ls") is False        # no such agent
    for path, args in forwarded:
        assert not fast.rules_allow(exec_key(path, args)), (path, args)
    write = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    assert fast.rules_allow(fastpath.open_key(AGENT, write, b"/home/coder/work/a/b.py"))
    assert fast.rules_allow(fastpath.open_key(AGENT, os.O_RDWR, b"/tmp/notes.txt"))
    assert not fast.rules_allow(fastpath.open_key(AGENT, write, b"/home/coder/work/.git/config"))  # denied
    assert not fast.rules_allow(fastpath.open_key(AGENT, write, b"/tmp/notes.md"))                 # not allowed
    assert fast.rules_allow(fastpath.open_key(AGENT, os.O_RDONLY | os.O_CREAT, b"/tmp/x.txt"))  # a write too
    assert not fast.rules_allow(fastpath.open_key(AGENT, os.O_RDONLY, b"/tmp/x.txt"))  # a read: Python's
    assert not fast.rules_allow(fastpath.open_key("other", write, b"/tmp/notes.txt"))             # no such agent
    # A tracked file (files.track; /etc/** when the policy does not say) is
    # allowed by decide() but always forwarded: drift keeps its content first.
    tracked = load(tmp_path, '[agent.coder.files]\nwrite-allow = ["/srv/**", "/etc/**"]\n'
                             'track = ["/srv/conf/**"]\n')
    fast.set_policy(tracked)
    assert write_allowed_by_python(tracked, "/srv/conf/app.ini", write)
    assert not fast.rules_allow(fastpath.open_key(AGENT, write, b"/srv/conf/app.ini"))
    assert fast.rules_allow(fastpath.open_key(AGENT, write, b"/srv/data/x"))
    assert fast.rules_allow(fastpath.open_key(AGENT, write, b"/etc/x"))      # the policy's track replaces /etc/**
    fast.set_policy(load(tmp_path, '[agent.coder.files]\nwrite-allow = ["/etc/**", "/srv/**"]\n'))
    assert not fast.rules_allow(fastpath.open_key(AGENT, write, b"/etc/x"))  # the default: /etc/**
    assert fast.rules_allow(fastpath.open_key(AGENT, write, b"/srv/x"))
    # A new policy replaces the rules at once; no policy, no rules.
    fast.set_policy(load(tmp_path, '[agent.coder.exec]\nallow = ["/bin/*"]\n'))
    assert not fast.rules_allow(exec_key("/usr/bin/ls", []))
    assert fast.rules_allow(exec_key("/bin/ls", []))
    fast.set_policy(None)
    assert not fast.rules_allow(exec_key("/bin/ls", []))


def test_garbage_rules_are_refused_and_leave_none(fast, tmp_path):
    fast.set_policy(load(tmp_path, '[agent.coder.exec]\nallow = ["/bin/*"]\n'))
    assert fast.rules_allow(exec_key("/bin/ls", []))
    good, _ = fastpath.compile_rules(load(tmp_path, '[agent.coder.exec]\nallow = ["/bin/*"]\n'))
    rng = random.Random(7)
    for cut in range(1, len(good)):
        assert fast.lib.aw_fast_policy(good[:cut], cut) == -22, cut   # EINVAL: truncated
        assert not fast.rules_allow(exec_key("/bin/ls", []))
    for _ in range(300):
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        fast.lib.aw_fast_policy(junk, len(junk))   # refused or harmless; never a crash
    assert fast.lib.aw_fast_policy(good, len(good)) == 0
    assert fast.rules_allow(exec_key("/bin/ls", []))
    # Keys cut short or made of junk are never allowed (and never read past their end).
    for key in [b"coder\0\x011\0", b"coder\0\x01\0", b"coder\0", b"coder", b"coder\0/bin/ls",
                b"\0/bin/ls\0"] + [b"coder\0" + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
                                   for _ in range(300)]:
        assert not fast.rules_allow(key) or key.startswith(b"coder\0/bin/"), key


# ---- random policies and calls ----------------------------------------------------

NAMES = ["a", "b", "ab", "ba", "a.b", "-a", "abc"]
WORD_PIECES = ["a", "b", ".", "-", "*", "?", "[ab]", "[!a]", "[a-b]", "[]a]", "[/a]"]


def random_word(rng: random.Random, pieces: list[str]) -> str:
    return "".join(rng.choice(pieces) for _ in range(rng.randint(1, 3)))


def compiles(kind: str, rule: str) -> bool:
    try:
        compile_rule(kind, rule, "random")
        return True
    except policy_mod.GlobError:
        return False   # "**" inside a component, a "." component, a path split inside [/a]


def random_glob(rng: random.Random) -> str:
    parts = ["**" if rng.random() < 0.2 else random_word(rng, WORD_PIECES) for _ in range(rng.randint(1, 4))]
    return "/" + "/".join(parts)


def random_rule(rng: random.Random, kind: str) -> str:
    while True:
        words = [random_glob(rng)]
        if kind.startswith("exec.") and rng.random() < 0.5:
            words += ["*" if rng.random() < 0.3 else random_word(rng, WORD_PIECES)
                      for _ in range(rng.randint(1, 3))]
        rule = " ".join(f"'{w}'" for w in words) if kind.startswith("exec.") else words[0]
        if compiles(kind, rule):
            return rule


def random_path(rng: random.Random) -> str:
    return "/" + "/".join(rng.choice(NAMES) for _ in range(rng.randint(1, 4)))


def test_random_rules_never_allow_more_and_allow_all_they_can(fast, tmp_path):
    rng = random.Random(20261121)
    checked = agreed_allow = path_only = 0
    for round_ in range(60):
        lists = {kind: [random_rule(rng, f"exec.{kind}") for _ in range(rng.randint(0, 4))]
                 for kind in ("allow", "hold", "deny")}
        files = {kind: [random_rule(rng, f"files.{kind}") for _ in range(rng.randint(0, 4))]
                 for kind in ("write-allow", "deny")}
        lists["allow"].append("/**" if rng.random() < 0.2 else "/a/**")   # plenty of allowed calls
        files["write-allow"].append("/a/**")
        body = "[agent.coder.exec]\n" + "".join(f"{k} = {toml_list(v)}\n" for k, v in lists.items() if v)
        body += "[agent.coder.files]\n" + "".join(f"{k} = {toml_list(v)}\n" for k, v in files.items() if v)
        policy = load(tmp_path, body)
        assert fast.set_policy(policy) == []
        for _ in range(200):
            path = random_path(rng)
            args = [rng.choice(NAMES + ["", "a/b", "push", "-a"]) for _ in range(rng.randint(0, 4))]
            python = exec_allowed_by_python(policy, path, args)
            c = fast.rules_allow(exec_key(path, args))
            assert c == python, (round_, body, path, args, python)
            # Decided before the arguments are read: then the same for any arguments.
            before_args = fast.exec_path_verdict(AGENT, path.encode())
            assert before_args in (None, python), (round_, body, path, args, python)
            path_only += before_args is not None
            flags = rng.choice([os.O_WRONLY, os.O_RDWR | os.O_CREAT, os.O_WRONLY | os.O_TRUNC,
                                os.O_RDONLY | os.O_APPEND, os.O_RDONLY | os.O_CREAT])
            # a tracked file's write is the supervisor's (drift), however allowed
            python = write_allowed_by_python(policy, path, flags) and not policy.agents[AGENT].tracks(path)
            c = fast.rules_allow(fastpath.open_key(AGENT, flags, path.encode()))
            assert c == python, (round_, body, path, flags, python)
            checked += 2
            agreed_allow += c
    assert checked > 10000 and agreed_allow > 500   # the random calls did reach the allow side
    assert path_only > 3000   # and many were decided without their arguments
