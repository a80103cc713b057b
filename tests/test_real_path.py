"""Where a path really leads, for the daemon's symlink check (governor.real_paths)."""
from __future__ import annotations

import os

from agentwarden.daemon.governor import kernel_real_path, real_paths


def test_symlinks_are_followed_the_way_the_kernel_follows_them(tmp_path):
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "key").write_text("k")
    (tmp_path / "work").mkdir()
    os.symlink(tmp_path / "secret", tmp_path / "work" / "dir")
    os.symlink("dir/key", tmp_path / "work" / "link")           # relative, through a linked dir
    os.symlink(tmp_path / "work" / "link", tmp_path / "chain")  # a chain
    want = str(tmp_path / "secret" / "key")
    assert kernel_real_path(str(tmp_path / "work" / "link")) == want
    assert kernel_real_path(str(tmp_path / "chain")) == want
    # '..' after a symlinked directory is taken from the target, as the kernel does.
    assert kernel_real_path(str(tmp_path / "work" / "dir" / ".." / "secret" / "key")) == want
    assert real_paths({"kind": "open", "resolved_path": str(tmp_path / "chain")}) == \
        {"resolved_path": ("real_path", want)}
    assert real_paths({"kind": "exec", "resolved_filename": str(tmp_path / "chain")}) == \
        {"resolved_exec_path": ("real_path", want)}


def test_a_change_follows_the_last_link_only_where_the_call_does(tmp_path):
    """chmod follows a symlink it is given; unlink and rename act on the link
    itself, so only a linked directory above it leads elsewhere."""
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "key").write_text("k")
    (tmp_path / "work").mkdir()
    os.symlink(tmp_path / "secret" / "key", tmp_path / "work" / "link")
    os.symlink(tmp_path / "secret", tmp_path / "work" / "dir")
    link, key = str(tmp_path / "work" / "link"), str(tmp_path / "secret" / "key")
    chmod = {"kind": "change", "syscall": "chmod", "at_flags": 0, "resolved_path": link}
    assert real_paths(chmod) == {"resolved_path": ("real_path", key)}
    assert real_paths({**chmod, "syscall": "fchmodat2", "at_flags": 0x100}) == {}   # AT_SYMLINK_NOFOLLOW
    assert real_paths({**chmod, "syscall": "unlink"}) == {}
    rename = {"kind": "change", "syscall": "rename", "at_flags": 0, "resolved_path": link,
              "resolved_path2": str(tmp_path / "work" / "dir" / "new")}
    assert real_paths(rename) == {"resolved_path2": ("real_path2", str(tmp_path / "secret" / "new"))}


def test_no_difference_and_nothing_there(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("")
    assert real_paths({"kind": "open", "resolved_path": str(plain)}) == {}  # not a symlink
    assert kernel_real_path(str(tmp_path / "missing")) is None
    assert real_paths({"kind": "open", "resolved_path": None}) == {}


def test_a_dangling_symlink_still_says_where_it_points(tmp_path):
    os.symlink(tmp_path / "not-yet", tmp_path / "dangling")
    assert kernel_real_path(str(tmp_path / "dangling")) == str(tmp_path / "not-yet")


def test_a_fifo_is_resolved_without_opening_it(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "fifo", tmp_path / "to-fifo")
    # An ordinary open would block here until a writer came.
    assert kernel_real_path(str(tmp_path / "to-fifo")) == str(tmp_path / "fifo")


def test_a_path_with_no_symlink_is_its_own_real_path(tmp_path):
    """openat2(RESOLVE_NO_SYMLINKS) answers for most paths; what it cannot
    answer (a symlink, /proc's magic links, no such file, a path not in
    normal form) takes the /proc/self/fd look, with the same results."""
    (tmp_path / ".git" / "objects").mkdir(parents=True)
    (tmp_path / ".git" / "objects" / "ab").write_text("x")
    os.symlink(tmp_path / ".git", tmp_path / "git")
    plain = str(tmp_path / ".git" / "objects" / "ab")
    assert kernel_real_path(plain) == plain
    assert kernel_real_path(str(tmp_path / "git" / "objects" / "ab")) == plain
    assert kernel_real_path(str(tmp_path / ".git") + "/") == str(tmp_path / ".git")
    assert kernel_real_path(str(tmp_path / ".git" / ".")) == str(tmp_path / ".git")
    assert kernel_real_path(str(tmp_path / "nothing")) is None
    assert kernel_real_path("/proc/self/cwd") == os.getcwd()
    assert real_paths({"kind": "open", "resolved_path": plain}) == {}


def test_the_verdict_cache_goes_with_the_policy(tmp_path):
    """Repeated opens are decided from the cache, and a reloaded policy
    decides them anew: a path allowed before is denied after."""
    from agentwarden.daemon.governor import Governor
    policy_dir = tmp_path / "policy.d"
    policy_dir.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("x")
    (policy_dir / "a.toml").write_text(f'[agent.a]\nmode = "monitor"\non-violation = "alert"\n[agent.a.files]\n'
                                       f'read-allow = ["{data}/**"]\n')
    governor = Governor([policy_dir], lambda cgroup_id: None)
    governor.load()

    def judged(**fields) -> str:
        record = {"kind": "open", "agent": "a", "pid": 1, "comm": "cat", "path": str(data / "f"),
                  "resolved_path": str(data / "f"), "flags": os.O_RDONLY, "ret": 3, "error": None,
                  "agent_cgroup_id": 1, **fields}
        governor.judge(record)
        return record["verdict"]["decision"]

    assert [judged(), judged()] == ["allow", "allow"]
    assert governor.cache_hits == 1
    assert judged(flags=os.O_WRONLY) == "violation"   # the access is part of the key
    assert judged(ret=-2, error="ENOENT") == "allow"
    (policy_dir / "a.toml").write_text(f'[agent.a]\nmode = "monitor"\non-violation = "alert"\n[agent.a.files]\n'
                                       f'deny = ["{data}/f"]\nread-allow = ["{data}/**"]\n')
    governor.load()
    assert judged() == "deny"


def test_a_batch_looks_each_real_path_up_once(tmp_path):
    """Within one batch (whose events all happened before it is decided) a
    path's real path is looked up once; the next batch looks again."""
    from agentwarden.daemon.governor import Governor
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_text("x")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "f").write_text("y")
    governor = Governor([tmp_path / "none.d"], lambda cgroup_id: None)
    record = {"kind": "open", "resolved_path": str(tmp_path / "link" / "f")}
    os.symlink(tmp_path / "a", tmp_path / "link")
    via_a = {"resolved_path": ("real_path", str(tmp_path / "a" / "f"))}
    via_b = {"resolved_path": ("real_path", str(tmp_path / "b" / "f"))}
    with governor.batch():
        assert real_paths(record, governor._real_path_now) == via_a
        os.unlink(tmp_path / "link")
        os.symlink(tmp_path / "b", tmp_path / "link")
        assert real_paths(record, governor._real_path_now) == via_a
    with governor.batch():
        assert real_paths(record, governor._real_path_now) == via_b
    assert real_paths(record, governor._real_path_now) == via_b
