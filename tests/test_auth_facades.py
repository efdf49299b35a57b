"""The auth API modules export exactly what their ``__all__`` says (the
lead merges them into the ``actors`` and ``messages`` façades)."""

from __future__ import annotations

import importlib
import types

import pytest


@pytest.mark.parametrize("name", ["actors._auth_api", "messages._auth_api"])
def test_auth_api_matches_all(name: str) -> None:
    module = importlib.import_module(name)
    exported = set(module.__all__)
    assert len(exported) == len(module.__all__)
    public = {n for n, v in vars(module).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    assert public == exported
