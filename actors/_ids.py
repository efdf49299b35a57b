"""Readable, unique run and branch ids.

Ids are identifiers, not content: they use the wall clock and fresh
randomness, and nothing deterministic (digests, simulated outputs) depends
on them.
"""

from __future__ import annotations

import re
import secrets
import time

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _stamp() -> str:
    return time.strftime("%Y%m%d%H%M%S", time.gmtime())


def new_run_id(spec_id: str) -> str:
    return f"run-{_SAFE.sub('-', spec_id)}-{_stamp()}-{secrets.token_hex(4)}"


def new_branch_id(spec_id: str) -> str:
    """``{spec}-{UTC yyyymmddHHMMSS}-{32 hex}``; see :func:`short_branch_id`."""
    return f"{_SAFE.sub('-', spec_id)}-{_stamp()}-{secrets.token_hex(16)}"


def short_branch_id(branch_id: str) -> str:
    """The first 8 hex digits of the random suffix, for display."""
    suffix = branch_id.rsplit("-", 1)[-1]
    return suffix[:8] if re.fullmatch(r"[0-9a-f]{8,}", suffix) else branch_id[:12]
