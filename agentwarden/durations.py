"""The one duration parser: settings, `--remember`, `--since` and the
supervisor's admin protocol all read durations with it.

A duration is a non-negative decimal number with an optional unit (s, m, h,
d; seconds without one): '90', '0.5s', '15m', '2h', '7d'. 'inf', 'nan',
exponents and signs are refused, so no duration is endless or negative.
"""
from __future__ import annotations

import re

from .errors import UsageProblem

UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", re.IGNORECASE)
EXAMPLES = "e.g. 90s, 15m, 2h, 1d"


class DurationError(UsageProblem, ValueError):
    """Text that is not a duration (a ValueError too, for protocol handlers)."""


def parse_duration(text: str, what: str = "duration", positive: bool = False) -> float:
    """Seconds from a duration; `positive` refuses zero."""
    match = _DURATION.fullmatch(text) if isinstance(text, str) else None
    if not match:
        raise DurationError(f"{what}: {text!r} is not a duration ({EXAMPLES})")
    seconds = float(match.group(1)) * UNITS[match.group(2).lower()]
    if positive and seconds <= 0:
        raise DurationError(f"{what}: a duration must be positive, not {text!r}")
    return seconds


def has_unit(text: str) -> bool:
    """Whether text ends in a duration unit ('10m' yes, '1714557600' no)."""
    return text.strip()[-1:].lower() in ("s", "m", "h", "d")
