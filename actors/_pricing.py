"""Per-token model prices: a vendored, trimmed LiteLLM table, overridable.

The table is ``_model_prices.json`` beside this module: a trimmed copy of
BerriAI/litellm's ``model_prices_and_context_window.json`` (which version,
and how it was trimmed, is in the file's ``_meta`` entry; ``tools/
trim_prices.py`` regenerates it).  Prices are USD per single token and are
read as :class:`~decimal.Decimal` straight from the JSON text, so every cost
is exact; nothing is rounded until it is displayed.

Matching a model name (first hit wins): ``provider/name``; the exact name;
the name without a ``provider/`` prefix; Claude's dotted versions spelt with
dashes (``claude-sonnet-4.5`` is ``claude-sonnet-4-5``); then the longest
table name that is a prefix of the model followed by ``-``, ``@`` or ``:``
(``gpt-4o-2024-05-13-ft`` -> ``gpt-4o-2024-05-13``), unless what follows
names a size or variant (``o1-mini`` is not ``o1``).  Anything else is
*unpriced*: reported as such, never guessed.

Cost of one call (``TokenUsage.input_tokens`` includes cache reads and
writes, ``output_tokens`` includes reasoning)::

    (input - cached - writes) * input_rate + cached * cache_read_rate
      + (writes - writes_1h) * cache_write_rate + writes_1h * cache_write_1h_rate
      + (output - reasoning) * output_rate + reasoning * reasoning_rate

where a missing cache-read, cache-write or reasoning rate falls back to the
input or output rate, as LiteLLM does, and a missing one-hour write rate to
the (five-minute) write rate.  When the call's input exceeds a tier the
table lists (``*_above_200k_tokens``), that tier's rates apply.

A user override file has the same format (``{"model": {"input_cost_per_
token": 3e-06, ...}}``): its fields replace the vendored entry's, or define
a new model.  The CLI reads it from ``--prices FILE`` or ``CONCLAVE_PRICES``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from decimal import Decimal
from functools import cache
from importlib import resources
from typing import Any

import attrs

from messages import ConclaveError, TokenUsage

_RATE_FIELDS = (
    "input_cost_per_token",
    "output_cost_per_token",
    "cache_read_input_token_cost",
    "cache_creation_input_token_cost",
    "cache_creation_input_token_cost_above_1hr",
    "output_cost_per_reasoning_token",
)
_TIER = re.compile(r"^(?P<field>" + "|".join(_RATE_FIELDS) + r")_above_(?P<k>\d+)k_tokens$")
_BOUNDARY = "-@:"
# A prefix match is another model, not a version of this one, when what
# follows names a size or variant: "o1-mini" is not "o1" (priced as o1 it
# cost 13x what it does), "gemini-2.5-flash-lite" not "gemini-2.5-flash".
_VARIANTS = frozenset(
    "mini nano micro lite pro max plus turbo flash instruct audio realtime search transcribe tts "
    "vision image codex deep thinking chat large medium small".split()
)
_DOTTED_CLAUDE = re.compile(r"^(claude-[a-z]+-\d+)\.(\d+)")


class PriceFileError(ConclaveError, ValueError):
    """A price file is unreadable or malformed; the message names it."""


@attrs.frozen(kw_only=True, slots=True)
class Rates:
    input: Decimal
    output: Decimal
    cache_read: Decimal
    reasoning: Decimal
    cache_write: Decimal
    cache_write_1h: Decimal


@attrs.frozen(kw_only=True, slots=True)
class ModelPrice:
    """The prices of one table entry.  ``tiers`` are (threshold in input
    tokens, rates), ascending; ``rates`` apply up to the first threshold."""

    name: str
    rates: Rates
    tiers: tuple[tuple[int, Rates], ...] = ()
    max_input_tokens: int | None = None

    def rates_for(self, input_tokens: int) -> Rates:
        chosen = self.rates
        for threshold, rates in self.tiers:
            if input_tokens > threshold:
                chosen = rates
        return chosen

    def cost(self, usage: TokenUsage) -> Decimal:
        r = self.rates_for(usage.input_tokens)
        # Parts never exceed their whole (a caller's TokenUsage may claim so).
        cached = min(usage.cached_input_tokens, usage.input_tokens)
        writes = min(usage.cache_write_input_tokens, usage.input_tokens - cached)
        writes_1h = min(usage.cache_write_1h_input_tokens, writes)
        reasoning = min(usage.reasoning_output_tokens, usage.output_tokens)
        cost = (usage.input_tokens - cached - writes) * r.input + cached * r.cache_read
        if writes:
            cost += (writes - writes_1h) * r.cache_write + writes_1h * r.cache_write_1h
        return cost + (usage.output_tokens - reasoning) * r.output + reasoning * r.reasoning


def _rates(fields: Mapping[str, Decimal], base: Mapping[str, Decimal] | None = None) -> Rates:
    """The rates of ``fields``; a tier's fields fall back to its ``base``
    entry's *given* fields.  A rate neither gives is derived within the
    tier: cache reads as its input, reasoning as its output (they were
    taken from the base tier, under-charging reasoning and cached tokens
    above 200k)."""
    given = {**(base or {}), **fields}
    inp = given.get("input_cost_per_token")
    out = given.get("output_cost_per_token")
    assert inp is not None and out is not None
    write = given.get("cache_creation_input_token_cost", inp)
    return Rates(
        input=inp,
        output=out,
        cache_read=given.get("cache_read_input_token_cost", inp),
        reasoning=given.get("output_cost_per_reasoning_token", out),
        cache_write=write,
        cache_write_1h=given.get("cache_creation_input_token_cost_above_1hr", write),
    )


def _price(name: str, entry: Mapping[str, Any]) -> ModelPrice:
    base_fields = {k: entry[k] for k in _RATE_FIELDS if k in entry}
    base = _rates(base_fields)
    by_threshold: dict[int, dict[str, Decimal]] = {}
    for key, value in entry.items():
        m = _TIER.match(key)
        if m:
            by_threshold.setdefault(int(m["k"]) * 1000, {})[m["field"]] = value
    tiers = tuple((t, _rates(by_threshold[t], base_fields)) for t in sorted(by_threshold))
    max_in = entry.get("max_input_tokens")
    return ModelPrice(
        name=name,
        rates=base,
        tiers=tiers,
        max_input_tokens=int(max_in) if isinstance(max_in, int | Decimal) else None,
    )


MAX_RATE = 1000


def _exact(entries: Mapping[str, Any]) -> Mapping[str, Any]:
    """Float rates (as a Python caller writes 3e-06) as the Decimals they
    spell; a price file's are parsed as Decimals already."""
    if not isinstance(entries, Mapping):
        return entries  # _validate names it
    return {
        name: {
            key: Decimal(repr(value))
            if isinstance(value, float) and math.isfinite(value) and (key in _RATE_FIELDS or _TIER.match(key))
            else value
            for key, value in entry.items()
        }
        if isinstance(entry, Mapping)
        else entry
        for name, entry in entries.items()
    }


