"""Context windows per model: the reference's table (speckit-facts 4.4).

Lower-cased prefix/contains match, first rule wins; 128,000 otherwise.
"""

from __future__ import annotations

import functools

DEFAULT_CONTEXT_WINDOW = 128_000


@functools.lru_cache(maxsize=1024)  # few distinct models; snapshots ask per agent
def context_window(model: str) -> int:
    """The context window, in tokens, of ``model`` by the reference's
    table: a case-insensitive match on its family, 128,000 when none
    matches (never an error)."""
    m = model.strip().lower()
    if m.startswith(("gpt-5", "gpt5")) or "codex" in m:
        return 272_000
    if m.startswith(("o3", "o4")):
        return 200_000
    if m.startswith("gpt-4.1"):
        return 1_047_576
    if m.startswith(("gpt-4o", "gpt-4")):
        return 128_000
    if any(family in m for family in ("opus", "sonnet", "haiku")):
        return 200_000
    if "gemini" in m and any(v in m for v in ("2.5-pro", "2.5-flash", "2.0", "1.5", "gemini-3")):
        return 1_000_000
    return DEFAULT_CONTEXT_WINDOW
