"""The provider layer's public names exist as ``__all__`` says."""

from __future__ import annotations

import actors._providers_api as api


def test_every_name_in_all_exists_once() -> None:
    assert len(set(api.__all__)) == len(api.__all__)
    for name in api.__all__:
        assert hasattr(api, name), name

