"""Readable, unique run and branch ids.

Ids are identifiers, not content: they use the wall clock and fresh
randomness, and nothing deterministic (digests, simulated outputs) depends
on them.
"""

from __future__ import annotations

import re
import secrets
import shlex
import time

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


MAX_ID_LENGTH = 200


def id_problem(value: object, what: str, *, spaces: bool) -> str | None:
    """Why ``value`` cannot be a run id (``spaces=False``) or spec id, or
    ``None``.  Ids are shown on one line, passed back as command-line
    arguments and put into prompts: no control characters, nothing a
    shell or argparse would take for something else."""
    if not isinstance(value, str):
        return f"{what} must be a string, got {value!r}"
    if not value.strip():
        return f"{what} must not be empty, got {value!r}"
    rule = f"{what} must be at most {MAX_ID_LENGTH} printable characters{'' if spaces else ' without spaces'}, not starting with '-'"
    if (
        len(value) > MAX_ID_LENGTH
        or value.startswith("-")
        or not value.isprintable()
        or (not spaces and any(c.isspace() for c in value))
    ):
        shown = value if len(value) <= 40 else value[:40] + "..."
        return f"{rule}; got {shown!r}"
    return None


def _stamp() -> str:
    return time.strftime("%Y%m%d%H%M%S", time.gmtime())


def _spec_part(spec_id: str, room: int) -> str:
    # The spec id as far as it fits: a spec id of 180 characters (allowed)
    # made a run id past MAX_ID_LENGTH, and the run was refused for an id
    # the user never gave.  A spec id that begins with characters an id
    # does not keep ('ü/..;$(x)') made a branch id starting with '-', which
    # ids may not (a command line takes it for an option): the dashes that
    # replaced them are dropped, and a spec id of nothing but such
    # characters is named "spec".  (A spec id that begins with a letter,
    # digit, '_' or '.' gives the same ids as ever.)
    return _SAFE.sub("-", spec_id).lstrip("-")[:room] or "spec"


def new_run_id(spec_id: str) -> str:
    """``run-{spec}-{UTC yyyymmddHHMMSS}-{8 hex}``, the spec cut to fit
    :data:`MAX_ID_LENGTH`."""
    return f"run-{_spec_part(spec_id, MAX_ID_LENGTH - 28)}-{_stamp()}-{secrets.token_hex(4)}"


def new_branch_id(spec_id: str) -> str:
    """``{spec}-{UTC yyyymmddHHMMSS}-{32 hex}``, the spec cut to fit
    :data:`MAX_ID_LENGTH`; see :func:`short_branch_id`."""
    return f"{_spec_part(spec_id, MAX_ID_LENGTH - 48)}-{_stamp()}-{secrets.token_hex(16)}"


def short_branch_id(branch_id: str) -> str:
    """The first 8 hex digits of the random suffix, for display."""
    suffix = branch_id.rsplit("-", 1)[-1]
    return suffix[:8] if re.fullmatch(r"[0-9a-f]{8,}", suffix) else branch_id[:12]


def shell_word(text: str) -> str:
    """``text`` as one word of a command a hint suggests: as it is when the
    shell reads it so, else in double quotes (the hints sit in single
    quotes).  A run id 'x;y' made the hint run two commands when pasted."""
    if shlex.quote(text) == text:
        return text
    escaped = "".join("\\" + c if c in '\\"$`' else c for c in text)
    return f'"{escaped}"'
