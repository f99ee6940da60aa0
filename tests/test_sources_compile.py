"""Every Python file of the package compiles on this interpreter (a module no test imports,
such as a benchmark, would otherwise ship a syntax error unnoticed)."""
import py_compile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("common", "stage1_seg", "stage2_cls", "tooling", "configs")
                 for p in (ROOT / folder).rglob("*.py")) + [ROOT / "make_submission.py"]


def test_there_are_sources():
    assert len(SOURCES) > 30


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_compiles(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / "out.pyc"), doraise=True)
