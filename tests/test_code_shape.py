"""The package stays plain: no function longer than 60 lines, none more complex than radon's grade C."""

from __future__ import annotations

import ast
from pathlib import Path

from radon.complexity import cc_rank, cc_visit
from support import REPO

MODULES = sorted((REPO / "entrypoint").glob("*.py"))
MAX_LINES = 60


def functions(path: Path) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    tree = ast.parse(path.read_text())
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def test_no_function_is_longer_than_60_lines() -> None:
    long = [
        f"{path.name}:{f.lineno} {f.name} ({f.end_lineno - f.lineno + 1} lines)"
        for path in MODULES
        for f in functions(path)
        if f.end_lineno is not None and f.end_lineno - f.lineno + 1 > MAX_LINES
    ]
    assert MODULES
    assert not long, long


def test_no_block_is_graded_worse_than_c() -> None:
    worse = [
        f"{path.name}:{block.lineno} {block.name} ({cc_rank(block.complexity)}, {block.complexity})"
        for path in MODULES
        for block in cc_visit(path.read_text())
        if cc_rank(block.complexity) > "C"
    ]
    assert MODULES
    assert not worse, worse
