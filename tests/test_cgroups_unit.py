"""cgroups without a kernel: mountinfo parsing, agent names, path checks on a fake root."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from agentwarden import cgroups
from agentwarden.cgroups import CgroupError
from agentwarden.errors import AgentwardenError

PURE_V2 = """\
22 28 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
23 28 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
26 23 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
28 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
"""

HYBRID = """\
23 28 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
25 23 0:23 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
27 25 0:25 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
28 25 0:26 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:12 - cgroup cgroup rw,memory
26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
"""

V1_ONLY = """\
25 23 0:23 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
27 25 0:25 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
30 28 0:40 / /mnt/trap rw,relatime - tmpfs cgroup2 rw
"""

ESCAPED = """\
40 28 0:50 / /mnt/my\\040cgroup\\011v2\\134x rw,relatime - cgroup2 none rw
26 23 0:24 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw
"""

# Several optional fields, and none at all.
OPTIONAL_FIELDS = """\
36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 shared:3 propagate_from:2 - ext3 /dev/root rw
37 35 0:60 / /run/cg rw - cgroup2 cgroup2 rw
"""


def mountinfo(tmp_path: Path, text: str | bytes) -> str:
    path = tmp_path / "mountinfo"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


@pytest.mark.parametrize("text,root", [
    (PURE_V2, "/sys/fs/cgroup"),
    (HYBRID, "/sys/fs/cgroup/unified"),
    (ESCAPED, "/mnt/my cgroup\tv2\\x"),
    (OPTIONAL_FIELDS, "/run/cg"),
])
def test_cgroup2_root(tmp_path, text, root):
    assert cgroups.cgroup2_root(mountinfo(tmp_path, text)) == Path(root)


def test_cgroup2_root_with_non_utf8_mount_points(tmp_path):
    text = b"41 28 8:17 / /media/caf\xe9 rw,relatime - vfat /dev/sdb1 rw\n" + PURE_V2.encode()
    assert cgroups.cgroup2_root(mountinfo(tmp_path, text)) == Path("/sys/fs/cgroup")


@pytest.mark.parametrize("text", [V1_ONLY, ""])
def test_cgroup2_not_mounted(tmp_path, text):
    with pytest.raises(CgroupError) as info:
        cgroups.cgroup2_root(mountinfo(tmp_path, text))
    assert str(info.value) == (
        "cgroup v2 is not mounted; mount it with: "
        "mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified")
    assert isinstance(info.value, AgentwardenError)


def test_cgroup2_root_unreadable_mountinfo(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CgroupError, match=f"cannot read {missing}: No such file or directory"):
        cgroups.cgroup2_root(str(missing))


@pytest.mark.parametrize("name", [
    "a", "7", "coder", "Agent_1.x@host-2", "a" * 64, "a-", "a..b",
])
def test_valid_agent_names(name):
    assert cgroups.validate_agent_name(name) == name


@pytest.mark.parametrize("name", [
    "", "-a", ".a", "_a", "@a", "a b", "a/b", "../x", "a" * 65, "a\n", "a\nb", "é", "a:b",
    "a\x00", " a",
])
def test_invalid_agent_names(name):
    with pytest.raises(CgroupError, match="invalid agent name"):
        cgroups.validate_agent_name(name)


@pytest.fixture
def root(tmp_path) -> Path:
    """A fake cgroup2 root: directories with cgroup.procs files."""
    root = tmp_path / "cg"
    for d in (root, root / "agents", root / "agents" / "coder", root / "agents" / "coder" / "job"):
        d.mkdir()
        (d / "cgroup.procs").write_text("")
    (root / "agents" / "coder" / "cgroup.procs").write_text("101\n102\n")
    (root / "agents" / "coder" / "job" / "cgroup.procs").write_text("103\n\n")
    (root / "plain-dir").mkdir()
    (tmp_path / "cg2").mkdir()
    (tmp_path / "cg2" / "cgroup.procs").write_text("")
    return root


@pytest.mark.parametrize("given", [
    "agents/coder", "agents/./coder/", "agents/coder/job/..", "/agents/coder"])
def test_resolve_inside_the_root(root, given):
    if given.startswith("/"):
        given = str(root) + given
    assert cgroups.resolve(given, root) == root / "agents" / "coder"


def test_resolve_the_root_itself(root):
    assert cgroups.resolve(root, root) == root
    assert cgroups.resolve(".", root) == root


@pytest.mark.parametrize("given", [
    "..", "../cg2", "agents/../../cg2", "/etc", "/", "{tmp}/cg2", "{root}/agents/../../cg2",
])
def test_resolve_rejects_paths_outside_the_root(root, given):
    given = given.format(tmp=root.parent, root=root)
    with pytest.raises(CgroupError, match=f"is outside the cgroup v2 mount {root}$"):
        cgroups.resolve(given, root)
    with pytest.raises(CgroupError, match="outside"):
        cgroups.resolve(given, root, create=True)


def test_resolve_outside_never_creates(root):
    with pytest.raises(CgroupError, match="outside"):
        cgroups.resolve("../made-by-test", root, create=True)
    assert not (root.parent / "made-by-test").exists()


def test_resolve_missing_cgroup(root):
    with pytest.raises(CgroupError) as info:
        cgroups.resolve("agents/ghost", root)
    assert str(info.value) == f"agents/ghost is not a cgroup: no such directory under {root}"


def test_resolve_directory_without_cgroup_procs(root):
    with pytest.raises(CgroupError) as info:
        cgroups.resolve("plain-dir", root)
    assert str(info.value) == f"plain-dir is not a cgroup: {root / 'plain-dir'} has no cgroup.procs"


def test_resolve_a_file_is_not_a_cgroup(root):
    with pytest.raises(CgroupError, match="no such directory"):
        cgroups.resolve("agents/cgroup.procs", root)


def test_resolve_create_makes_the_directory(root):
    # On cgroupfs the kernel adds cgroup.procs; on this fake root it stays missing.
    with pytest.raises(CgroupError, match="has no cgroup.procs"):
        cgroups.resolve("agents/new/deep", root, create=True)
    assert (root / "agents" / "new" / "deep").is_dir()


def test_processes_covers_descendants(root):
    assert sorted(cgroups.processes(root / "agents" / "coder")) == [101, 102, 103]
    assert cgroups.processes(root / "agents" / "coder" / "job") == [103]
    assert cgroups.processes(root / "plain-dir") == []


def test_level_and_id(root):
    path = root / "agents" / "coder" / "job"
    assert cgroups.level(path, root) == 3
    assert cgroups.level(root, root) == 0
    assert cgroups.cgroup_id(path) == os.stat(path).st_ino


def test_tag_rejects_an_invalid_name_before_touching_the_directory(root):
    with pytest.raises(CgroupError, match="invalid agent name"):
        cgroups.tag(root / "agents", "bad name")
