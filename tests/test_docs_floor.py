"""The documentation's examples on the oldest supported torch (``make test-floor``).

Every block of README.md and docs/ that needs only torch, famo and the standard library runs on
the floor torch, so that an example cannot quietly need a newer release than ``pyproject.toml``
declares. A block that does must say so in the prose just before it ("needs torch ≥ 2.9"); it is
then left out here. In the main environment tests/test_docs.py runs every block instead.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import sys
from pathlib import Path

import pytest
import torch

from tests.doc_blocks import ROOT, Block, blocks, diff_sides, run

pytestmark = pytest.mark.skipif(
    os.environ.get("FAMO_FLOOR_ENV") != "1",
    reason="for the floor environment (make test-floor); tests/test_docs.py runs every block here",
)
PAGES = [
    ROOT / "README.md",
    *sorted(
        p for p in (ROOT / "docs").rglob("*.md") if not {"_build", "_generated"} & set(p.parts)
    ),
]


def programs(block: Block) -> list[str]:
    return list(diff_sides(block.code)) if block.language == "diff" else [block.code]


def needs_only_torch(block: Block) -> bool:
    allowed = {"torch", "famo", *sys.stdlib_module_names}
    for code in programs(block):
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.Import):
                names = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = {node.module.split(".")[0]}
            else:
                continue
            if not names <= allowed:
                return False
    return True


def says_it_needs_a_newer_torch(block: Block) -> bool:
    text = block.page.read_text(encoding="utf-8")
    prose = text[: text.index(block.code)].rsplit("```", 1)[0].rsplit("```", 1)[-1]
    return re.search(r"needs torch ?(≥|>=) ?[0-9]", prose) is not None


def test_the_examples_that_need_only_torch_run_on_the_floor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chosen = [
        block
        for page in PAGES
        for block in blocks(page)
        if block.marker != "skip-test"
        and needs_only_torch(block)
        and not says_it_needs_a_newer_torch(block)
    ]
    assert len(chosen) >= 20, [block.where for block in chosen]
    failures = []
    for number, block in enumerate(chosen):
        for side, code in enumerate(programs(block)):
            folder = tmp_path / f"{number}-{side}"
            folder.mkdir()
            monkeypatch.chdir(folder)  # blocks may save checkpoints
            torch.manual_seed(0)
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    run(code, block.where)
            except Exception as error:  # every failing block is reported, not only the first
                failures.append(f"{block.where}: {type(error).__name__}: {error}")
    assert not failures, f"on torch {torch.__version__}:\n" + "\n".join(failures)
