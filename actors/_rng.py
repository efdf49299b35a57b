"""Randomness derived from identity.

"Same seed, same result" cannot come from trio's scheduler, which shuffles
on purpose; so every random choice is drawn from a generator derived from
(seed, purpose, message identity) with SHA-256, never from ``hash()``
(salted per process), arrival order or the global ``random``.
"""

from __future__ import annotations

import hashlib
import random


# A run's seed is stored with it, in an SQLite INTEGER: signed 64 bits.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


def seed_problem(seed: object, what: str = "seed") -> str | None:
    """Why ``seed`` cannot seed a run, or ``None``."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        return f"{what} must be a whole number, got {seed!r}"
    if not SEED_MIN <= seed <= SEED_MAX:
        return f"{what} must fit in 64 bits ({SEED_MIN} .. {SEED_MAX}), got {seed}"
    return None


def derive_int(seed: int, *parts: object) -> int:
    """A 64-bit integer from (seed, parts): stable across processes."""
    text = "\x1f".join([str(seed), *map(str, parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def derive_unit(seed: int, *parts: object) -> float:
    """A float in [0, 1) from (seed, parts)."""
    return derive_int(seed, *parts) / 2**64


def derive_rng(seed: int, *parts: object) -> random.Random:
    """A private ``random.Random`` for one identity."""
    return random.Random(derive_int(seed, *parts))


def derive_token(seed: int, *parts: object, length: int = 8) -> str:
    text = "\x1f".join([str(seed), *map(str, parts)])
    return hashlib.sha256(text.encode()).hexdigest()[:length]
