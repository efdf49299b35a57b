"""The live footer: formats, colours, NO_COLOR, and a real pseudo-terminal."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from decimal import Decimal
from pathlib import Path

import pytest

from actors._footer import (
    COLOURS,
    ERASE,
    LiveFooter,
    colour_allowed,
    format_compact,
    format_full,
    render,
)
from messages import TokenMetrics

REPO = Path(__file__).resolve().parent.parent


def metrics(ctx: float = 0.45, cost: str = "0.12", budget: str | None = None, unpriced: int = 0) -> TokenMetrics:
    return TokenMetrics(
        run_id="r",
        input_tokens=12_500,
        output_tokens=3_200,
        cached_input_tokens=0,
        turns=5,
        replays=0,
        unknown_calls=0,
        estimated_next_prompt_tokens=4_000,
        context_utilization=ctx,
        cost_usd=Decimal(cost),
        unpriced_calls=unpriced,
        budget_usd=None if budget is None else Decimal(budget),
        alerts=(),
        by_stage=(),
    )


def test_full_and_compact_forms_match_the_reference() -> None:
    assert format_full(metrics()) == "Tokens: 12.5k in / 3.2k out | Turn 5 | Est: ~4.0k | Ctx: 45% | $0.12"
    assert format_compact(metrics()) == "12.5k/3.2k | T5 | ~4.0k | 45%"
    assert render(metrics(), 100, colour=False) == format_full(metrics())
    assert render(metrics(), 40, colour=False) == format_compact(metrics())


def test_budget_and_unpriced_calls_are_shown() -> None:
    text = format_full(metrics(cost="1.5", budget="2", unpriced=2))
    assert text.endswith("| $1.50 of $2.00 (+2 unpriced)")


def test_a_budget_nearly_spent_does_not_read_as_all_spent() -> None:
    """"⚠ budget warning: 90% used ($0.05 of $0.05)" for $0.0451 spent of
    $0.05: the figures are shown to as many places as tell them apart."""
    from actors._cli import ProgressPrinter
    from messages import BudgetAlert

    out = io.StringIO()
    printer = ProgressPrinter(out, 6)
    printer(BudgetAlert(run_id="r", threshold=90, spent_usd=Decimal("0.0451"), budget_usd=Decimal("0.05")))
    printer(BudgetAlert(run_id="r", threshold=100, spent_usd=Decimal("0.05"), budget_usd=Decimal("0.05")))
    printer(BudgetAlert(run_id="r", threshold=80, spent_usd=Decimal("1.6"), budget_usd=Decimal("2")))
    assert out.getvalue().splitlines() == [
        "  ⚠ budget warning: 90% used ($0.045 of $0.050)",
        "  ✗ budget EXCEEDED: $0.05 of $0.05; no further agent calls will be dispatched",
        "  ⚠ budget warning: 80% used ($1.60 of $2.00)",
    ]
    assert format_full(metrics(cost="0.0451", budget="0.05")).endswith("| $0.045 of $0.050")
    assert format_full(metrics(cost="0.049999", budget="0.05")).endswith("| $0.049999 of $0.050000")


def test_money_halves_round_up() -> None:
    """Exactly $0.045 of $0.05 read "90% used ($0.04 of $0.05)" (Decimal's
    half-even format): as if 80 % were used."""
    from actors._budget import usd, usd_of

    assert usd_of(Decimal("0.045"), Decimal("0.05")) == "$0.045 of $0.050"
    assert (usd(Decimal("0.125")), usd(Decimal("2.5"), 0), usd(Decimal("0.0000125"))) == ("$0.13", "$3", "$0.000013")
    assert usd(Decimal(10**12)) == "$1000000000000.00"
    # Beyond any run, from a hand-edited store: shown, not raised.
    assert (usd(Decimal("Infinity")), usd(Decimal("1e59"))) == ("$Infinity", f"${Decimal('1e59'):.2f}")
    assert (usd(Decimal("NaN")), usd_of(Decimal("NaN"), Decimal("1"))) == ("$NaN", "$NaN of $1.00")


@pytest.mark.parametrize(
    ("ctx", "colour", "mark"),
    [(0.45, "green", ""), (0.61, "cyan", ""), (0.81, "yellow", " ⚡"), (0.95, "red", " ⚠")],
)
def test_colour_and_marks_follow_60_80_90(ctx: float, colour: str, mark: str) -> None:
    text = render(metrics(ctx=ctx), 100, colour=True)
    assert text.startswith(COLOURS[colour]) and text.endswith(mark + "\x1b[0m")


@pytest.mark.parametrize("width", [12, 20, 31, 40])
def test_a_cut_footer_fits_its_cells_and_keeps_its_mark(width: int) -> None:
    """⚡ takes two cells: the footer was one cell wider than the terminal
    (a copy left per redraw), and cutting it dropped the mark - with
    NO_COLOR the only sign of a budget running out."""
    import unicodedata

    text = render(metrics(ctx=0.81), width, colour=False)
    cells = sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)
    assert cells <= width and text.endswith(" ⚡"), text
    assert render(metrics(ctx=0.95), width, colour=False).endswith(" ⚠")


def test_a_footer_too_narrow_for_figures_still_fits() -> None:
    # Below 5 columns it was "1… ⚡", 5 cells.
    import unicodedata

    for width in range(1, 6):
        for ctx in (0.5, 0.81, 0.95):
            text = render(metrics(ctx=ctx), width, colour=False)
            assert sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text) <= width, (width, text)
    assert render(metrics(ctx=0.81), 2, colour=False) == "⚡"


def test_budget_use_also_drives_the_colour() -> None:
    assert render(metrics(ctx=0.1, cost="1.9", budget="2"), 100, colour=True).startswith(COLOURS["red"])


def test_no_color_is_honoured() -> None:
    assert colour_allowed({}) and colour_allowed({"NO_COLOR": ""})
    assert not colour_allowed({"NO_COLOR": "1"})


def test_the_footer_stays_below_other_output() -> None:
    out = io.StringIO()
    footer = LiveFooter(out, colour=False, width=lambda: 100)
    footer.write("before\n")
    footer.update(metrics())
    footer.write("a line\n")
    footer.clear()
    line = format_full(metrics())
    assert out.getvalue() == f"before\n{line}{ERASE}a line\n{line}{ERASE}"


def _run_in_pty(tmp_path: Path, columns: int, extra_env: dict[str, str]) -> str:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "COLUMNS", "LINES")}
    env.update(extra_env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "actors", "run", "--db", str(tmp_path / f"pty{columns}.db"), "--seed", "4"],
        stdin=slave, stdout=slave, stderr=slave, cwd=REPO, env=env, close_fds=True,
    )
    os.close(slave)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 120)
            if not ready:
                proc.kill()
                pytest.fail("the CLI produced no output for 120 s")
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        code = proc.wait(timeout=120)
    assert code == 0
    return b"".join(chunks).decode("utf-8", "replace")


def test_the_footer_renders_in_a_pseudo_terminal(tmp_path: Path) -> None:
    text = _run_in_pty(tmp_path, 120, {})
    assert "Tokens: " in text and " | Turn " in text and " | Est: ~" in text and " | Ctx: " in text
    assert ERASE in text, "the footer is redrawn in place"
    assert COLOURS["green"] in text
    assert "  metrics: " not in text, "no plain lines on a terminal"
    assert "completed: 6 stage(s) decided" in text


def test_a_narrow_pseudo_terminal_gets_the_compact_form_and_no_color_works(tmp_path: Path) -> None:
    text = _run_in_pty(tmp_path, 50, {"NO_COLOR": "1"})
    assert "Tokens: " not in text and " | T" in text
    assert "\x1b[3" not in text, "NO_COLOR: no colour codes"
    assert ERASE in text


def test_a_dumb_terminal_gets_plain_lines(tmp_path: Path) -> None:
    # TERM=dumb (an editor's shell) showed every erase and colour code as junk.
    text = _run_in_pty(tmp_path, 120, {"TERM": "dumb"})
    assert ERASE not in text and "\x1b[" not in text
    assert "completed: 6 stage(s) decided" in text
