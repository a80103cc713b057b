"""Per-agent whitelists: policy files, their validated model, and the decision.

Policy files are TOML: by default every ``*.toml`` in /etc/agentwarden/policy.d/,
read in name order. A file holds one or more agents; an agent is defined once
across all files. Example::

    [agent.coder]
    mode = "enforce"          # or "monitor": decide and record, never act
    on-violation = "kill"     # alert | kill | kill-agent | freeze | hold
    hold-timeout = 300        # seconds a held action waits for an admin (default 300)
    hold-approvers = 1        # distinct admins who must approve each hold (default 1)

    [agent.coder.exec]        # programs, by the path that actually ran
    allow = ["/usr/bin/git", "/usr/bin/python3*", "/home/coder/venv/bin/*"]
    hold  = ["/usr/bin/git * push *"]   # executable glob, then an argv pattern
    deny  = ["/usr/bin/curl", "/usr/bin/wget"]

    [agent.coder.files]       # opens; write-allow also allows reading
    read-allow  = ["/usr/**", "/etc/ld.so.cache", "/home/coder/**"]
    write-allow = ["/home/coder/work/**", "/tmp/*"]
    deny        = ["/home/coder/.ssh/**"]

``mode`` and ``on-violation`` are required; an agent needs at least one rule.

Globs are absolute and match normalised paths, lexically: ``*`` matches within
one path component, ``?`` one character, ``[a-z]``/``[!a-z]`` one character of
a class, and ``**`` -- only as a whole component -- zero or more components:
``/src/**`` is /src and everything below it, ``/src/**/*.py`` every .py file
at any depth below /src. Symlinks are not followed here; the resolver decides
which path an event carries.

An exec rule is split into words like a shell line (quote a path with spaces).
The first word is the executable glob; the rest, if any, is an argv pattern
matched against argv[1:] (argv[0] is the caller's to choose). Each word matches
one argument (``*``, ``?`` and ``[...]`` work inside it, ``/`` included); a
word that is only ``*`` stands for any number of arguments, none included. The
pattern is positional: ``/usr/bin/git * push *`` holds ``git push``,
``git -C repo push origin``, and also ``git commit -m push``.

How `decide` works:

- Precedence: deny beats hold beats allow; whatever no rule allows is a
  violation (a whitelist). The verdict names the deciding rule with file:line.
  Files have no hold rules. A violation carries the agent's ``on-violation``
  action; a deny carries none: a rule forbids the action outright.
- An exec is judged by ``resolved_exec_path``, what the kernel actually ran.
  Only when the kernel reported nothing (the exec failed or was not seen) is
  ``resolved_filename``, the path asked for, used instead; the reason says so.
- An open is a write when its flags ask for write access or O_CREAT, O_TRUNC or
  O_APPEND; otherwise it is a read.
- Failed calls (ret < 0) are decided like successful ones: an attempt is an
  attempt.
- A path the daemon could not resolve (None) matches no rule, so it is always a
  violation.
- Running the dynamic loader as the program (``ld-linux*.so* /usr/bin/curl``)
  or a program from a file descriptor (``/dev/fd/N``, ``/proc/PID/fd/N``,
  ``/memfd:NAME``) is allowed only by an allow rule whose executable glob
  itself has that shape (``/lib64/ld-linux-x86-64.so.2``, ``/dev/fd/*``), not by
  a broad one such as ``/**``. Deny and hold rules apply as usual.
- When the kernel cut argv short, argv patterns cannot be checked: deny and hold
  rules with an argv pattern match on their executable alone, allow rules with
  one do not match.
- An event of an agent without a policy is a violation in monitor mode with
  the action alert: it is recorded, never acted on.

Each loaded policy set has a hash, sha256 of its canonical content (agents,
settings and sorted rules; not formatting, comments or file layout), which
every verdict carries.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..cgroups import validate_agent_name
from ..errors import AgentwardenError
from ..wire import text

MODES = ("monitor", "enforce")
ACTIONS = ("alert", "kill", "kill-agent", "freeze", "hold")
DEFAULT_HOLD_TIMEOUT = 300.0
# section -> rule lists. The one definition of what rules exist.
RULE_LISTS = {"exec": ("allow", "hold", "deny"), "files": ("read-allow", "write-allow", "deny")}
AGENT_KEYS = ("mode", "on-violation", "hold-timeout", "hold-approvers", *RULE_LISTS)

# Which rule lists are consulted, in order, and the decision each gives.
EXEC_PRECEDENCE = (("exec.deny", "deny"), ("exec.hold", "hold"), ("exec.allow", "allow"))
FILE_PRECEDENCE = {
    "read": (("files.deny", "deny"), ("files.read-allow", "allow"), ("files.write-allow", "allow")),
    "write": (("files.deny", "deny"), ("files.write-allow", "allow")),
}

# Routes that run code a path whitelist would not see: the dynamic loader run as
# the program (it maps the real program itself), and a file run through a
# descriptor (a memfd, an unlinked file). The kernel reports /dev/fd/N for
# execveat(AT_EMPTY_PATH); /proc/PID/fd/N and /memfd:NAME come from paths and
# from fd links.
_INDIRECT_ROUTES = (
    (re.compile(r"(?:^|/)ld-(?:linux|musl)[^/]*\.so[^/]*$"), "the dynamic loader run as a program"),
    (re.compile(r"^(?:/dev/fd/|/proc/[^/]+/fd/|/memfd:)"), "a program run from a file descriptor"),
)

_ANY_ARGS = r"(?:\x00[^\x00]*)*"
_WILDCARD = re.compile(r"[*?\[]")


def _indirect_route(path_or_glob: str) -> str | None:
    """What indirect route a path takes (or a glob names), or None."""
    return next((what for regex, what in _INDIRECT_ROUTES if regex.search(path_or_glob)), None)


# ---- model ------------------------------------------------------------------

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


class GlobError(ValueError):
    """A rule pattern that cannot be compiled; the message says why."""


@dataclass(frozen=True)
class Rule:
    kind: str                  # "exec.allow", "files.deny", ... (section.list)
    pattern: str               # as written in the file
    source: str                # "file:line"
    regex: re.Pattern          # over the subject of an exec or an open (see _exec_subject)
    prefix: tuple[str, ...]    # the literal components the path glob starts with
    # What the regex is made from (see _word_tokens), for the fast path's compiled rules:
    path_parts: tuple = ()     # per path component its tokens (None for `**`)
    argv_parts: tuple | None = None   # per argv word its tokens (None for `*`); None: no argv pattern

    def __str__(self) -> str:
        return f"{self.kind} {_shown(self.pattern)} at {self.source}"


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


# ---- globs --------------------------------------------------------------------

def _class(glob: str, start: int, forbidden: str) -> tuple[str, int]:
    """The regex of the character class opening at glob[start] ('['), and the
    index after it. It never matches `forbidden`, even when named in it."""
    i = start + 1
    negated = glob.startswith("!", i)
    i += negated
    body_start = i
    if glob.startswith("]", i):  # a ']' right after '[' or '[!' is literal
        i += 1
    end = glob.find("]", i)
    if end < 0:
        raise GlobError(f"'[' at character {start + 1} is never closed")
    body = "".join(c if c == "-" else re.escape(c) for c in glob[body_start:end])
    try:
        re.compile(f"[{body}]")
    except re.error as exc:
        raise GlobError(f"bad character class {glob[start:end + 1]!r}: {exc}") from None
    regex = f"[^{re.escape(forbidden)}{body}]" if negated else f"(?![{re.escape(forbidden)}])[{body}]"
    return regex, end + 1


# A glob is parsed once into tokens; the regexes here and the fast path's
# compiled rules (daemon/fastpath.py) are both made from them. A token is
# (ANY, ""), (ONE, ""), (CLASS, its regex) or (CHAR, the character).
ANY, ONE, CLASS, CHAR = "any", "one", "class", "char"
# What no token of a path component matches: '/', and NUL, so that a path
# glob never reaches into the arguments of an exec subject; an argument's: NUL.
PATH_FORBIDDEN = "/\x00"
ARG_FORBIDDEN = "\x00"


def _word_tokens(word: str, forbidden: str) -> tuple[tuple[str, str], ...]:
    """One path component or one argument; no token matches a character of `forbidden`."""
    tokens, i = [], 0
    while i < len(word):
        char = word[i]
        if char == "[":
            regex, i = _class(word, i, forbidden)
            tokens.append((CLASS, regex))
            continue
        tokens.append((ANY, "") if char == "*" else (ONE, "") if char == "?" else (CHAR, char))
        i += 1
    return tuple(tokens)


def _tokens_regex(tokens: tuple[tuple[str, str], ...], forbidden: str) -> str:
    """`*` and `?` never match `forbidden`."""
    other = f"[^{re.escape(forbidden)}]"
    return "".join(other + "*" if kind == ANY else other if kind == ONE else
                   value if kind == CLASS else re.escape(value) for kind, value in tokens)


def _path_parts(glob: str) -> tuple[tuple | None, ...]:
    """A path glob's components as tokens; None stands for `**` (any number of components)."""
    if not glob.startswith("/"):
        raise GlobError("is not an absolute path (it must start with '/')")
    parts = []
    for component in (glob[1:].split("/") if glob != "/" else []):
        if component == "**":
            parts.append(None)
        elif "**" in component:
            raise GlobError(f"'**' must be a whole path component (as in /src/**/*.py), not {component!r}")
        elif component in ("", ".", ".."):
            raise GlobError("has an empty, '.' or '..' component; paths are normalised "
                            "before matching, so it would never match")
        else:
            parts.append(_word_tokens(component, PATH_FORBIDDEN))
    return tuple(parts)


