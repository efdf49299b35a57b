"""Each package's façade exports exactly what its ``__all__`` says."""

from __future__ import annotations

import importlib
import types

import pytest


@pytest.mark.parametrize("name", ["messages", "actors", "store"])
def test_facade_matches_all(name: str) -> None:
    module = importlib.import_module(name)
    exported = set(module.__all__)
    assert len(exported) == len(module.__all__), "duplicates in __all__"
    for symbol in exported:
        assert hasattr(module, symbol), f"{name}.__all__ names missing {symbol!r}"
    public = {
        n
        for n, v in vars(module).items()
        if not n.startswith("_") and not isinstance(v, types.ModuleType) and n != "annotations"
    }
    assert public == exported, f"public but not in __all__: {public - exported}"


@pytest.mark.parametrize("name", ["messages", "actors", "store"])
def test_star_import(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from {name} import *", namespace)
    assert set(importlib.import_module(name).__all__) <= set(namespace)
