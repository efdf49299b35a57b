"""throughput_gc: sets the collector's thresholds for its body and always
restores the previous ones; the CLI runs its commands under it."""

from __future__ import annotations

import gc

import pytest

from actors import THROUGHPUT_THRESHOLDS, throughput_gc


def test_sets_and_restores_even_on_error() -> None:
    before = gc.get_threshold()
    with pytest.raises(RuntimeError):
        with throughput_gc():
            assert gc.get_threshold() == THROUGHPUT_THRESHOLDS
            raise RuntimeError("boom")
    assert gc.get_threshold() == before
    with throughput_gc((1000, 20, 30)):
        assert gc.get_threshold() == (1000, 20, 30)
    assert gc.get_threshold() == before


@pytest.mark.parametrize("bad", [(0, 10, 10), (700, 10), (700, 10, -1), (700.5, 10, 10)])
def test_rejects_bad_thresholds_naming_them(bad: tuple[int, int, int]) -> None:
    before = gc.get_threshold()
    with pytest.raises(ValueError, match="thresholds"):
        with throughput_gc(bad):
            pass
    assert gc.get_threshold() == before


def test_the_cli_runs_its_commands_under_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import actors._cli as cli

    seen: list[tuple[int, int, int]] = []
    monkeypatch.setattr(cli, "cmd_status", lambda args: seen.append(gc.get_threshold()) or 0)
    assert cli.main(["status", "--db", "x.db"]) == 0
    assert seen == [THROUGHPUT_THRESHOLDS]
