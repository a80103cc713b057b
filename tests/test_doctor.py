"""`agentwarden doctor`'s checks that read files, fed real mountinfo lines."""
from __future__ import annotations

from agentwarden import doctor

HYBRID = ("35 25 0:30 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 "
          "cgroup2 rw{options}\n"
          "36 25 0:31 / /sys/fs/cgroup/cpu rw,relatime shared:11 - cgroup cgroup rw,cpu\n")


def _check(tmp_path, text: str) -> doctor.Check:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(text)
    return doctor._cgroup_migration(str(mountinfo))


def test_a_cgroup2_mount_without_favordynmods_is_a_warning_with_the_remount(tmp_path):
    check = _check(tmp_path, HYBRID.format(options=",nsdelegate"))
    assert (check.ok, check.required) == (False, False)
    assert "mount -o remount,favordynmods /sys/fs/cgroup/unified" in check.fix


def test_a_cgroup2_mount_with_favordynmods_passes(tmp_path):
    check = _check(tmp_path, HYBRID.format(options=",nsdelegate,favordynmods"))
    assert check.ok and "/sys/fs/cgroup/unified" in check.detail


def test_no_cgroup2_mount_or_no_mountinfo_is_said(tmp_path):
    assert not _check(tmp_path, HYBRID.splitlines(keepends=True)[1]).ok
    missing = doctor._cgroup_migration(str(tmp_path / "absent"))
    assert not missing.ok and "cannot read" in missing.detail
