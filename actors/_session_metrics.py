"""``SessionMetrics``: running token totals with a next-prompt estimate.

A faithful port of the reference's ``session_metrics.rs`` (semantics in
``reference/speckit-facts.md`` section 4.2):

* ``record_turn`` adds every field to the running total, replaces the last
  turn, counts the turn and pushes the turn's *non-cached* input into a
  sliding window (zeros are skipped; the oldest entry is evicted when full);
* ``estimated_next_prompt_tokens`` is the integer mean of the window, else
  the last turn's non-cached input if positive, else 4,000;
* ``blended_total`` is running input + output, which *includes* cached
  input (unlike the core's ``blended_total``);
* ``sync_absolute`` replaces totals, last turn and turn count, zeroes the
  replay and duplicate counters and restarts the window from the last turn;
* ``reset`` clears everything but keeps the window size.

Python ints do not overflow, so the reference's saturating arithmetic is
only kept where it matters: counters never go below zero.
"""

from __future__ import annotations

from collections import deque

from messages import ZERO_USAGE, TokenUsage

DEFAULT_WINDOW = 3
DEFAULT_PROMPT_ESTIMATE = 4_000


class Tally:
    """Mutable running sums of :class:`TokenUsage` fields: adding ints is
    much cheaper than building a validated TokenUsage per addition."""

    __slots__ = ("input", "cached", "output", "reasoning", "total", "writes", "writes_1h")

    def __init__(self) -> None:
        self.input = self.cached = self.output = self.reasoning = self.total = 0
        self.writes = self.writes_1h = 0

    def add(self, u: TokenUsage) -> None:
        self.input += u.input_tokens
        self.cached += u.cached_input_tokens
        self.output += u.output_tokens
        self.reasoning += u.reasoning_output_tokens
        self.total += u.total_tokens
        if u.cache_write_input_tokens or u.cache_write_1h_input_tokens:  # (a caller's usage may claim 1h alone)
            self.writes += u.cache_write_input_tokens
            self.writes_1h += u.cache_write_1h_input_tokens

    def set(self, u: TokenUsage) -> None:
        self.input, self.cached, self.output = u.input_tokens, u.cached_input_tokens, u.output_tokens
        self.reasoning, self.total = u.reasoning_output_tokens, u.total_tokens
        self.writes, self.writes_1h = u.cache_write_input_tokens, u.cache_write_1h_input_tokens

    def usage(self) -> TokenUsage:
        return TokenUsage(
            input_tokens=self.input,
            cached_input_tokens=self.cached,
            output_tokens=self.output,
            reasoning_output_tokens=self.reasoning,
            total_tokens=self.total,
            cache_write_input_tokens=self.writes,
            cache_write_1h_input_tokens=self.writes_1h,
        )


class SessionMetrics:
    """Running token totals of one scope (a run, or one stage, agent or
    model of it): turn count, last turn, replay and duplicate counters and
    the next-prompt estimate (see the module docstring).  Plain synchronous
    state, owned by the metrics accumulator's task."""

    __slots__ = (
        "_running_total",
        "_last_turn",
        "_turn_count",
        "_replay_updates",
        "_duplicate_items",
        "_recent",
        "_window",
    )

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        self._window = window
        self._recent: deque[int] = deque(maxlen=window)
        self._running_total = Tally()
        self._last_turn = ZERO_USAGE
        self._turn_count = 0
        self._replay_updates = 0
        self._duplicate_items = 0

    # -- updates ------------------------------------------------------------

    def record_turn(self, usage: TokenUsage) -> None:
        self._running_total.add(usage)
        self._last_turn = usage
        self._turn_count += 1
        # _push(usage.non_cached_input_tokens), inlined: the accumulator
        # records every turn in four of these (run, stage, agent, model),
        # and the two calls were a quarter of its work.
        tokens = usage.input_tokens - usage.cached_input_tokens
        if tokens > 0:
            self._recent.append(tokens)  # maxlen evicts the oldest

    def _push(self, tokens: int) -> None:
        if tokens > 0:
            self._recent.append(tokens)  # maxlen evicts the oldest

    def sync_absolute(self, total: TokenUsage, last: TokenUsage, turn_count: int) -> None:
        self._running_total.set(total)
        self._last_turn = last
        self._turn_count = max(0, turn_count)
        self._replay_updates = 0
        self._duplicate_items = 0
        self._recent.clear()
        self._push(last.non_cached_input_tokens)

    def record_replay(self) -> None:
        self._replay_updates += 1

    def record_duplicate_items(self, count: int) -> None:
        if count > 0:
            self._duplicate_items += count

    def set_duplicate_items(self, count: int) -> None:
        self._duplicate_items = max(0, count)

    def set_replay_updates(self, count: int) -> None:
        self._replay_updates = max(0, count)

    def reset(self) -> None:
        self._recent.clear()
        self._running_total = Tally()
        self._last_turn = ZERO_USAGE
        self._turn_count = 0
        self._replay_updates = 0
        self._duplicate_items = 0

    # -- reads ----------------------------------------------------------------

    def estimated_next_prompt_tokens(self) -> int:
        if self._recent:
            return sum(self._recent) // len(self._recent)
        last = self._last_turn.non_cached_input_tokens
        return last if last > 0 else DEFAULT_PROMPT_ESTIMATE

    def blended_total(self) -> int:
        return self._running_total.input + self._running_total.output

    @property
    def running_total(self) -> TokenUsage:
        return self._running_total.usage()

    @property
    def last_turn(self) -> TokenUsage:
        return self._last_turn

    @property
    def turn_count(self) -> int:
        return self._turn_count

    @property
    def replay_updates(self) -> int:
        return self._replay_updates

    @property
    def duplicate_items(self) -> int:
        return self._duplicate_items

    @property
    def window(self) -> int:
        return self._window

    @property
    def recent_prompt_tokens(self) -> tuple[int, ...]:
        return tuple(self._recent)

    def __repr__(self) -> str:
        return (
            f"SessionMetrics(turns={self._turn_count}, in={self._running_total.input}, "
            f"out={self._running_total.output}, window={list(self._recent)})"
        )
