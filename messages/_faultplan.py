"""The fault plan: what to inject, parsed from the reference's environment
variables, the CLI's ``--faults`` or built as an object.  Off unless
configured; a malformed value is a :class:`FaultPlanError` naming the bad
entry.  Injection itself is :mod:`messages._faults`.
"""

from __future__ import annotations

import decimal
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import attrs

from ._duration import parse_duration, parse_rfc3339
from ._errors import ConclaveError

FaultKind = Literal["disconnect", "rate_limit", "timeout"]
FAULT_KINDS: tuple[FaultKind, ...] = ("disconnect", "rate_limit", "timeout")  # priority order
_LABELS: dict[str, FaultKind] = {
    "disconnect": "disconnect",
    "429": "rate_limit",
    "rate_limit": "rate_limit",
    "timeout": "timeout",
}
_RATE = re.compile(r"\d+(?:\.\d+)?%", re.ASCII)  # disconnect:5%
_SCOPE_ALIASES = frozenset({"spec_kit", "speckit", "auto_drive", "gateway"})
DEFAULT_TIMEOUT_MS = 30_000
# A day: a fault stands in for a provider that hangs until it times out,
# and past the agent's call timeout (600 s by default) the agent gives up
# first anyway; 10**23 ms was taken as written.
MAX_TIMEOUT_MS = 86_400_000
CHANNEL = "gateway"


class FaultPlanError(ConclaveError, ValueError):
    """A fault setting is malformed; the message names the bad entry."""


# Rates are floats: 10% + 20% + 70% may add up a hair either side of 1.
RATE_SLACK = 1e-12


# -- reset hints ---------------------------------------------------------------


def _hint_mode(_instance: object, _attribute: attrs.Attribute[Any], value: Any) -> None:
    if value not in ("relative", "anchored"):
        raise FaultPlanError(f"fault reset mode must be 'relative' or 'anchored', got {value!r}")


def _hint_seconds(_instance: object, _attribute: attrs.Attribute[Any], value: Any) -> None:
    # What a reset hint string can spell, and nothing else: a NaN or negative
    # hint built a plan whose injected 429s were read as no hint at all.
    # Infinity too: no string form reaches it (parse_duration refuses it,
    # and the farthest RFC 3339 time is finite), and a reset that never
    # comes is a provider gone for good, not a rate limit.
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise FaultPlanError(f"fault reset seconds must be a finite number >= 0, got {value!r}")


def _hint_text(_instance: object, _attribute: attrs.Attribute[Any], value: Any) -> None:
    # The banner, --json and a soak's replay command print it.
    if not isinstance(value, str):
        raise FaultPlanError(f"fault reset text must be a string, got {value!r}")


@attrs.frozen(kw_only=True, slots=True)
class ResetHint:
    """When a 429's rate limit resets.

    ``relative``: ``seconds`` after each injected 429 (``120``, ``90s``,
    ``1500ms``, ``6m0s``).  ``anchored``: a fixed moment ``seconds`` after
    the run's first call on trio's clock (``now+90s``, or an RFC 3339 time,
    converted against the wall clock once at start-up; a past time is 0),
    so later 429s carry shorter hints, as in the reference.
    ``seconds`` is finite and >= 0, ``mode`` one of the two: anything else
    is a :class:`FaultPlanError` when the hint is built.
    """

    mode: Literal["relative", "anchored"] = attrs.field(validator=_hint_mode)
    seconds: float = attrs.field(validator=_hint_seconds)
    text: str = attrs.field(validator=_hint_text)


def parse_reset_hint(text: str, *, now: Callable[[], float] = time.time, source: str = "CODEX_FAULTS_429_RESET") -> ResetHint:
    """Parse a 429 reset hint: seconds (``120``), a duration (``90s``,
    ``1500ms``, ``6m0s``), ``now+90s`` / ``now+90``, or an RFC 3339 time.
    ``now`` is the wall clock, read only for RFC 3339 times."""
    if not isinstance(text, str):
        raise FaultPlanError(f"{source}: expected a reset hint such as '120' or 'now+90s', got {text!r}")
    raw = text.strip()
    if raw.lower().startswith("now+"):
        seconds = parse_duration(raw[4:])
        if seconds is None:
            raise FaultPlanError(f"{source}: cannot read {text!r}: expected now+SECONDS, as in now+90s")
        return ResetHint(mode="anchored", seconds=seconds, text=raw)
    seconds = parse_duration(raw)
    if seconds is not None:
        return ResetHint(mode="relative", seconds=seconds, text=raw)
    moment = parse_rfc3339(raw)
    if moment is None:
        raise FaultPlanError(
            f"{source}: cannot read {text!r} as a reset hint; expected seconds (120), "
            "now+90s, a duration (90s, 1500ms, 6m0s) or an RFC 3339 time with a zone "
            "(2026-11-29T17:00:00Z)"
        )
    return ResetHint(mode="anchored", seconds=max(0.0, moment.timestamp() - now()), text=raw)


