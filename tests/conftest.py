"""Shared fixtures: real SQLite files in tmp_path, the simulator, helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from messages import Forward, FunctionInterceptor
from store import Store

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "conclave.db")


def open_store(path: str) -> Store:
    return Store.open(path)


def run_cli(
    args: Sequence[str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run ``conclave`` in a fresh interpreter (``python -m actors``)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "actors", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_bench(script: str, *args: str, timeout: float = 120) -> str:
    """Run ``bench/<script>`` in a fresh interpreter; assert it succeeded
    (the scripts check their own results) and return what it printed."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def cut_at_write(cut: int | None, scope: trio.CancelScope) -> FunctionInterceptor[Any]:
    """A store-edge interceptor that cancels ``scope`` as write number
    ``cut`` arrives (None: never): that write and everything still queued
    is lost, as in a crash."""
    sent = 0

    async def crash(item: Any, forward: Forward[Any]) -> None:
        nonlocal sent
        sent += 1
        if sent == cut:
            scope.cancel()
        await forward(item)

    return FunctionInterceptor(crash)


async def run_watching(orch: Any, spec_id: str, run_id: str, kind: type[Any]) -> tuple[Any, list[Any]]:
    """Run ``run_id`` of ``orch`` and collect the progress of type ``kind``
    it publishes meanwhile."""
    seen: list[Any] = []
    progress = orch.subscribe()

    async def watch() -> None:
        async for event in progress:
            if isinstance(event, kind):
                seen.append(event)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        result = await orch.run(spec_id, run_id=run_id)
        nursery.cancel_scope.cancel()
    return result, seen
