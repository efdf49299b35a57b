"""Every public class and function of ``actors``, ``messages`` and ``store``
has a docstring of its own.

"Of its own" is read from the source: the docstring written in the body of
the ``class`` or ``def``.  ``obj.__doc__`` would not do: attrs, enum and
functools can fill it in (or a subclass's can come from elsewhere), and a
generated one says nothing a reader needs.  Constants and type aliases in
``__all__`` (``SCHEMA_VERSION``, ``DecisionStatus``, ...) are skipped: their
``__doc__`` is their type's, and they are documented where they are defined.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from types import ModuleType

import pytest

import actors
import messages
import store

PACKAGES = (actors, messages, store)


def _public(package: ModuleType) -> list[tuple[str, object]]:
    return [(f"{package.__name__}.{name}", getattr(package, name)) for name in package.__all__]


def _documentable(obj: object) -> object | None:
    """The class or function behind ``obj`` (through functools wrappers
    such as ``lru_cache``), or None for a constant or type alias."""
    obj = inspect.unwrap(obj) if callable(obj) else obj  # type: ignore[arg-type]
    if inspect.isclass(obj) or inspect.isfunction(obj):
        return obj
    return None


def _own_docstring(obj: object) -> str | None:
    source = textwrap.dedent(inspect.getsource(obj))  # type: ignore[arg-type]
    node = ast.parse(source).body[0]
    assert isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)), source[:200]
    return ast.get_docstring(node)


NAMES = [item for package in PACKAGES for item in _public(package)]
DOCUMENTABLE = [(name, obj) for name, obj in NAMES if _documentable(obj) is not None]


def test_the_public_api_is_mostly_classes_and_functions() -> None:
    # Guards the skip above: a broken _documentable would skip everything.
    assert len(DOCUMENTABLE) > 150
    skipped = [name for name, obj in NAMES if _documentable(obj) is None]
    for name in skipped:
        obj = getattr(__import__(name.split(".")[0]), name.split(".")[1])
        assert not inspect.isclass(obj) and not inspect.isroutine(obj), name


@pytest.mark.parametrize(("name", "obj"), DOCUMENTABLE, ids=[name for name, _ in DOCUMENTABLE])
def test_has_its_own_docstring(name: str, obj: object) -> None:
    doc = _own_docstring(_documentable(obj))
    assert doc and doc.strip(), f"{name} has no docstring written in its own body"