# -- the plan -------------------------------------------------------------------


def reset_hint(value: object, *, now: Callable[[], float] = time.time) -> ResetHint | None:
    """A reset hint from what a caller may give: a :class:`ResetHint`, a
    string as ``CODEX_FAULTS_429_RESET`` takes it, a number of seconds, or
    None/"" for none.  Anything else is a :class:`FaultPlanError` - it used
    to be dropped (a plan built with ``reset=30`` had no hint) or kept to
    fail at the first injected 429."""
    if value is None or isinstance(value, ResetHint):
        return value
    if isinstance(value, str):
        return parse_reset_hint(value, now=now) if value.strip() else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf:
        return ResetHint(mode="relative", seconds=float(value), text=str(value))
    raise FaultPlanError(
        f"fault reset must be a ResetHint, a reset hint string (120, 90s, now+30s, an RFC 3339 time) "
        f"or seconds >= 0, got {value!r}"
    )


def _kind_mapping(value: Mapping[Any, Any] | None) -> Mapping[FaultKind, Any]:
    if value is not None and not isinstance(value, Mapping):
        # dict("disconnect:3") said "dictionary update sequence element #0".
        raise FaultPlanError(f"counts and rates map a fault kind to a number, got {value!r} (FaultPlan.parse reads specs)")
    return dict(value or {})


MAX_FAULT_COUNT = 1_000_000


def _percent(rate: float) -> str:
    """A rate as the percentage a plan is written with, read back exactly:
    ``%g`` gave ``1e-05`` (refused by the parser) and cut ``99.99999`` to
    ``100`` in the replay command; rounding to 12 places made
    ``0.0000000000001%`` read ``0%``, which turns injection off.  The
    shortest decimal that parses back to the same rate, without exponent."""
    text = repr(rate * 100)
    for digits in range(1, 18):
        candidate = f"{rate * 100:.{digits}g}"
        if float(candidate) / 100 == rate:
            text = candidate
            break
    plain = format(decimal.Decimal(text), "f")
    return plain.rstrip("0").rstrip(".") if "." in plain else plain


def _count_too_large(kind: FaultKind, count: int) -> str:
    # Ten billion, when a budget was laid out fault by fault, exhausted
    # memory; a plan that never runs out is a rate.
    return (
        f"fault count for {kind} must be at most {MAX_FAULT_COUNT:,}, got {count:,} "
        "(for more, give a rate such as 5%)"
    )


def _check_seed(seed: object) -> None:
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        # A str seed hashed "fine" and placed faults unlike the int it spells.
        raise FaultPlanError(f"fault seed must be a whole number or None, got {seed!r}")
    if seed is not None and not -(2**63) <= seed < 2**63:
        # A run stores its seeds in SQLite INTEGERs, and --fault-seed refuses them.
        raise FaultPlanError(f"fault seed must fit in 64 bits, got {seed}")