def _as_written(value: Any) -> str:
    """``value`` as the price file spells it: a rate read from JSON is a
    Decimal, and "got Decimal('-0.000001')" named Python, not the file.
    (Positional: str() writes a rate as small as -0.0000001 as -1E-7.)"""
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, float):
        return str(value)
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return repr(value)


def _validate(entries: Mapping[str, Any], where: str, *, new_ok: Mapping[str, Any]) -> None:
    for name, entry in entries.items():
        if name.startswith("_"):
            continue
        if not isinstance(entry, Mapping):
            raise PriceFileError(f"{where}: entry {name!r} must be an object")
        for key, value in entry.items():
            if key in _RATE_FIELDS or _TIER.match(key):
                if (
                    isinstance(value, bool)
                    or not isinstance(value, int | Decimal)
                    or (isinstance(value, Decimal) and not value.is_finite())  # NaN: InvalidOperation below
                    or value < 0
                ):
                    raise PriceFileError(
                        f"{where}: {name}.{key} must be a non-negative number (USD per token), "
                        f"got {_as_written(value)}"
                    )
                if value > MAX_RATE:
                    # No model costs this; and amounts past ~1e22 USD no
                    # longer fit the micro-dollar figures reports print.
                    raise PriceFileError(
                        f"{where}: {name}.{key} must be at most {MAX_RATE} USD per token, got {value}"
                    )
        merged = {**new_ok.get(name.lower(), {}), **entry}  # names match case-insensitively
        for required in ("input_cost_per_token", "output_cost_per_token"):
            if required not in merged:
                raise PriceFileError(f"{where}: entry {name!r} needs {required}")


MAX_PRICE_FILE = 16 * 2**20  # the whole of LiteLLM's table is 3.3 MiB


class _Duplicate(ValueError):
    pass


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Names match case-insensitively: "GPT-4o" after "gpt-4o" silently
    # replaced it, last one winning.
    seen: dict[str, str] = {}
    for key, _ in pairs:
        first = seen.get(key.lower())
        if first is not None:
            raise _Duplicate(f"{key!r} is given twice" + ("" if first == key else f" (as {first!r})"))
        seen[key.lower()] = key
    return dict(pairs)


