"""The live token footer of ``conclave run``, and its plain-text fallback.

Formats follow the reference's TokenMetricsWidget (speckit-facts 4.4)::

    Tokens: 12.5k in / 3.2k out | Turn 5 | Est: ~4.0k | Ctx: 45% | $0.12   (width > 60)
    12.5k/3.2k | T5 | ~4.0k | 45%                                        (narrow)

Colour by the level - the larger of context utilisation and budget used -
red above 90 %, yellow above 80 %, cyan above 60 %, else green; " ⚠" is
appended above 90 % and " ⚡" above 80 %.  ``NO_COLOR`` (set and not
empty, see no-color.org) turns colour off.

On a terminal the footer is one line redrawn in place; every other line of
output is written through :class:`LiveFooter`, which erases the footer,
writes, and draws it again below.  Elsewhere :class:`PlainMetrics` prints a
plain ``metrics:`` line at most every ``interval`` seconds (trio clock),
plus the final one.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Callable, Mapping
from typing import Protocol

import trio

from messages import TokenMetrics

from ._budget import usd, usd_of
from ._format import tokens
from ._snapshots import MetricsSubscription

RESET = "\x1b[0m"
ERASE = "\r\x1b[2K"
COLOURS = {"red": "\x1b[31m", "yellow": "\x1b[33m", "cyan": "\x1b[36m", "green": "\x1b[32m"}
FULL_MIN_WIDTH = 61


class Writer(Protocol):
    def write(self, text: str, /) -> int: ...
    def flush(self) -> None: ...


def colour_allowed(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return not env.get("NO_COLOR")


def redraws_in_place(tty: bool, env: Mapping[str, str] | None = None) -> bool:
    """Whether a line can be redrawn where it stands: on a terminal, but
    not TERM=dumb (an editor's shell), which shows every erase and colour
    code as literal junk."""
    return tty and (os.environ if env is None else env).get("TERM") != "dumb"


def level(m: TokenMetrics) -> float:
    fraction = m.budget_fraction
    return max(m.context_utilization, fraction if fraction is not None else 0.0)


def colour_name(value: float) -> str:
    if value > 0.9:
        return "red"
    if value > 0.8:
        return "yellow"
    if value > 0.6:
        return "cyan"
    return "green"


def _pct(value: float) -> str:
    return f"{int(value * 100)}%"


def _cost(m: TokenMetrics) -> str:
    text = usd(m.cost_usd) if m.budget_usd is None else usd_of(m.cost_usd, m.budget_usd)
    if m.unpriced_calls:
        text += f" (+{m.unpriced_calls} unpriced)"
    return text


def format_full(m: TokenMetrics) -> str:
    return (
        f"Tokens: {tokens(m.input_tokens)} in / {tokens(m.output_tokens)} out | Turn {m.turns} | "
        f"Est: ~{tokens(m.estimated_next_prompt_tokens)} | Ctx: {_pct(m.context_utilization)} | {_cost(m)}"
    )


def format_compact(m: TokenMetrics) -> str:
    return (
        f"{tokens(m.input_tokens)}/{tokens(m.output_tokens)} | T{m.turns} | "
        f"~{tokens(m.estimated_next_prompt_tokens)} | {_pct(m.context_utilization)}"
    )


def _cells(text: str) -> int:
    # Screen cells, not characters: ⚡ takes two, and a footer one cell too
    # wide wraps, leaving a copy behind on every redraw.
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def render(m: TokenMetrics, width: int, *, colour: bool) -> str:
    text = format_full(m) if width >= FULL_MIN_WIDTH else format_compact(m)
    value = level(m)
    mark = " ⚠" if value > 0.9 else " ⚡" if value > 0.8 else ""
    if width > 0 and _cells(text + mark) > width:
        # Cut the figures, not the mark: with NO_COLOR it is the only sign
        # of a budget running out.  Too narrow for any figure, the mark
        # alone (or an ellipsis) is shown.
        room = width - _cells(mark) - 1
        if room >= 1:
            text = text[:room] + "…"
        else:
            bare = mark.strip()
            text, mark = ("", bare) if bare and _cells(bare) <= width else ("…", "")
    text += mark
    if colour:
        text = f"{COLOURS[colour_name(value)]}{text}{RESET}"
    return text


class LiveFooter:
    """One footer line kept at the bottom of a terminal."""

    def __init__(self, out: Writer, *, colour: bool, width: Callable[[], int]) -> None:
        self._out = out
        self._colour = colour
        self._width = width
        self._line: str | None = None
        self._drawn = False

    def write(self, text: str) -> int:
        if self._drawn:
            self._out.write(ERASE)
            self._drawn = False
        n = self._out.write(text)
        if text.endswith("\n"):
            self._draw()
        return n

    def flush(self) -> None:
        self._out.flush()

    def update(self, m: TokenMetrics) -> None:
        self._line = render(m, self._width(), colour=self._colour)
        if self._drawn:
            self._out.write(ERASE)
            self._drawn = False
        self._draw()
        self._out.flush()

    def _draw(self) -> None:
        if self._line is not None and not self._drawn:
            self._out.write(self._line)
            self._drawn = True

    def clear(self) -> None:
        """Erase the footer (completion, halt, cancel)."""
        if self._drawn:
            self._out.write(ERASE)
            self._out.flush()
            self._drawn = False
        self._line = None


class PlainMetrics:
    """Periodic plain lines for a non-terminal."""

    def __init__(self, out: Writer, *, interval: float = 10.0) -> None:
        self._out = out
        self._interval = interval
        self._last: float | None = None

    def update(self, m: TokenMetrics) -> None:
        now = trio.current_time()
        if m.final or self._last is None or now - self._last >= self._interval:
            self._last = now
            self._out.write(f"  metrics: {format_full(m)}\n")
            self._out.flush()


async def show_metrics(snapshots: MetricsSubscription, display: LiveFooter | PlainMetrics) -> None:
    """Feed every snapshot received from ``snapshots`` to ``display``."""
    async for m in snapshots:
        display.update(m)
