"""The layers contract (pyproject.toml, [tool.importlinter]) holds: the core
never imports probe, daemon or the CLI; probe and daemon never import each
other. import-linter reads a package from one directory tree, so the check runs
on a copy of the package laid out as it is installed (pyproject's package-dir
mapping puts daemon/, probe/ and bpf/ inside `agentwarden`)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def installed_layout(into: Path) -> Path:
    """Copy every package's .py files where pyproject.toml installs them."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = config.get("package-dir", {})
    for package in config["packages"]:
        source = ROOT / mapping.get(package, package.replace(".", "/"))
        target = into.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for module in source.glob("*.py"):
            shutil.copy2(module, target / module.name)
    return into


def lint(tree: Path) -> subprocess.CompletedProcess:
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS} is missing: run `make setup` (it installs import-linter)")
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--config", str(ROOT / "pyproject.toml")],
                          cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)


def test_the_layers_contract_holds(tmp_path):
    result = lint(installed_layout(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_a_core_module_importing_the_daemon_breaks_the_contract(tmp_path):
    tree = installed_layout(tmp_path)
    wire = tree / "agentwarden" / "wire.py"
    wire.write_text(wire.read_text() + "\nfrom agentwarden.daemon import main as _upwards  # noqa\n")
    result = lint(tree)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "agentwarden.wire -> agentwarden.daemon.main" in result.stdout


def test_no_module_imports_a_source_directory_as_a_top_level_package():
    """probe/, daemon/ and bpf/ are installed inside `agentwarden` (package-dir):
    `from probe.x import y` works from a checkout (the repo root on sys.path)
    and fails in the .deb, so every import of them names agentwarden or is relative."""
    import re
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = config.get("package-dir", {})
    tops = sorted({path.split("/")[0] for package, path in mapping.items()
                   if path.split("/")[0] != package.split(".")[0]})
    assert {"probe", "daemon", "bpf"} <= set(tops), tops
    pattern = re.compile(r"^\s*(?:from|import)\s+(?:%s)(?:\.|\s|$)" % "|".join(map(re.escape, tops)), re.M)
    offenders = []
    for package in config["packages"]:
        source = ROOT / mapping.get(package, package.replace(".", "/"))
        for module in source.glob("*.py"):
            for match in pattern.finditer(module.read_text()):
                offenders.append(f"{module.relative_to(ROOT)}: {match.group(0).strip()}")
    assert not offenders, offenders
