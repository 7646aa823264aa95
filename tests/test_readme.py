"""Every ```python block of README.md runs, so the documentation cannot rot.

A block preceded by the line ``<!-- skip-test -->`` is not run here (it needs torchrun or a
GPU); the test named in the README next to it covers the same code.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"(<!-- skip-test -->\n)?```python\n(.*?)```", re.DOTALL)


def python_blocks() -> list[tuple[int, str]]:
    text = README.read_text(encoding="utf-8")
    blocks = []
    for match in BLOCK.finditer(text):
        if match.group(1) is None:
            line = text.count("\n", 0, match.start()) + 1
            blocks.append((line, match.group(2)))
    return blocks


def test_the_readme_has_runnable_examples() -> None:
    assert len(python_blocks()) >= 5


@pytest.mark.parametrize(
    ("line", "code"), python_blocks(), ids=lambda v: f"line{v}" if isinstance(v, int) else ""
)
def test_readme_block_runs(
    line: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # blocks may save checkpoints
    namespace: dict[str, object] = {"__name__": f"readme_line_{line}"}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)


def test_the_readme_results_are_the_benchmarks_report() -> None:
    """The README's numbers are the ones `python -m benchmarks.report` wrote, not hand-edited."""
    readme = README.read_text(encoding="utf-8")
    section = readme.split("<!-- results:start -->", 1)[1].split("<!-- results:end -->", 1)[0]
    report = README.parent / "benchmarks" / "results" / "README_results.md"
    assert section.strip() == report.read_text(encoding="utf-8").strip()
