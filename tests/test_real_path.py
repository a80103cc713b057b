"""Where a path really leads, for the daemon's symlink check (governor.real_path)."""
from __future__ import annotations

import os

from agentwarden.daemon.governor import kernel_real_path, real_path


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
    assert real_path({"kind": "open", "resolved_path": str(tmp_path / "chain")}) == want
    assert real_path({"kind": "exec", "resolved_filename": str(tmp_path / "chain")}) == want


def test_no_difference_and_nothing_there(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("")
    assert real_path({"kind": "open", "resolved_path": str(plain)}) is None  # not a symlink
    assert kernel_real_path(str(tmp_path / "missing")) is None
    assert real_path({"kind": "open", "resolved_path": None}) is None


def test_a_dangling_symlink_still_says_where_it_points(tmp_path):
    os.symlink(tmp_path / "not-yet", tmp_path / "dangling")
    assert kernel_real_path(str(tmp_path / "dangling")) == str(tmp_path / "not-yet")


def test_a_fifo_is_resolved_without_opening_it(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "fifo", tmp_path / "to-fifo")
    # An ordinary open would block here until a writer came.
    assert kernel_real_path(str(tmp_path / "to-fifo")) == str(tmp_path / "fifo")
