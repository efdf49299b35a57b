"""How long a reset hint says to wait: one reader for every place a hint
comes from.

The fault plan's ``CODEX_FAULTS_429_RESET`` and a real provider's reset
headers (``retry-after``, ``x-ratelimit-reset-*``) both name durations.
Read by two parsers they drifted apart (``250us`` and ``1s500ms`` were a
header's durations but a malformed fault setting, and ``retry-after: inf``
closed a provider's gate for good), so an injected 429 and a real one could
disagree on what the same hint means.  Both now read it here.
"""

from __future__ import annotations

import datetime
import math
import re

_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ns": 1e-9}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"  # no sign, exponent, NaN or infinity
_SECONDS = re.compile(_NUMBER, re.ASCII)  # ASCII: int("٣") is 3, but no header or plan spells it so
# "ms" before "m": alternation takes the first unit that matches.
_PART = re.compile(rf"({_NUMBER})(ms|us|µs|μs|ns|h|m|s)", re.ASCII)


def parse_seconds(text: str) -> float | None:
    """A bare decimal number of seconds (``120``, ``1.5``), or ``None``.

    Never negative, NaN or infinite: a hint that cannot be read as a finite
    wait is no hint at all (the caller falls back to its own backoff)."""
    text = text.strip()
    if not _SECONDS.fullmatch(text):
        return None
    seconds = float(text)
    return seconds if math.isfinite(seconds) else None  # 400 nines are inf


def parse_duration(text: str) -> float | None:
    """Seconds in ``text``: a bare number (``120``) or a Go-style duration
    (``90s``, ``1500ms``, ``6m0s``, ``1h2m``, ``250us``, ``1s500ms``), as
    OpenAI's ``x-ratelimit-reset-*`` headers write them; ``None`` when it is
    neither.  Never negative, NaN or infinite."""
    seconds = parse_seconds(text)
    if seconds is not None:
        return seconds
    text = text.strip()
    pos, total = 0, 0.0
    for match in _PART.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos == 0 or pos != len(text) or not math.isfinite(total):
        return None
    return total


def parse_rfc3339(text: str) -> datetime.datetime | None:
    """An RFC 3339 time with its zone (``2026-11-29T17:00:00Z``; the ``T``
    and ``Z`` may be lowercase, and the ``T`` a space, as RFC 3339 allows),
    or ``None``: a time without a zone is no time (whose local time would
    it be?)."""
    text = text.strip()
    if len(text) < 11 or text[10] not in "Tt ":
        return None
    if text[-1:] in ("z", "Z"):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None
