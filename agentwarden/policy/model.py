"""The validated policy: agents, their rule lists, and the verdict; what
policy files may say (modes, actions, rule lists) and what is wrong with one."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import AgentwardenError
from ..headers import header_constants

MODES = ("monitor", "enforce")
ACTIONS = ("alert", "kill", "kill-agent", "freeze", "hold")
DEFAULT_HOLD_TIMEOUT = 300.0
# section -> rule lists. The one definition of what rules exist.
RULE_LISTS = {"exec": ("allow", "hold", "deny"), "files": ("read-allow", "write-allow", "deny")}
# Side doors, as [agent.NAME.syscalls] allow names them: calls that reach
# files without the open syscalls, or change what paths mean. The names are
# the BPF header's AW_SIDEDOOR_* (one bit each), lower case.
SIDEDOORS = tuple(name[len("AW_SIDEDOOR_"):].lower() for name in header_constants()
                  if name.startswith("AW_SIDEDOOR_"))
AGENT_KEYS = ("mode", "on-violation", "hold-timeout", "hold-approvers", *RULE_LISTS, "syscalls", "change-ttl")
# [agent.NAME.files] track: the files whose changes are kept for drift
# (content before and after, attribution, expiry); not a rule list, it decides
# nothing. An agent that does not say is tracked in /etc.
TRACK_KEY = "track"
DEFAULT_TRACK = ("/etc/**",)


def quoted(value: Any) -> str:
    """A TOML value in a message, quoted like JSON (dates as text)."""
    return json.dumps(value, ensure_ascii=False, default=str)


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a policy file."""
    file: Path
    line: int | None  # None when the file itself could not be read
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else str(self.file)
        return f"{where}: {self.message}"


class PolicyError(AgentwardenError):
    """A policy that did not load; `problems` lists everything wrong with it."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        more = (f" (and {len(problems) - 1} more; `agentwarden policy check` lists them all)"
                if len(problems) > 1 else "")
        super().__init__(f"{problems[0]}{more}")


@dataclass(frozen=True)
class Rule:
    kind: str                  # "exec.allow", "files.deny", ... (section.list)
    pattern: str               # as written in the file
    source: str                # "file:line"
    regex: re.Pattern          # over the subject of an exec or an open (see glob.exec_subject)
    prefix: tuple[str, ...]    # the literal components the path glob starts with
    # What the regex is made from (glob.py's tokens), for the fast path's compiled rules:
    path_parts: tuple = ()     # per path component its tokens (None for `**`)
    argv_parts: tuple | None = None   # per argv word its tokens (None for `*`); None: no argv pattern

    def __str__(self) -> str:
        return f"{self.kind} {quoted(self.pattern)} at {self.source}"


class _Node:
    """One level of a RuleList index: the rules whose literal prefix ends here,
    and the next levels by path component."""
    __slots__ = ("children", "rules")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.rules: list[int] = []


class RuleList:
    """The rules of one list, indexed by the literal components their path globs
    start with, so that a decision tries only the rules that could match however
    many there are. The first rule in file order wins."""

    def __init__(self, rules: Iterable[Rule]):
        self.rules = tuple(rules)
        self._root = _Node()
        for number, rule in enumerate(self.rules):
            node = self._root
            for component in rule.prefix:
                node = node.children.setdefault(component, _Node())
            node.rules.append(number)

    def first_match(self, path: str, subject: str) -> Rule | None:
        node, candidates = self._root, list(self._root.rules)
        for component in path.split("/")[1:]:
            node = node.children.get(component)
            if node is None:
                break
            candidates += node.rules
        for number in sorted(candidates):
            if self.rules[number].regex.fullmatch(subject):
                return self.rules[number]
        return None


@dataclass(frozen=True)
class AgentPolicy:
    name: str
    mode: str
    on_violation: str
    hold_timeout: float
    source: str                    # "file:line" of the agent's table
    rules: dict[str, RuleList]     # "exec.allow" -> its rules, for every kind
    hold_approvers: int = 1        # distinct admins who must approve a hold
    syscalls: dict[str, str] = field(default_factory=dict)   # side door allowed -> "file:line"
    track: RuleList = field(default_factory=lambda: RuleList(()))   # files.track: changes kept for drift
    change_ttl: float | None = None   # seconds an approved change stands before it is reported expired

    def tracks(self, path: str | None) -> bool:
        """Whether changes to path are kept (files.track)."""
        return bool(path) and self.track.first_match(path, path.rstrip("/") + "/") is not None   # glob.path_key


@dataclass(frozen=True)
class PolicySet:
    agents: dict[str, AgentPolicy]
    hash: str                      # "sha256:<hex>" of the canonical content
    files: tuple[Path, ...]


@dataclass(frozen=True)
class Verdict:
    decision: str          # allow | deny | hold | violation
    action: str | None     # violations only: the agent's on-violation action
    rule: str | None       # the deciding rule with file:line; None when no rule matched
    reason: str
    policy_hash: str
    mode: str              # monitor: record only; enforce: act on it