def _parts_regex(parts: tuple[tuple | None, ...]) -> str:
    """Path parts as a regex over a path key (see _path_key): every component
    ends with '/', so that `**` can stand for zero components."""
    other = f"[^{re.escape(PATH_FORBIDDEN)}]"
    return "/" + "".join(f"(?:{other}+/)*" if part is None else _tokens_regex(part, PATH_FORBIDDEN) + "/"
                         for part in parts)


def _path_regex(glob: str) -> str:
    return _parts_regex(_path_parts(glob))


def _path_key(path: str) -> str:
    """How a path is matched against _path_regex: '/a/b' -> '/a/b/', '/' -> '/'."""
    return path.rstrip("/") + "/"


def _argv_parts(words: list[str]) -> tuple[tuple | None, ...]:
    """An argv pattern's words as tokens; None stands for `*` (any number of arguments)."""
    return tuple(None if word == "*" else _word_tokens(word, ARG_FORBIDDEN) for word in words)


def _argv_regex(parts: tuple[tuple | None, ...]) -> str:
    return "".join(_ANY_ARGS if part is None else "\x00" + _tokens_regex(part, ARG_FORBIDDEN)
                   for part in parts)


# An exec is matched as one string, so that each rule is one regex that sees
# everything it may depend on:
#     ROUTE TRUNCATED path-key ("\0" argument)*
# ROUTE is "i" for an indirect route, else "-"; TRUNCATED is "t" when the kernel
# cut argv short, else "-". Both sit at fixed places a path cannot reach.
def _exec_subject(path: str, args: list[str], indirect: bool, truncated: bool) -> str:
    flags = ("i" if indirect else "-") + ("t" if truncated else "-")
    return flags + _path_key(path) + "".join("\x00" + arg for arg in args)