@attrs.frozen(kw_only=True, slots=True)
class FaultPlan:
    """What to inject.  Off unless some count or rate is set.

    ``counts``: exactly that many faults of each kind per run (see the
    module docstring for placement).  ``rates``: the probability that a
    call gets that fault, drawn from its identity.  ``provider`` limits
    injection to one provider's calls (``None``: every provider).
    ``seed``: ``None`` means the orchestrator's seed.
    """

    counts: Mapping[FaultKind, int] = attrs.field(factory=dict, converter=_kind_mapping)
    rates: Mapping[FaultKind, float] = attrs.field(factory=dict, converter=_kind_mapping)
    provider: str | None = None
    seed: int | None = None
    reset: ResetHint | None = attrs.field(default=None, converter=reset_hint)
    timeout_ms: int = DEFAULT_TIMEOUT_MS

    def __attrs_post_init__(self) -> None:
        for kind, count in self.counts.items():
            if kind not in FAULT_KINDS:
                raise FaultPlanError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise FaultPlanError(f"fault count for {kind} must be a whole number >= 0, got {count!r}")
            if count > MAX_FAULT_COUNT:
                raise FaultPlanError(_count_too_large(kind, count))
        for kind, rate in self.rates.items():
            if kind not in FAULT_KINDS:
                raise FaultPlanError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
            # Not a bool: True passed as a 100 % rate.
            if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0.0 <= rate <= 1.0:
                raise FaultPlanError(f"fault rate for {kind} must be within [0, 1], got {rate!r}")
        if sum(self.rates.values()) > 1.0 + RATE_SLACK:
            raise FaultPlanError(f"fault rates add up to more than 100%: {self.describe_kinds()}")
        if (
            not isinstance(self.timeout_ms, int)
            or isinstance(self.timeout_ms, bool)
            or not 0 < self.timeout_ms <= MAX_TIMEOUT_MS
        ):
            raise FaultPlanError(
                f"fault timeout must be a whole number of ms > 0 and at most {MAX_TIMEOUT_MS:,} (a day), "
                f"got {self.timeout_ms!r}"
            )
        _check_seed(self.seed)
        if self.provider is not None and not (isinstance(self.provider, str) and self.provider):
            raise FaultPlanError(f"fault provider must be a provider name or None, got {self.provider!r}")

    @property
    def enabled(self) -> bool:
        return any(self.counts.values()) or any(self.rates.values())

    @property
    def kinds(self) -> tuple[FaultKind, ...]:
        """The kinds that can fire, in priority order."""
        return tuple(k for k in FAULT_KINDS if self.counts.get(k) or self.rates.get(k))

    @property
    def sequence(self) -> tuple[FaultKind, ...]:
        """The per-run count budget in firing order."""
        return tuple(k for k in FAULT_KINDS for _ in range(self.counts.get(k, 0)))

    def describe_kinds(self) -> str:
        parts = []
        for kind in FAULT_KINDS:
            label = "429" if kind == "rate_limit" else kind
            if self.counts.get(kind):
                parts.append(f"{label}:{self.counts[kind]}")
            if self.rates.get(kind):
                parts.append(f"{label}:{_percent(self.rates[kind])}%")
        return ",".join(parts)

    def describe(self) -> str:
        """One line for the CLI banner."""
        if not self.enabled:
            return "fault injection off"
        text = f"FAULT INJECTION ACTIVE: {self.describe_kinds()} on the {CHANNEL} channel"
        text += f" (provider {self.provider})" if self.provider else " (every provider)"
        if self.counts.get("rate_limit") or self.rates.get("rate_limit"):
            text += f"; 429 reset {self.reset.text if self.reset else 'none'}"
        if self.counts.get("timeout") or self.rates.get("timeout"):
            text += f"; timeout {self.timeout_ms}ms"
        if self.seed is not None:
            text += f"; fault seed {self.seed}"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "faults": self.describe_kinds(),
            "provider": self.provider,
            "seed": self.seed,
            "reset": self.reset.text if self.reset else None,
            "timeout_ms": self.timeout_ms,
        }

    @classmethod
    def parse(
        cls,
        spec: str,
        *,
        seed: int | None = None,
        scope: str | None = None,
        reset: str | ResetHint | None = None,
        timeout_ms: int | str | None = None,
        now: Callable[[], float] = time.time,
        source: str = "faults",
    ) -> FaultPlan:
        """Build a plan from the reference's syntax (``disconnect:3,429:1``)
        plus rates (``timeout:2.5%``).  Raises :class:`FaultPlanError` naming
        the bad entry, after ``source``: where the spec came from (an
        embedding app's ``faults=`` read as ``CODEX_FAULTS:``, which it never
        set; :meth:`from_env` says ``CODEX_FAULTS`` or ``--faults``)."""
        if not isinstance(spec, str):
            raise FaultPlanError(f"{source}: expected a fault spec such as 'disconnect:3,429:1', got {spec!r}")
        counts: dict[FaultKind, int] = {}
        rates: dict[FaultKind, float] = {}
        for raw in spec.split(","):
            entry = raw.strip()
            if not entry:
                continue
            label, sep, value = entry.partition(":")
            kind = _LABELS.get(label.strip().lower())
            if kind is None:
                raise FaultPlanError(
                    f"{source}: unknown fault kind {label.strip()!r} in {entry!r}; "
                    "known: disconnect, 429 (or rate_limit), timeout"
                )
            value = value.strip()
            if not sep or not value:
                raise FaultPlanError(
                    f"{source}: bad count in {entry!r}: expected a whole number or a percentage, "
                    f"as in {label.strip()}:3 or {label.strip()}:5%"
                )
            # A repeated kind: the last entry wins, as in the reference.
            counts.pop(kind, None)
            rates.pop(kind, None)
            if re.fullmatch(r"\d+", value, re.ASCII):  # "٣" echoed raw in the banner
                counts[kind] = int(value)
                if counts[kind] > MAX_FAULT_COUNT:
                    # Here, not only when the plan is built: the message
                    # names the setting, as a malformed entry's does.
                    raise FaultPlanError(f"{source}: bad count in {entry!r}: {_count_too_large(kind, counts[kind])}")
            elif _RATE.fullmatch(value) and float(value[:-1]) <= 100:
                rates[kind] = float(value[:-1]) / 100
            else:
                raise FaultPlanError(
                    f"{source}: bad count in {entry!r}: expected a whole number or a percentage "
                    "between 0% and 100%"
                )
        if sum(rates.values()) > 1.0 + RATE_SLACK:
            raise FaultPlanError(f"{source}: fault rates in {spec!r} add up to more than 100%")
        provider = parse_scope(scope)
        hint = reset_hint(reset, now=now)
        if timeout_ms is None or (isinstance(timeout_ms, str) and not timeout_ms.strip()):
            timeout = DEFAULT_TIMEOUT_MS
        elif isinstance(timeout_ms, int) and not isinstance(timeout_ms, bool):
            timeout = timeout_ms
        elif isinstance(timeout_ms, str) and re.fullmatch(r"\s*\d+\s*", timeout_ms, re.ASCII):
            timeout = int(timeout_ms)
        else:
            raise FaultPlanError(f"CODEX_FAULTS_TIMEOUT_MS: expected a whole number of milliseconds, got {timeout_ms!r}")
        if timeout <= 0:
            raise FaultPlanError(f"CODEX_FAULTS_TIMEOUT_MS: must be greater than 0, got {timeout}")
        if timeout > MAX_TIMEOUT_MS:
            raise FaultPlanError(f"CODEX_FAULTS_TIMEOUT_MS: must be at most {MAX_TIMEOUT_MS} (a day), got {timeout}")
        return cls(counts=counts, rates=rates, provider=provider, seed=seed, reset=hint, timeout_ms=timeout)

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        faults: str | None = None,
        seed: int | None = None,
        now: Callable[[], float] = time.time,
    ) -> FaultPlan:
        """The plan the environment describes, compatible with the reference:
        ``CODEX_FAULTS_SCOPE`` (default ``spec_kit``), ``CODEX_FAULTS``,
        ``CODEX_FAULTS_429_RESET``, ``CODEX_FAULTS_TIMEOUT_MS``, plus
        ``CODEX_FAULTS_SEED``.  ``faults``/``seed`` (the CLI's ``--faults``
        and ``--fault-seed``) override their variables.  Malformed values
        raise :class:`FaultPlanError`; nothing is silently ignored."""
        env = os.environ if env is None else env
        if not isinstance(env, Mapping):
            raise FaultPlanError(f"from_env reads a mapping of environment variables, got {env!r} (FaultPlan.parse reads specs)")
        spec = faults if faults is not None else env.get("CODEX_FAULTS", "")
        if seed is None:
            raw_seed = env.get("CODEX_FAULTS_SEED", "").strip()
            if raw_seed:
                try:
                    if not raw_seed.isascii():
                        raise ValueError(raw_seed)
                    seed = int(raw_seed)
                except ValueError:
                    raise FaultPlanError(f"CODEX_FAULTS_SEED: expected a whole number, got {raw_seed!r}") from None
                try:
                    _check_seed(seed)
                except FaultPlanError as exc:  # name the variable, as for a malformed one
                    raise FaultPlanError(f"CODEX_FAULTS_SEED: {exc}") from None
        return cls.parse(
            spec,
            seed=seed,
            scope=env.get("CODEX_FAULTS_SCOPE"),
            reset=env.get("CODEX_FAULTS_429_RESET"),
            timeout_ms=env.get("CODEX_FAULTS_TIMEOUT_MS"),
            now=now,
            source="--faults" if faults is not None else "CODEX_FAULTS",
        )


def parse_scope(scope: str | None) -> str | None:
    """``spec_kit``, ``speckit``, legacy ``auto_drive`` or the channel name
    ``gateway`` select every provider call (returns ``None``);
    ``gateway:NAME`` selects one provider's calls (returns ``NAME``)."""
    if scope is not None and not isinstance(scope, str):
        raise FaultPlanError(f"CODEX_FAULTS_SCOPE: expected a scope such as 'spec_kit' or 'gateway:NAME', got {scope!r}")
    if scope is None or not scope.strip():
        return None
    text = scope.strip().lower()
    if text in _SCOPE_ALIASES:
        return None
    if text.startswith(f"{CHANNEL}:") and text[len(CHANNEL) + 1 :].strip():
        return scope.strip()[len(CHANNEL) + 1 :].strip()
    raise FaultPlanError(
        f"CODEX_FAULTS_SCOPE: unknown scope {scope!r}; use spec_kit (or speckit, auto_drive), "
        f"the channel name {CHANNEL!r}, or {CHANNEL}:PROVIDER for one provider's calls"
    )