def _parse(text: str | bytes, where: str) -> dict[str, Any]:
    try:
        data = json.loads(text, parse_float=Decimal, object_pairs_hook=_unique)
    except _Duplicate as exc:
        raise PriceFileError(f"{where}: {exc}") from None
    except RecursionError:
        raise PriceFileError(f"{where}: not valid JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise PriceFileError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PriceFileError(f"{where}: must be a JSON object of model -> prices")
    return data


class PriceTable:
    """Model name -> :class:`ModelPrice`.  Immutable once built."""

    def __init__(self, entries: Mapping[str, Mapping[str, Any]], *, source: str = "custom") -> None:
        self._entries = {
            name.lower(): dict(entry) for name, entry in entries.items() if not name.startswith("_")
        }
        self._prices = {name: _price(name, entry) for name, entry in self._entries.items()}
        self._by_length = sorted(self._prices, key=len, reverse=True)
        self.source = source
        canonical = json.dumps(self._entries, sort_keys=True, default=str, separators=(",", ":"))
        self.version = hashlib.sha256(canonical.encode()).hexdigest()[:12]
        self._memo: dict[tuple[str, str | None], ModelPrice | None] = {}

    @classmethod
    def vendored(cls) -> PriceTable:
        return _vendored()

    @classmethod
    def load(cls, override: str | None = None) -> PriceTable:
        """The vendored table, with ``override`` (a JSON file) applied."""
        return cls.load_kept(override)[0]

    @classmethod
    def load_kept(cls, override: str | None = None) -> tuple[PriceTable, str | None]:
        """:meth:`load`, and the override file's text (``None`` without
        one), for a run to keep: :meth:`from_kept` rebuilds the same table
        after the file has changed or gone."""
        table = cls.vendored()
        if override is None:
            return table, None
        if not isinstance(override, (str, os.PathLike)):
            # open() takes an int as a file descriptor: load(0) read stdin and closed it.
            raise PriceFileError(f"the price override must be a file path, got {override!r}")
        try:
            with open(override, "rb") as f:
                raw = f.read(MAX_PRICE_FILE + 1)  # /dev/zero read until MemoryError
        except OSError as exc:
            raise PriceFileError(f"{override}: cannot read price file: {exc.strerror or exc}") from None
        if len(raw) > MAX_PRICE_FILE:
            raise PriceFileError(f"{override}: a price file must be at most {MAX_PRICE_FILE // 2**20} MiB")
        table = table.with_overrides(_parse(raw, override), source=str(override))
        return table, raw.decode(json.detect_encoding(raw))

    @classmethod
    def from_kept(cls, source: str, text: str) -> PriceTable:
        """The table :meth:`load_kept` gave for ``source`` and its ``text``."""
        return cls.vendored().with_overrides(_parse(text, source), source=source)

    def with_overrides(self, entries: Mapping[str, Any], *, source: str = "override") -> PriceTable:
        entries = _exact(entries)
        _validate(entries, source, new_ok=self._entries)
        merged = {name: dict(entry) for name, entry in self._entries.items()}
        for name, entry in entries.items():
            if not name.startswith("_"):
                merged.setdefault(name.lower(), {}).update(entry)
        return PriceTable(merged, source=f"{self.source} + {source}")

    def __len__(self) -> int:
        return len(self._prices)

    def lookup(self, model: str, provider: str | None = None) -> ModelPrice | None:
        memo_key = (model, provider)
        if memo_key not in self._memo:
            self._memo[memo_key] = self._lookup(model, provider)
        return self._memo[memo_key]

    def _lookup(self, model: str, provider: str | None) -> ModelPrice | None:
        name = model.strip().lower()
        if not name:
            return None
        # The provider's own entry first (``gemini/gemini-2.5-flash``).
        candidates = [f"{provider.lower()}/{name}", name] if provider else [name]
        if "/" in name:
            candidates.append(name.rsplit("/", 1)[1])
        for c in list(candidates):
            m = _DOTTED_CLAUDE.match(c)
            if m:
                candidates.append(f"{m[1]}-{m[2]}{c[m.end():]}")
        for c in candidates:
            if c in self._prices:
                return self._prices[c]
        for c in candidates:
            for key in self._by_length:  # longest first
                if len(key) < len(c) and c.startswith(key) and c[len(key)] in _BOUNDARY:
                    if _names_a_variant(c[len(key) :]):
                        break  # a shorter key would be the same wrong guess
                    return self._prices[key]
        return None

    def cost(self, usage: TokenUsage, model: str, provider: str | None = None) -> Decimal | None:
        """Exact USD cost of one call, or ``None`` when the model is unpriced."""
        price = self.lookup(model, provider)
        return None if price is None else price.cost(usage)


@cache
def _vendored() -> PriceTable:
    text = resources.files("actors").joinpath("_model_prices.json").read_bytes()
    data = _parse(text, "actors/_model_prices.json")
    meta = data.get("_meta", {})
    return PriceTable(data, source=f"litellm {meta.get('litellm_version', '?')} (vendored)")


def vendored_meta() -> dict[str, Any]:
    text = resources.files("actors").joinpath("_model_prices.json").read_bytes()
    meta = _parse(text, "actors/_model_prices.json").get("_meta", {})
    return dict(meta) if isinstance(meta, Mapping) else {}


def _names_a_variant(rest: str) -> bool:
    """Whether ``rest`` (what follows a table name in a model name, from
    its ``-``) starts with a size or variant word (see ``_VARIANTS``)."""
    if rest[0] != "-":
        return False  # "@20250929", ":ft-acme": a version or a fine-tune of it
    return rest[1:].split("-", 1)[0] in _VARIANTS
