"""Settings: defaults < config file < config.d drop-ins < environment < --set flags."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentwarden import settings
from agentwarden.settings import ConfigError, load


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def etc(tmp_path) -> Path:
    return tmp_path / "etc"


def test_defaults_without_any_file(tmp_path):
    s = load(environ={"AGENTWARDEN_CONFIG": str(write(tmp_path / "empty.toml", ""))})
    assert s.run_dir == Path("/run/agentwarden")
    assert s.state_dir == Path("/var/lib/agentwarden")
    assert s.policy_dir == Path("/etc/agentwarden/policy.d")
    assert s.agents_dir == Path("/etc/agentwarden/agents")
    assert s.admin_group == "agentwarden" and s.agents_slice == "agents.slice"
    assert s.health_interval == 1.0 and s.tag_scan_interval == 0.5
    assert s.wakeup_interval == 0.01
    assert s.exec_fast_path is True
    assert set(s.origins.values()) == {"default"}


def test_each_layer_beats_the_one_before(etc):
    config = write(etc / "config.toml", 'run_dir = "/file"\nstate_dir = "/file"\n'
                   'policy_dir = "/file"\nagents_dir = "/file"\nhealth_interval = 2\n')
    write(etc / "config.d" / "10-a.toml", 'state_dir = "/dropin-a"\npolicy_dir = "/dropin-a"\n'
          'agents_dir = "/dropin-a"\n')
    write(etc / "config.d" / "20-b.toml", 'policy_dir = "/dropin-b"\nagents_dir = "/dropin-b"\n')
    write(etc / "config.d" / "ignored.conf", 'run_dir = "not toml, not read"\n')
    env = {"AGENTWARDEN_CONFIG": str(config), "AGENTWARDEN_AGENTS_DIR": "/env",
           "AGENTWARDEN_HEALTH_INTERVAL": "3.5", "AGENTWARDEN_TAG_SCAN_INTERVAL": "0.25"}
    s = load(environ=env, overrides=["tag_scan_interval=0.125"])
    assert s.run_dir == Path("/file")
    assert s.state_dir == Path("/dropin-a")
    assert s.policy_dir == Path("/dropin-b")          # later drop-in wins
    assert s.agents_dir == Path("/env")               # environment beats drop-ins
    assert s.health_interval == 3.5                   # environment beats the file
    assert s.tag_scan_interval == 0.125               # --set beats environment
    assert s.admin_group == "agentwarden"             # nobody set it
    assert s.origins["run_dir"] == str(config)
    assert s.origins["policy_dir"] == str(etc / "config.d" / "20-b.toml")
    assert s.origins["agents_dir"] == "environment AGENTWARDEN_AGENTS_DIR"
    assert s.origins["tag_scan_interval"] == "--set"
    assert s.origins["admin_group"] == "default"


def test_explicit_config_argument_beats_the_environment_variable(etc):
    a = write(etc / "a" / "config.toml", 'run_dir = "/a"\n')
    b = write(etc / "b" / "config.toml", 'run_dir = "/b"\n')
    assert load(config=b, environ={"AGENTWARDEN_CONFIG": str(a)}).run_dir == Path("/b")


def test_dropins_are_read_without_the_main_file(etc, monkeypatch):
    monkeypatch.setattr(settings, "DEFAULT_CONFIG", str(etc / "config.toml"))
    write(etc / "config.d" / "x.toml", 'admin_group = ""\n')
    s = load(environ={})
    assert s.admin_group == "" and s.origins["admin_group"] == str(etc / "config.d" / "x.toml")
    assert settings.config_files(environ={}) == [etc / "config.d" / "x.toml"]


def test_the_old_environment_variables_still_work(monkeypatch, tmp_path):
    monkeypatch.setenv("AGENTWARDEN_CONFIG", str(write(tmp_path / "c.toml", "")))
    monkeypatch.setenv("AGENTWARDEN_RUN_DIR", "/tmp/aw/run")
    monkeypatch.setenv("AGENTWARDEN_STATE_DIR", "/tmp/aw/state")
    monkeypatch.setenv("AGENTWARDEN_POLICY_DIR", "/tmp/aw/policy")
    s = settings.Settings.from_env()
    assert (s.run_dir, s.state_dir, s.policy_dir) == (
        Path("/tmp/aw/run"), Path("/tmp/aw/state"), Path("/tmp/aw/policy"))
    assert s.control_endpoint == "ipc:///tmp/aw/run/control.sock"


@pytest.mark.parametrize("text, message", [
    ('run_dir = "relative"\n', "run_dir = 'relative': must be an absolute path"),
    ("run_dir = 3\n", "must be an absolute path"),
    ("health_interval = 0\n", "between 0.01 and 3600"),
    ('health_interval = "soon"\n', "must be a number of seconds"),
    ("health_interval = true\n", "must be a number of seconds"),
    ("health_interval = nan\n", "between 0.01 and 3600"),
    ("wakeup_interval = 2\n", "between 0 and 1 seconds"),
    ("wakeup_interval = -0.01\n", "between 0 and 1 seconds"),
    ('exec_fast_path = "maybe"\n', "must be true or false"),
    ("exec_fast_path = 1\n", "must be true or false"),
    ('agents_slice = "agents"\n', "must be a systemd slice name"),
    ('admin_group = "Bad Group"\n', "must be a group name"),
    ('rundir = "/x"\n', "unknown key 'rundir'; known keys: run_dir"),
    ('[paths]\nrun_dir = "/x"\n', "[paths]: tables are not used"),
    ("run_dir = \n", "not valid TOML"),
])
def test_bad_config_files_name_file_key_and_reason(tmp_path, text, message):
    config = write(tmp_path / "config.toml", text)
    with pytest.raises(ConfigError) as exc:
        load(config=config, environ={})
    assert message in str(exc.value)
    assert str(config) in str(exc.value)


def test_bad_environment_and_flags_name_their_origin(tmp_path):
    config = write(tmp_path / "config.toml", "")
    with pytest.raises(ConfigError, match="environment AGENTWARDEN_RUN_DIR: run_dir = ''"):
        load(config=config, environ={"AGENTWARDEN_RUN_DIR": ""})
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load(config=config, environ={}, overrides=["run_dir"])
    with pytest.raises(ConfigError, match="--set: unknown key 'nope'"):
        load(config=config, environ={}, overrides=["nope=1"])


def test_exec_fast_path_from_file_and_environment(tmp_path):
    config = write(tmp_path / "config.toml", "exec_fast_path = false\n")
    assert load(config=config, environ={}).exec_fast_path is False
    assert load(config=config, environ={"AGENTWARDEN_EXEC_FAST_PATH": "yes"}).exec_fast_path is True
    assert load(config=config, environ={}, overrides=["exec_fast_path=off"]).exec_fast_path is False


def test_a_named_config_must_exist_and_be_readable(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(config=tmp_path / "missing.toml", environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load(environ={"AGENTWARDEN_CONFIG": str(tmp_path / "missing.toml")})


def test_empty_admin_group_and_slice_are_allowed(tmp_path):
    config = write(tmp_path / "config.toml", 'admin_group = ""\nagents_slice = ""\n')
    s = load(config=config, environ={})
    assert s.admin_group == "" and s.admin_gid() is None
    assert s.agents_slice == ""
    assert load(config=config, environ={}, overrides=["agents_slice=ai-agents.slice"]).agents_slice \
        == "ai-agents.slice"


def test_a_missing_admin_group_keeps_sockets_root_only(tmp_path):
    s = settings.Settings(run_dir=tmp_path / "run", admin_group="no-such-group-here")
    s.prepare_run_dir()
    assert (s.run_dir.stat().st_mode & 0o777) == 0o700
    sock = s.run_dir / "x.sock"
    sock.write_text("")
    s.restrict_socket(sock)
    assert (sock.stat().st_mode & 0o777) == 0o600


def cli(*args, env):
    return subprocess.run([sys.executable, "-m", "agentwarden", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_cli_order_and_errors(etc):
    """The same order through the command line, and one clear line for bad input."""
    config = write(etc / "config.toml", 'run_dir = "/file"\nstate_dir = "/file"\n'
                   'policy_dir = "/file"\n')
    write(etc / "config.d" / "50-x.toml", 'state_dir = "/dropin"\npolicy_dir = "/dropin"\n')
    env = {**os.environ, "AGENTWARDEN_CONFIG": str(config), "AGENTWARDEN_POLICY_DIR": "/env"}
    env.pop("AGENTWARDEN_RUN_DIR", None)
    env.pop("AGENTWARDEN_STATE_DIR", None)
    result = cli("--set", "health_interval=9", "config", "--json", env=env)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["settings"]["run_dir"] == "/file"
    assert shown["settings"]["state_dir"] == "/dropin"
    assert shown["settings"]["policy_dir"] == "/env"
    assert shown["settings"]["health_interval"] == 9.0
    assert shown["origins"]["health_interval"] == "--set"
    assert shown["files"] == [str(config), str(etc / "config.d" / "50-x.toml")]

    write(etc / "config.d" / "60-bad.toml", "state_dir = [\n")
    result = cli("status", env=env)
    assert result.returncode == 2   # a bad setting is a usage error (docs/cli.md)
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("agentwarden: error: ") and "60-bad.toml: not valid TOML" in result.stderr


def test_the_packaged_config_file_documents_every_key_with_its_default():
    text = (Path(__file__).parent.parent / "packaging" / "config.toml").read_text()
    import tomllib
    assert tomllib.loads(text) == {}  # all commented out: the defaults are in force
    documented = tomllib.loads("\n".join(line[1:] for line in text.splitlines()
                                         if line.startswith("#") and " = " in line
                                         and not line.startswith("# ")))
    assert set(documented) == set(settings.KEYS)
    for name, key in settings.KEYS.items():
        assert key.parse(documented[name]) == key.default, name


def test_flags_reach_child_processes_in_the_same_order(tmp_path, monkeypatch):
    config = write(tmp_path / "c.toml", 'run_dir = "/file"\n')
    monkeypatch.setattr(settings, "_flags", {"config": None, "overrides": ()})
    settings.use_flags(config, ["health_interval=2", "run_dir=/flag"])
    assert settings.flag_args() == ["--config", str(config), "--set", "health_interval=2",
                                    "--set", "run_dir=/flag"]
    s = settings.Settings.from_env()
    assert s.run_dir == Path("/flag") and s.health_interval == 2.0
    assert settings.files_in_force()[0] == config


def test_archive_settings_are_settings_like_the_others(tmp_path):
    config = write(tmp_path / "c.toml", 'archive_retain_age = "90d"\narchive_compress = "zlib"\n')
    env = {"AGENTWARDEN_ARCHIVE_SEGMENT_BYTES": "16M", "AGENTWARDEN_ARCHIVE_COMPRESS": "none"}
    s = settings.load(config, ["archive_sync_interval=2s"], environ=env)
    assert (s.archive.retain_age, s.archive.segment_bytes, s.archive.compress, s.archive.sync_interval) == \
        (90 * 86400, 16 << 20, "none", 2.0)
    assert (s.origins["archive_retain_age"], s.origins["archive_compress"], s.origins["archive_sync_interval"]) == \
        (str(config), "environment AGENTWARDEN_ARCHIVE_COMPRESS", "--set")
    assert s.archive.key_file_required is False
    assert settings.load(config, ["archive_key_file=/k"], environ={}).archive.key_file_required is True
    # One duration syntax: what parse_duration refuses, and numbers that are endless or negative.
    for bad in ("archive_retain_age=0.5x", "archive_segment_age=-1", "archive_sync_interval=5m",
                "archive_retain_bytes=lots", "archive_on_disk_full=panic"):
        with pytest.raises(settings.ConfigError):
            settings.load(config, [bad], environ={})
    with pytest.raises(settings.ConfigError, match="finite duration"):
        settings.load(write(tmp_path / "inf.toml", "archive_retain_age = inf\n"), [], environ={})
