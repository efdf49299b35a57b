"""Every Python block in README.md compiles and names nothing it does not
define or import: a reader who copies one gets no SyntaxError or NameError
(the garbage-collection snippet used 'trio' and 'main' it never defined)."""

from __future__ import annotations

import builtins
import re
import symtable
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def undefined_names(source: str) -> set[str]:
    """Names read anywhere in ``source`` that no scope of it defines, imports
    or gets from builtins."""
    top = symtable.symtable(source, "README", "exec")
    defined = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported() or s.is_namespace()}
    missing: set[str] = set()
    tables = [top]
    while tables:
        table = tables.pop()
        tables.extend(table.get_children())
        for symbol in table.get_symbols():
            if symbol.is_global() or table is top:
                name = symbol.get_name()
                if symbol.is_referenced() and name not in defined and not hasattr(builtins, name):
                    missing.add(name)
    return missing


def test_the_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_a_readme_python_block_defines_what_it_uses(block: str) -> None:
    compile(block, "README.md", "exec")
    assert undefined_names(block) == set()


def test_the_check_finds_an_undefined_name() -> None:
    assert undefined_names("from actors import throughput_gc\nwith throughput_gc():\n    trio.run(main)\n") == {"trio", "main"}