def _exec_rule(kind: str, rule_text: str) -> tuple[str, str, tuple, tuple | None]:
    """An exec rule's regex over _exec_subject, its executable glob, and its
    path and argv parts (None: no argv pattern)."""
    try:
        words = shlex.split(rule_text)
    except ValueError as exc:
        raise GlobError(f"cannot be split into words: {exc}") from None
    if not words:
        raise GlobError("is empty")
    parts = _path_parts(words[0])
    path = _parts_regex(parts)
    is_allow = kind == "exec.allow"
    route = "[i-]" if not is_allow or _indirect_route(words[0]) else "-"
    if len(words) == 1:
        return f"{route}[t-]{path}{_ANY_ARGS}", words[0], parts, None
    argv_parts = _argv_parts(words[1:])
    argv = _argv_regex(argv_parts)
    if is_allow:
        return f"{route}-{path}{argv}", words[0], parts, argv_parts
    return f"{route}(?:-{path}{argv}|t{path}{_ANY_ARGS})", words[0], parts, argv_parts


def _compile_rule(kind: str, pattern: str, source: str) -> Rule:
    if "\x00" in pattern:
        raise GlobError("contains a NUL character, which no path or argument can")
    if kind.startswith("exec."):
        regex, path_glob, parts, argv_parts = _exec_rule(kind, pattern)
    else:
        path_glob, parts, argv_parts = pattern, _path_parts(pattern), None
        regex = _parts_regex(parts)
    prefix = itertools.takewhile(lambda component: not _WILDCARD.search(component), path_glob.split("/")[1:])
    return Rule(kind, pattern, source, re.compile(regex), tuple(prefix), parts, argv_parts)


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

