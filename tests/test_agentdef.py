"""Agent definitions -> systemd drop-ins for agent@NAME.service."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentwarden import agentdef
from agentwarden.agentdef import AgentDefError


def define(tmp_path: Path, name: str, text: str) -> Path:
    d = tmp_path / "agents"
    d.mkdir(exist_ok=True)
    (d / f"{name}.toml").write_text(text)
    return d


FULL = '''
command = ["/usr/bin/python3", "-c", "print('100% \\"done\\" $HOME')"]
user = "coder"
group = "coders"
workdir = "/srv/coder"
[environment]
LANG = "C.UTF-8"
[task]
owner = "alice"
ticket = "OPS-1"
'''


def test_a_full_definition_becomes_a_dropin(tmp_path):
    agent = agentdef.load(define(tmp_path, "coder", FULL), "coder")
    assert agent.command == ["/usr/bin/python3", "-c", "print('100% \"done\" $HOME')"]
    text = agentdef.dropin(agent)
    # The unit starts `run` as root; run switches to the user and group.
    assert "[Service]\nWorkingDirectory=/srv/coder\n" in text and "User=" not in text
    assert 'Environment="AGENTWARDEN_AGENT=coder"' in text
    assert 'Environment="AGENTWARDEN_TASK_OWNER=alice"' in text
    assert 'Environment="AGENTWARDEN_TASK_TICKET=OPS-1"' in text
    assert 'Environment="LANG=C.UTF-8"' in text
    # ExecStart= is reset, then set to a held session with the task as its
    # attribution; % and $ cannot be expanded by systemd.
    assert '\nExecStart=\nExecStart="/usr/bin/agentwarden" "run" "--agent" "coder" "--user" "coder" ' \
           '"--group" "coders" "--task" "ticket=OPS-1" "--on-behalf-of" "alice" "--" ' \
           '"/usr/bin/python3" "-c" "print(\'100%% \\"done\\" $$HOME\')"\n' in text


def test_minimal_definition_and_string_command(tmp_path):
    agent = agentdef.load(define(tmp_path, "r", 'command = "/bin/sh -c \'sleep 1\'"\nuser = "nobody"\n'), "r")
    assert agent.command == ["/bin/sh", "-c", "sleep 1"]
    text = agentdef.dropin(agent)
    # No workdir: the user's home (systemd's ~ would be root's: the unit starts as root).
    assert "WorkingDirectory=/nonexistent\n" in text and "--group" not in text


@pytest.mark.parametrize("text, message", [
    ('user = "x"\n', "command is required"),
    ('command = []\nuser = "x"\n', "command is required"),
    ('command = ["sh"]\nuser = "x"\n', "must be an absolute path"),
    ('command = "/bin/sh \'unterminated"\nuser = "x"\n', "command: No closing quotation"),
    ('command = ["/bin/true"]\n', "user is required"),
    ('command = ["/bin/true"]\nuser = "a\\nExecStartPre=/bin/evil"\n', "user is required"),
    ('command = ["/bin/true"]\nuser = "x"\ngroup = ""\n', "group must be a group name"),
    ('command = ["/bin/true"]\nuser = "x"\nworkdir = "rel"\n', "workdir must be an absolute path"),
    ('command = ["/bin/true"]\nuser = "x"\nworkdir = "/a\\nb"\n', "workdir must be an absolute path"),
    ('command = ["/bin/true"]\nuser = "x"\nenvironment = { "1X" = "y" }\n', "not a valid variable name"),
    ('command = ["/bin/true"]\nuser = "x"\n[task]\nowner = 3\n', "task.owner must be a string"),
    ('command = ["/bin/true"]\nuser = "x"\nshell = "/bin/sh"\n', "unknown key(s) shell"),
    ('command = ["/bin/true"\n', "not valid TOML"),
])
def test_bad_definitions_name_the_file_and_the_problem(tmp_path, text, message):
    d = define(tmp_path, "bad", text)
    with pytest.raises(AgentDefError) as exc:
        agentdef.load(d, "bad")
    assert message in str(exc.value) and str(d / "bad.toml") in str(exc.value)


def test_missing_and_invalid_names(tmp_path):
    with pytest.raises(AgentDefError, match="create .*nobody-here.toml"):
        agentdef.load(tmp_path, "nobody-here")
    with pytest.raises(AgentDefError, match="not a valid agent name"):
        agentdef.load(tmp_path, "../etc/passwd")


def test_generator_writes_dropins_for_valid_definitions_only(tmp_path):
    d = define(tmp_path, "good", 'command = ["/bin/true"]\nuser = "nobody"\n')
    define(tmp_path, "broken", 'command = 1\n')
    out = tmp_path / "generated"
    problems = agentdef.generate(d, out)
    assert (out / "agent@good.service.d" / agentdef.DROPIN_NAME).is_file()
    assert not (out / "agent@broken.service.d").exists()
    assert len(problems) == 1 and "broken.toml" in problems[0]


def test_accounts_in_the_admin_group_are_refused(tmp_path):
    agent = agentdef.load(define(tmp_path, "r", 'command = ["/bin/true"]\nuser = "root"\n'), "r")
    assert agentdef.check_accounts(agent, "root") and "admin group" in agentdef.check_accounts(agent, "root")[0]
    assert agentdef.check_accounts(agent, "") == []
    nobody = agentdef.load(define(tmp_path, "n", 'command = ["/bin/true"]\nuser = "no-such-user-x"\n'), "n")
    assert "does not exist" in agentdef.check_accounts(nobody, "")[0]


def test_agent_config_command(tmp_path):
    d = define(tmp_path, "good", 'command = ["/bin/true"]\nuser = "nobody"\n')
    env = {**os.environ, "AGENTWARDEN_AGENTS_DIR": str(d), "AGENTWARDEN_ADMIN_GROUP": ""}
    run = lambda *a: subprocess.run([sys.executable, "-m", "agentwarden", *a], capture_output=True,
                                    text=True, env=env, timeout=60)
    result = run("agent-config")
    assert result.returncode == 0, result.stderr
    assert "# agent@good.service (OK)" in result.stdout
    assert 'ExecStart="/usr/bin/agentwarden" "run" "--agent" "good" "--user" "nobody" "--" "/bin/true"' \
        in result.stdout
    result = run("agent-config", "missing")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "no definition for agent 'missing'" in result.stderr
    # What agent@good.service runs when the generator has not run yet.
    result = run("agent-config", "--unit-fallback", "good")
    assert result.returncode == 1 and "systemctl daemon-reload" in result.stderr
