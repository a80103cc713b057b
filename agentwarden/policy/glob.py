"""The glob compiler: a rule as written in a policy file becomes a Rule, one
regex over the subject of an exec or an open (the syntax is in the package
docstring). logquery's --path filter uses the same path globs."""
from __future__ import annotations

import itertools
import re
import shlex

from .model import Rule


class GlobError(ValueError):
    """A rule pattern that cannot be compiled; the message says why."""


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
# A glob component with any of these is not literal.
WILDCARD = re.compile(r"[*?\[]")


def indirect_route(path_or_glob: str) -> str | None:
    """What indirect route a path takes (or a glob names), or None."""
    return next((what for regex, what in _INDIRECT_ROUTES if regex.search(path_or_glob)), None)


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
    """Path parts as a regex over a path key (see path_key): every component
    ends with '/', so that `**` can stand for zero components."""
    other = f"[^{re.escape(PATH_FORBIDDEN)}]"
    return "/" + "".join(f"(?:{other}+/)*" if part is None else _tokens_regex(part, PATH_FORBIDDEN) + "/"
                         for part in parts)


def path_regex(glob: str) -> str:
    """A path glob as a regex over path_key(path)."""
    return _parts_regex(_path_parts(glob))


def path_key(path: str) -> str:
    """How a path is matched against path_regex: '/a/b' -> '/a/b/', '/' -> '/'."""
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
def exec_subject(path: str, args: list[str], indirect: bool, truncated: bool) -> str:
    flags = ("i" if indirect else "-") + ("t" if truncated else "-")
    return flags + path_key(path) + "".join("\x00" + arg for arg in args)


def _exec_rule(kind: str, rule_text: str) -> tuple[str, str, tuple, tuple | None]:
    """An exec rule's regex over exec_subject, its executable glob, and its
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
    route = "[i-]" if not is_allow or indirect_route(words[0]) else "-"
    if len(words) == 1:
        return f"{route}[t-]{path}{_ANY_ARGS}", words[0], parts, None
    argv_parts = _argv_parts(words[1:])
    argv = _argv_regex(argv_parts)
    if is_allow:
        return f"{route}-{path}{argv}", words[0], parts, argv_parts
    return f"{route}(?:-{path}{argv}|t{path}{_ANY_ARGS})", words[0], parts, argv_parts


def compile_rule(kind: str, pattern: str, source: str) -> Rule:
    """A rule of list `kind` ("exec.allow", "files.deny", ...) as written at
    `source` ("file:line"); GlobError says why it cannot be compiled."""
    if "\x00" in pattern:
        raise GlobError("contains a NUL character, which no path or argument can")
    if kind.startswith("exec."):
        regex, path_glob, parts, argv_parts = _exec_rule(kind, pattern)
    else:
        path_glob, parts, argv_parts = pattern, _path_parts(pattern), None
        regex = _parts_regex(parts)
    prefix = itertools.takewhile(lambda component: not WILDCARD.search(component), path_glob.split("/")[1:])
    return Rule(kind, pattern, source, re.compile(regex), tuple(prefix), parts, argv_parts)
