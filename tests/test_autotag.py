"""Auto-tagging: units of the agents slice are agents, named after the unit."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from agentwarden import cgroups


@pytest.mark.parametrize("unit, agent", [
    ("agent-coder.service", "coder"),
    ("agent@coder.service", "coder"),
    ("agent-coder.scope", "coder"),
    ("agent@coder-2.service", "coder-2"),
    ("agent@foo\\x2dbar.service", "foo-bar"),     # systemd-escaped instance
    ("run-r0d1e2f3.service", "run-r0d1e2f3"),     # systemd-run without --unit
    ("reviewer.service", "reviewer"),
    ("coder@task1.service", "coder@task1"),       # only agent@ is stripped
    ("agent-.service", "agent-"),
    ("has space.service", "has_space"),           # still watched, under a safe name
    ("_hidden.service", "hidden"),
    ("-.service", "unnamed"),
    ("x" * 80 + ".service", "x" * 64),
])
def test_unit_names_become_agent_names(unit, agent):
    assert cgroups.unit_agent_name(unit) == agent
    assert cgroups.AGENT_NAME.match(cgroups.unit_agent_name(unit))


def test_slice_paths_follow_systemd_nesting():
    assert cgroups.slice_path("agents.slice") == Path("agents.slice")
    assert cgroups.slice_path("ai-agents.slice") == Path("ai.slice/ai-agents.slice")


def test_systemd_root_is_where_pid1_keeps_init_scope(tmp_path):
    proc1 = tmp_path / "cgroup"
    root = Path("/sys/fs/cgroup")
    proc1.write_text("0::/init.scope\n")
    assert cgroups.systemd_root(root, str(proc1)) == root
    proc1.write_text("1:name=systemd:/ct/payload\n0::/ct/payload/init.scope\n")
    assert cgroups.systemd_root(root, str(proc1)) == root / "ct/payload"
    proc1.write_text("0::/\n")  # PID 1 is not systemd
    assert cgroups.systemd_root(root, str(proc1)) == root
    assert cgroups.systemd_root(root, str(tmp_path / "missing")) == root


def make_tree(root: Path, *dirs: str) -> None:
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)


def scan(root: Path, monkeypatch, agents_slice="agents.slice"):
    monkeypatch.setattr(cgroups, "systemd_root", lambda r, proc1_cgroup="": r)
    return {str(t.path.relative_to(root)): (t.agent, t.source, t.level)
            for t in cgroups.scan_tagged(root, agents_slice).values()}


def test_units_of_the_slice_are_agents_and_nothing_else(tmp_path, monkeypatch):
    make_tree(tmp_path, "agents.slice/agent-coder.service/sub",
              "agents.slice/agent@reviewer.service",
              "agents.slice/agents-team.slice/agent-tester.scope",
              "agents.slice/agents-team.slice/agents-team-x.slice",
              "system.slice/agent-notme.service",
              "user.slice/user-1000.slice/user@1000.service/agents.slice/agent-forged.service")
    found = scan(tmp_path, monkeypatch)
    assert found == {
        "agents.slice/agent-coder.service": ("coder", "slice", 2),
        "agents.slice/agent@reviewer.service": ("reviewer", "slice", 2),
        "agents.slice/agents-team.slice/agent-tester.scope": ("tester", "slice", 3),
    }


def test_auto_tagging_can_be_turned_off_or_moved(tmp_path, monkeypatch):
    make_tree(tmp_path, "agents.slice/agent-coder.service", "ai.slice/ai-agents.slice/agent-x.service")
    assert scan(tmp_path, monkeypatch, "") == {}
    assert scan(tmp_path, monkeypatch, "ai-agents.slice") == {
        "ai.slice/ai-agents.slice/agent-x.service": ("x", "slice", 3)}


def test_a_slice_owned_by_someone_else_is_not_trusted(tmp_path, monkeypatch):
    make_tree(tmp_path, "agents.slice/agent-coder.service")
    real_stat = os.stat

    class Fake:
        def __init__(self, st, uid):
            self.st, self.st_uid = st, uid

        def __getattr__(self, name):
            return getattr(self.st, name)

    def fake_stat(path, *a, **kw):
        st = real_stat(path, *a, **kw)
        return Fake(st, 1000) if str(path).endswith("agents.slice") else Fake(st, 0)

    monkeypatch.setattr(cgroups.os, "stat", fake_stat)
    assert scan(tmp_path, monkeypatch) == {}
    monkeypatch.setattr(cgroups.os, "stat", lambda p, *a, **kw: Fake(real_stat(p, *a, **kw), 0))
    assert "agents.slice/agent-coder.service" in scan(tmp_path, monkeypatch)


def test_an_explicit_tag_wins(tmp_path, monkeypatch):
    make_tree(tmp_path, "agents.slice/agent-coder.service/worker")
    tags = {tmp_path / "agents.slice/agent-coder.service": "renamed",
            tmp_path / "agents.slice/agent-coder.service/worker": "helper"}
    monkeypatch.setattr(cgroups, "read_tag", lambda p, name=cgroups.TAG_XATTR: tags.get(Path(p)) if name == cgroups.TAG_XATTR else None)
    assert scan(tmp_path, monkeypatch) == {
        "agents.slice/agent-coder.service": ("renamed", "xattr", 2),
        "agents.slice/agent-coder.service/worker": ("helper", "xattr", 3),
    }
