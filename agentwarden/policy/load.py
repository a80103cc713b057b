"""Loading policy files: TOML, validated into a PolicySet, every problem
reported with its file and line (the file format is in the package docstring)."""
from __future__ import annotations

import bisect
import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Any, Iterable

from ..cgroups import validate_agent_name
from ..errors import AgentwardenError
from .glob import GlobError, compile_rule
from ..durations import DurationError, parse_duration
from .model import (ACTIONS, AGENT_KEYS, DEFAULT_HOLD_TIMEOUT, DEFAULT_TRACK, MODES, RULE_LISTS, SIDEDOORS,
                    TRACK_KEY, AgentPolicy, PolicyError, Rule, PolicySet, Problem, RuleList, quoted)


# ---- where things are in a file -------------------------------------------------

def _key_path(fragment: str) -> tuple[str, ...] | None:
    """The key path a TOML fragment defines ('[a.b]' or 'a."b.c" = 0'), or None."""
    try:
        tree: Any = tomllib.loads(fragment)
    except tomllib.TOMLDecodeError:
        return None
    path = []
    while isinstance(tree, dict) and len(tree) == 1:
        (key, tree), = tree.items()
        path.append(key)
    return tuple(path)


class _Locator:
    """Lines of the tables, keys and array strings of a TOML text (tomllib
    reports no positions). Found by scanning: table headers and `key =` lines;
    anything it cannot place gets the line of its nearest located parent."""

    def __init__(self, source: str):
        self.source = source
        lines = source.splitlines(keepends=True)
        self.line_starts = [0]
        for line in lines:
            self.line_starts.append(self.line_starts[-1] + len(line))
        self.keys: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        for number, line in enumerate(lines, 1):
            stripped = line.strip()
            header = _key_path(stripped) if stripped.startswith("[") else None
            if header:
                table = header
                self._place(header, number)
                continue
            key, equals, _ = stripped.partition("=")
            assigned = _key_path(key + "= 0") if equals else None
            if assigned:
                self._place(table + assigned, number)
        self.placed_lines = sorted(set(self.keys.values()))

    def _place(self, path: tuple[str, ...], number: int) -> None:
        for end in range(1, len(path) + 1):
            self.keys.setdefault(path[:end], number)

    def line(self, path: tuple[str, ...]) -> int:
        for end in range(len(path), 0, -1):
            if path[:end] in self.keys:
                return self.keys[path[:end]]
        return 1

    def element_lines(self, path: tuple[str, ...], values: list[Any]) -> list[int]:
        """The line of each string of the array at `path`: searched for as written,
        in order, between the key and the next located line. Anything not found
        (a value that is not a string, a string written with escapes) gets the
        line of the key."""
        key_line = self.line(path)
        position = self.line_starts[key_line - 1]
        following = bisect.bisect_right(self.placed_lines, key_line)
        end = (self.line_starts[self.placed_lines[following] - 1]
               if following < len(self.placed_lines) else len(self.source))
        found_lines = []
        for value in values:
            literals = [json.dumps(value, ensure_ascii=False), f"'{value}'"] if isinstance(value, str) else []
            hits = [(i, len(lit)) for lit in literals if (i := self.source.find(lit, position, end)) >= 0]
            if hits:
                index, length = min(hits)
                position = index + length
                found_lines.append(bisect.bisect_right(self.line_starts, index))
            else:
                found_lines.append(key_line)
        return found_lines


# ---- loading ------------------------------------------------------------------------

def _table_name(path: tuple[str, ...]) -> str:
    return ".".join(p if re.fullmatch(r"[A-Za-z0-9_-]+", p) else json.dumps(p) for p in path)


def _read_policy_file(file: Path, problems: list[Problem]) -> tuple[dict, _Locator] | None:
    try:
        source = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(Problem(file, None, f"cannot read: {exc}"))
        return None
    try:
        return tomllib.loads(source), _Locator(source)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        at = re.search(r" \(at line (\d+), column (\d+)\)$", message)
        if at:
            problems.append(Problem(file, int(at[1]), f"bad TOML: {message[:at.start()]} (column {at[2]})"))
        else:  # "(at end of document)": the last line
            problems.append(Problem(file, max(len(source.splitlines()), 1), f"bad TOML: {message}"))
        return None


