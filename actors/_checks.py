"""Checks of configuration values, shared so that each is made and worded once."""

from __future__ import annotations

import argparse
import math

from ._rng import SEED_MAX as INT64_MAX
from ._rng import seed_problem


def check_seconds(value: float, name: str) -> float:
    """``value`` if it is a finite number of seconds >= 0 (NaN is not);
    otherwise a TypeError (not a number: a str used to fail inside the
    comparison, naming nothing) or ValueError naming ``name`` and the value."""
    check_number(value, name, unit=" of seconds")
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return value


def check_wait(value: float, name: str) -> float:
    """``value`` if it is a number of seconds >= 0, math.inf meaning no
    limit (NaN is not); otherwise a TypeError or ValueError naming ``name``."""
    check_number(value, name, unit=" of seconds")
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0 seconds (math.inf: no limit), got {value!r}")
    return value


def check_number(value: object, name: str, *, unit: str = "") -> None:
    """A TypeError naming ``name`` unless ``value`` is an int or float (not
    a bool: True would read as 1 - a one-second call timeout, a 100 %
    rate).  Range checks are the caller's."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number{unit}, got {value!r}")


def check_whole(value: object, name: str) -> None:
    """A TypeError naming ``name`` unless ``value`` is an int (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a whole number, got {value!r}")


def _whole_text(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def positive_arg(text: str) -> int:
    """argparse type: a whole number >= 1, or a usage error naming the text."""
    value = _whole_text(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    if value > INT64_MAX:
        # Counts reach SQLite (a LIMIT, an attempt number): 64 bits there.
        raise argparse.ArgumentTypeError(f"must be at most {INT64_MAX}, got {value}")
    return value


def seed_arg(text: str) -> int:
    """argparse type: a seed a run can be stored with (signed 64 bits)."""
    value = _whole_text(text)
    problem = seed_problem(value, "the seed")
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


DEFAULT_DB = "conclave.db"


def nonempty_arg(text: str) -> str:
    """argparse type: a name that is not blank (a model, a variable, a
    branch).  Blank, it would be taken as given - an empty model for every
    agent - or match everything, as a branch prefix does."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must not be empty, got {text!r}")
    if not text.isprintable():
        # (An ESC in a model name drove the terminal wherever it was shown.)
        raise argparse.ArgumentTypeError(f"must be printable characters, got {text!r}")
    return text


def file_arg(text: str) -> str:
    """argparse type: a file path, not empty.  An empty one (``--pipeline
    "$P"`` with P unset) would otherwise read as "not given" and the
    default be used instead of the file meant."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path (an unset shell variable?); give a file")
    return text


def db_arg(text: str) -> str:
    """argparse type: a database file to keep."""
    file_arg(text)
    # It names a database that is gone when the command exits: a run would
    # be lost, and its "details: conclave metrics ..." hint useless.
    if text == ":memory:":
        raise argparse.ArgumentTypeError("':memory:' keeps nothing once conclave exits; give a database file")
    return text


def add_db_argument(p: argparse.ArgumentParser) -> None:
    """The ``--db`` option every command that reads or writes runs takes."""
    p.add_argument(
        "--db", type=db_arg, default=DEFAULT_DB, metavar="PATH", help=f"SQLite database file (default: ./{DEFAULT_DB})"
    )