def _shown(value: Any) -> str:
    """A TOML value in a message, quoted like JSON (dates as text)."""
    return json.dumps(value, ensure_ascii=False, default=str)


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
            self._unknown_keys(section_table, at + (section,), lists)
            for list_name in lists:
                kind = f"{section}.{list_name}"
                rules[kind] = RuleList(self._rules(at + (section, list_name), kind,
                                                   section_table.get(list_name, [])))
                canonical[kind] = sorted({rule.pattern for rule in rules[kind].rules})
        if not any(rule_list.rules for rule_list in rules.values()):
            self.problem(at, f"agent {name!r} has no rules, so everything it did would be a violation; "
                             f"add rules under [{_table_name(at + ('exec',))}] or [{_table_name(at + ('files',))}]")
        source = f"{self.file}:{self.where.line(at)}"
        return AgentPolicy(name, mode, on_violation, hold_timeout, source, rules,
                           hold_approvers), canonical

    def _unknown_keys(self, table: dict, at: tuple[str, ...], known: tuple[str, ...]) -> None:
        for key in table:
            if key not in known:
                self.problem(at + (key,), f"unknown key {key!r} in [{_table_name(at)}]: "
                                          f"expected {', '.join(known)}")

    def _choice(self, table: dict, at: tuple[str, ...], key: str, allowed: tuple[str, ...]) -> str:
        value = table.get(key)
        if value not in allowed:
            shown = f"{key} = {_shown(value)}" if key in table else f"no {key}"
            self.problem(at + (key,), f"{shown} in [{_table_name(at)}]: use one of {', '.join(allowed)}")
        return value

    def _hold_timeout(self, table: dict, at: tuple[str, ...]) -> float:
        value = table.get("hold-timeout", DEFAULT_HOLD_TIMEOUT)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            self.problem(at + ("hold-timeout",), f"hold-timeout must be a positive number of seconds, "
                                                 f"not {_shown(value)}")
            return DEFAULT_HOLD_TIMEOUT
        return float(value)

    def _hold_approvers(self, table: dict, at: tuple[str, ...]) -> int:
        value = table.get("hold-approvers", 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.problem(at + ("hold-approvers",), f"hold-approvers must be a whole number of distinct "
                                                   f"admins, 1 or more, not {_shown(value)}")
            return 1
        return value

    def _rules(self, at: tuple[str, ...], kind: str, patterns: Any) -> list[Rule]:
        if not isinstance(patterns, list):
            self.problem(at, f"{kind} must be a list of strings, not {_shown(patterns)}")
            return []
        rules = []
        for pattern, line in zip(patterns, self.where.element_lines(at, patterns)):
            if not isinstance(pattern, str):
                self.problems.append(Problem(self.file, line, f"{kind} holds {_shown(pattern)}: rules are strings"))
                continue
            try:
                rules.append(_compile_rule(kind, pattern, f"{self.file}:{line}"))
            except GlobError as exc:
                self.problems.append(Problem(self.file, line, f"bad rule in {kind}: {_shown(pattern)} {exc}"))
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


# ---- deciding -----------------------------------------------------------------------

def is_write(flags: int) -> bool:
    """Whether open flags modify the file: write access, create, truncate or append."""
    return (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & (os.O_CREAT | os.O_TRUNC | os.O_APPEND))


def _executable(event: dict) -> tuple[str | None, str | None]:
    """The path an exec is judged by (None when unresolved), and a note when it
    is not what the kernel ran."""
    ran = event.get("resolved_exec_path")
    if ran is not None or event.get("exec_path"):
        return (os.fsdecode(ran) if ran is not None else None), None
    asked = event.get("resolved_filename")
    return (os.fsdecode(asked) if asked is not None else None,
            "the kernel did not report what ran (the exec failed or was not seen): "
            "judged by the path asked for")


def _decide(agent: AgentPolicy, policy_hash: str, what: str, target: tuple[str, str] | None,
            precedence: tuple[tuple[str, str], ...], notes: list[str]) -> Verdict:
    """Apply one precedence list to a target, (path, subject); None when the path is unresolved."""
    def verdict(decision: str, rule: Rule | None, reason: str) -> Verdict:
        action = agent.on_violation if decision == "violation" else None
        return Verdict(decision, action, str(rule) if rule else None,
                       "; ".join([reason, *notes]), policy_hash, agent.mode)

    if target is None:
        return verdict("violation", None, f"{what}: the path could not be resolved, and an unresolved "
                                          f"path never matches an allow rule (on-violation {agent.on_violation})")
    for index, (kind, decision) in enumerate(precedence):
        rule = agent.rules[kind].first_match(*target)
        if rule:
            earlier = " or ".join(name for name, _ in precedence[:index])
            return verdict(decision, rule, f"{what} matches {kind}"
                                           + (f" and no {earlier} rule" if earlier else ", which beats every other rule"))
    return verdict("violation", None, f"{what} matches no allow rule, and whatever is not allowed "
                                      f"is a violation (on-violation {agent.on_violation})")


def decide(event: dict, policy: PolicySet) -> Verdict:
    """The verdict on one exec or open record as the daemon enriched it
    (``agent``; ``resolved_exec_path`` and ``resolved_filename``, or
    ``resolved_path``). Pure: no I/O, no state. Failed calls (ret < 0) are
    decided like successful ones -- an attempt is an attempt. The rules are in
    the module docstring."""
    kind = event["kind"]
    if kind not in ("exec", "open"):
        raise ValueError(f"decide() takes exec and open records, not {kind!r}")
    agent = policy.agents.get(event.get("agent"))
    if agent is None:
        return Verdict("violation", "alert", None, f"no policy for agent {event.get('agent')!r}: recorded only",
                       policy.hash, "monitor")
    notes = []
    if event.get("ret", 0) < 0:
        notes.append(f"the call failed ({event.get('error')}), but an attempt is decided like a success")
    if kind == "exec":
        path, how = _executable(event)
        if how:
            notes.append(how)
        args = [os.fsdecode(arg) for arg in event["argv"][1:]]
        truncated = event["argv_truncated"]
        if truncated:
            notes.append("argv was cut short: deny and hold rules with argv patterns match on the "
                         "executable alone, allow rules with argv patterns do not match")
        route = _indirect_route(path) if path is not None else None
        if route:
            notes.append(f"this is {route}: only an allow rule that names such a path allows it")
        shown = path if path is not None else repr(text(event.get("exec_path") or event.get("filename", "")))
        what = "exec of " + " ".join([shown, *args])
        target = (path, _exec_subject(path, args, bool(route), truncated)) if path is not None else None
        return _decide(agent, policy.hash, what, target, EXEC_PRECEDENCE, notes)
    access = "write" if is_write(event["flags"]) else "read"
    resolved = event.get("resolved_path")
    path = os.fsdecode(resolved) if resolved is not None else None
    shown = path if path is not None else repr(text(event.get("path", "")))
    target = (path, _path_key(path)) if path is not None else None
    return _decide(agent, policy.hash, f"{access} of {shown}", target, FILE_PRECEDENCE[access], notes)


# ---- rules the kernel can decide alone ------------------------------------------

@dataclass(frozen=True)
class KernelRule:
    """A deny the BPF program enforces itself: an exact absolute path, or
    every path under a directory (``path`` then ends in '/')."""
    agent: str
    path: str
    exact: bool
    applies: str           # "exec" or "open"
    rule: str              # the policy rule, with file:line


KERNEL_PATH_MAX = 251      # bytes; the BPF trie holds 252 with the NUL
# Killing the process in the kernel is what these actions ask for (at least).
KERNEL_KILL_ACTIONS = ("kill", "kill-agent")


def kernel_deny_rules(policy: PolicySet) -> list[KernelRule]:
    """Deny rules of enforcing agents whose violations kill, that are a literal
    path or a literal directory followed by '/**' (and, for exec, have no argv
    pattern). Monitor agents get none: monitor mode never acts. Everything else is left to the
    daemon, which also backs these up for relative or unusual spellings."""
    found: list[KernelRule] = []
    for agent in policy.agents.values():
        if agent.mode != "enforce" or agent.on_violation not in KERNEL_KILL_ACTIONS:
            continue
        for kind, applies in (("exec.deny", "exec"), ("files.deny", "open")):
            for rule in agent.rules[kind].rules:
                words = shlex.split(rule.pattern) if applies == "exec" else [rule.pattern]
                if len(words) != 1 or "\\" in words[0]:
                    continue
                glob = words[0]
                if not _WILDCARD.search(glob):
                    candidates = [(glob, True)]
                elif glob.endswith("/**") and not _WILDCARD.search(glob[:-3]):
                    base = glob[:-3]
                    candidates = [(base or "/", True), (base + "/", False)]
                else:
                    continue
                for path, exact in candidates:
                    if len(os.fsencode(path)) <= KERNEL_PATH_MAX:
                        found.append(KernelRule(agent.name, path, exact, applies, str(rule)))
    return found