class _FileLoader:
    """Validates one parsed policy file, collecting every problem rather than
    stopping at the first."""

    def __init__(self, file: Path, where: _Locator, problems: list[Problem]):
        self.file = file
        self.where = where
        self.problems = problems

    def problem(self, path: tuple[str, ...], message: str) -> None:
        self.problems.append(Problem(self.file, self.where.line(path), message))

    def agents(self, document: dict) -> dict[str, tuple[AgentPolicy, dict]]:
        """Agent name -> (its policy, its canonical content), for the agents without problems."""
        for key in document:
            if key != "agent":
                self.problem((key,), f"unknown key {key!r}: a policy file holds [agent.NAME] tables")
        tables = document.get("agent")
        if not isinstance(tables, dict) or not tables:
            self.problem(("agent",), "defines no agents: add an [agent.NAME] table")
            return {}
        loaded = {}
        for name, table in tables.items():
            before = len(self.problems)
            agent = self._agent(name, table)
            if len(self.problems) == before:
                loaded[name] = agent
        return loaded

    def _agent(self, name: str, table: Any) -> tuple[AgentPolicy, dict] | None:
        at = ("agent", name)
        try:
            validate_agent_name(name)
        except AgentwardenError as exc:
            self.problem(at, str(exc))
        if not isinstance(table, dict):
            self.problem(at, f"agent {name!r} must be a table ([{_table_name(at)}])")
            return None
        self._unknown_keys(table, at, AGENT_KEYS)
        mode = self._choice(table, at, "mode", MODES)
        on_violation = self._choice(table, at, "on-violation", ACTIONS)
        hold_timeout = self._hold_timeout(table, at)
        hold_approvers = self._hold_approvers(table, at)
        rules: dict[str, RuleList] = {}
        canonical: dict[str, Any] = {"mode": mode, "on-violation": on_violation, "hold-timeout": hold_timeout,
                                     "hold-approvers": hold_approvers}
        for section, lists in RULE_LISTS.items():
            section_table = table.get(section, {})
            if not isinstance(section_table, dict):
                self.problem(at + (section,), f"{section} must be a table ([{_table_name(at + (section,))}])")
                section_table = {}
            self._unknown_keys(section_table, at + (section,), lists + ((TRACK_KEY,) if section == "files" else ()))
            for list_name in lists:
                kind = f"{section}.{list_name}"
                rules[kind] = RuleList(self._rules(at + (section, list_name), kind,
                                                   section_table.get(list_name, [])))
                canonical[kind] = sorted({rule.pattern for rule in rules[kind].rules})
        syscalls = self._syscalls(table, at)
        track, track_given = self._track(table, at)
        if track_given:   # only when given, as syscalls: hashes of policies without it stay
            canonical["files.track"] = sorted({rule.pattern for rule in track.rules})
        change_ttl = self._change_ttl(table, at)
        if change_ttl is not None:
            canonical["change-ttl"] = change_ttl
        if syscalls:   # only when given: the hash of a policy without the section stays as it was
            canonical["syscalls.allow"] = sorted(syscalls)
        if not any(rule_list.rules for rule_list in rules.values()):
            self.problem(at, f"agent {name!r} has no rules, so everything it did would be a violation; "
                             f"add rules under [{_table_name(at + ('exec',))}] or [{_table_name(at + ('files',))}]")
        source = f"{self.file}:{self.where.line(at)}"
        return AgentPolicy(name, mode, on_violation, hold_timeout, source, rules,
                           hold_approvers, syscalls, track, change_ttl), canonical

    def _track(self, table: dict, at: tuple[str, ...]) -> tuple[RuleList, bool]:
        """[agent.NAME.files] track = [globs]: the tracked files, and whether the
        policy named them (else DEFAULT_TRACK)."""
        section = table.get("files", {})
        if isinstance(section, dict) and TRACK_KEY in section:
            return RuleList(self._rules(at + ("files", TRACK_KEY), "files.track", section[TRACK_KEY])), True
        return RuleList(compile_rule("files.track", pattern, "default") for pattern in DEFAULT_TRACK), False

    def _change_ttl(self, table: dict, at: tuple[str, ...]) -> float | None:
        """change-ttl = "7d" (or seconds): how long an approved change of a
        tracked file stands before it is reported as expired; None: no limit."""
        if "change-ttl" not in table:
            return None
        value = table["change-ttl"]
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise DurationError("")
            return parse_duration(str(value), "change-ttl", positive=True)
        except DurationError:
            self.problem(at + ("change-ttl",), f"change-ttl must be a positive duration (e.g. \"7d\", "
                                               f"\"12h\", or seconds), not {quoted(value)}")
            return None

    def _syscalls(self, table: dict, at: tuple[str, ...]) -> dict[str, str]:
        """[agent.NAME.syscalls] allow = [side door names]: name -> "file:line"."""
        at = at + ("syscalls",)
        section = table.get("syscalls", {})
        if not isinstance(section, dict):
            self.problem(at, f"syscalls must be a table ([{_table_name(at)}])")
            return {}
        self._unknown_keys(section, at, ("allow",))
        names = section.get("allow", [])
        if not isinstance(names, list):
            self.problem(at + ("allow",), f"syscalls.allow must be a list of strings, not {quoted(names)}")
            return {}
        allowed = {}
        for name, line in zip(names, self.where.element_lines(at + ("allow",), names)):
            if name in SIDEDOORS:
                allowed.setdefault(name, f"{self.file}:{line}")
            else:
                self.problems.append(Problem(self.file, line, f"syscalls.allow holds {quoted(name)}, which is "
                                                              f"no side door; known: {', '.join(SIDEDOORS)}"))
        return allowed

    def _unknown_keys(self, table: dict, at: tuple[str, ...], known: tuple[str, ...]) -> None:
        for key in table:
            if key not in known:
                self.problem(at + (key,), f"unknown key {key!r} in [{_table_name(at)}]: "
                                          f"expected {', '.join(known)}")

    def _choice(self, table: dict, at: tuple[str, ...], key: str, allowed: tuple[str, ...]) -> str:
        value = table.get(key)
        if value not in allowed:
            shown = f"{key} = {quoted(value)}" if key in table else f"no {key}"
            self.problem(at + (key,), f"{shown} in [{_table_name(at)}]: use one of {', '.join(allowed)}")
        return value

    def _hold_timeout(self, table: dict, at: tuple[str, ...]) -> float:
        value = table.get("hold-timeout", DEFAULT_HOLD_TIMEOUT)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            self.problem(at + ("hold-timeout",), f"hold-timeout must be a positive number of seconds, "
                                                 f"not {quoted(value)}")
            return DEFAULT_HOLD_TIMEOUT
        return float(value)

    def _hold_approvers(self, table: dict, at: tuple[str, ...]) -> int:
        value = table.get("hold-approvers", 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.problem(at + ("hold-approvers",), f"hold-approvers must be a whole number of distinct "
                                                   f"admins, 1 or more, not {quoted(value)}")
            return 1
        return value

    def _rules(self, at: tuple[str, ...], kind: str, patterns: Any) -> list[Rule]:
        if not isinstance(patterns, list):
            self.problem(at, f"{kind} must be a list of strings, not {quoted(patterns)}")
            return []
        rules = []
        for pattern, line in zip(patterns, self.where.element_lines(at, patterns)):
            if not isinstance(pattern, str):
                self.problems.append(Problem(self.file, line, f"{kind} holds {quoted(pattern)}: rules are strings"))
                continue
            try:
                rules.append(compile_rule(kind, pattern, f"{self.file}:{line}"))
            except GlobError as exc:
                self.problems.append(Problem(self.file, line, f"bad rule in {kind}: {quoted(pattern)} {exc}"))
        return rules


def _policy_files(paths: Iterable[Path], problems: list[Problem]) -> list[Path]:
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob("*.toml"))
            if not found:
                problems.append(Problem(path, None, "holds no *.toml policy files"))
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            problems.append(Problem(path, None, "no such file or directory"))
    return files


def load_policy(paths: Iterable[Path]) -> PolicySet:
    """Load and validate policy files and directories (their *.toml files).
    Raises PolicyError listing every problem; nothing is half-loaded."""
    problems: list[Problem] = []
    agents: dict[str, AgentPolicy] = {}
    canonical: dict[str, dict] = {}
    files = _policy_files(paths, problems)
    for file in files:
        first_problem = len(problems)
        parsed = _read_policy_file(file, problems)
        if parsed is None:
            continue
        document, where = parsed
        loader = _FileLoader(file, where, problems)
        for name, (agent, content) in loader.agents(document).items():
            if name in agents:
                loader.problem(("agent", name), f"agent {name!r} is already defined at {agents[name].source}")
                continue
            agents[name], canonical[name] = agent, content
        problems[first_problem:] = sorted(problems[first_problem:], key=lambda problem: problem.line)
    if problems:
        raise PolicyError(problems)
    digest = hashlib.sha256(json.dumps(canonical, sort_keys=True, ensure_ascii=False,
                                       separators=(",", ":")).encode("utf-8", "surrogateescape"))
    return PolicySet(agents, f"sha256:{digest.hexdigest()}", tuple(files))

