"""Every code block of the documentation pages (docs/**/*.md) runs, so the pages cannot rot.

Blocks run one by one, each in a fresh namespace and a fresh working directory, so every block
is a complete program a reader can paste. The markers are described in ``tests/doc_blocks.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests._scripts.launch import run_script
from tests.doc_blocks import ROOT, Block, blocks, diff_sides, run

DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if not {"_build", "_generated"} & set(p.parts))


def all_blocks() -> list[Block]:
    return [block for page in PAGES for block in blocks(page)]


def runnable() -> list[Block]:
    return [block for block in all_blocks() if block.marker != "skip-test"]


def skipped() -> list[Block]:
    return [block for block in all_blocks() if block.marker == "skip-test"]


def pairs() -> dict[str, list[Block]]:
    grouped: dict[str, list[Block]] = {}
    for block in all_blocks():
        if block.marker == "same-weights":
            assert block.argument is not None, block.where
            grouped.setdefault(block.argument, []).append(block)
    return grouped


def test_the_pages_have_runnable_examples() -> None:
    assert len(runnable()) >= 30
    assert {block.marker for block in all_blocks()} <= {None, "skip-test", "same-weights"}
    for page in ("getting-started.md", "algorithm.md", "migration.md", "howto.md"):
        assert any(block.page == DOCS / page for block in runnable()), page


@pytest.mark.parametrize("block", runnable(), ids=lambda block: block.where)
def test_docs_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # blocks may save checkpoints
    torch.manual_seed(0)
    if block.language == "diff":
        before, after = diff_sides(block.code)
        run(before, f"{block.where} (before)")
        run(after, f"{block.where} (after)")
    else:
        run(block.code, block.where)


@pytest.mark.parametrize("block", skipped(), ids=lambda block: block.where)
def test_a_block_not_run_here_is_a_script_that_a_test_runs(block: Block) -> None:
    """The page shows the script verbatim, and some test module runs that script."""
    assert block.argument is not None, f"{block.where}: name the script the block equals"
    script = ROOT / block.argument
    assert block.code == script.read_text(encoding="utf-8"), f"{block.where} != {script}"
    runners = [
        path
        for path in (ROOT / "tests").glob("test_*.py")
        if re.search(rf"\b{re.escape(script.name)}\b", path.read_text(encoding="utf-8"))
    ]
    assert runners, f"no test runs {script.name}"


@pytest.mark.parametrize("name", sorted(pairs()))
def test_each_migration_pair_gives_the_same_weights(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer's block and famo's block, run from the same seed, end with the same weights."""
    monkeypatch.chdir(tmp_path)
    pair = pairs()[name]
    assert len(pair) == 2, [block.where for block in pair]
    results = []
    for block in pair:
        torch.manual_seed(0)
        weights = run(block.code, block.where)["weights"]
        assert isinstance(weights, torch.Tensor), block.where
        results.append(weights)
    theirs, ours = results
    # The same formulas in another order (autograd through the softmax and torch.optim.Adam
    # against the closed form and the fused kernel): equal to float32 rounding.
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_the_torchjd_pairs_run_torchjd() -> None:
    pytest.importorskip("torchjd")
    for name, pair in pairs().items():
        if name.startswith("torchjd"):
            assert "from torchjd" in pair[0].code and "from famo" in pair[1].code, name


def test_the_fsdp_recipe_runs_under_torchrun() -> None:
    if not torch.distributed.is_available():
        pytest.skip("this torch has no torch.distributed")
    output = run_script(ROOT / "tests" / "_scripts" / "docs_fsdp.py", ranks=2)
    assert "weights on every rank:" in output


@pytest.mark.parametrize("block", runnable(), ids=lambda block: block.where)
def test_blocks_fit_the_page(block: Block) -> None:
    """No line wider than 88 characters, so that no block scrolls sideways on the site."""
    wide = [line for line in block.code.splitlines() if len(line) > 88]
    assert not wide, f"{block.where}: {wide}"


def test_measured_numbers_in_prose_come_from_the_results() -> None:
    """A mean ± std in a page's prose is a substitution filled from benchmarks/results."""
    for page in PAGES:
        prose = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
        prose = re.sub(r"\{\{[^}]*\}\}", "", prose)
        assert "±" not in prose, f"{page}: a hand-typed result; use a {{{{ fact }}}}"


def test_the_checkpoint_keys_on_the_guarantees_page_are_the_real_ones() -> None:
    from famo import FAMOWeighting

    page = (DOCS / "guarantees.md").read_text(encoding="utf-8")
    table = page.split("## Checkpoints", 1)[1].split("\n\n| key |", 1)[1].split("\n\n", 1)[0]
    documented = re.findall(
        r"`([a-z_0-9]+)`", "\n".join(r.split("|")[1] for r in table.splitlines())
    )
    for famo in (FAMOWeighting(2), FAMOWeighting(["a", "b"], allow_missing_tasks=True)):
        assert documented == list(famo.state_dict()), documented


def test_always_present_tasks_with_missing_tasks_allowed_agree_to_rounding() -> None:
    """What docs/algorithm.md and docs/guarantees.md promise: equal to rounding (float32)."""
    from famo import FAMOWeighting

    names = ["a", "b", "c"]
    strict, allowing = FAMOWeighting(names), FAMOWeighting(names, allow_missing_tasks=True)
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        before = torch.rand(3, generator=generator) + 0.5
        after = before * (0.5 + 0.5 * torch.rand(3, generator=generator))
        for famo in (strict, allowing):
            famo.backward(dict(zip(names, before.clone().requires_grad_(), strict=True)))
            famo.update(dict(zip(names, after, strict=True)))
    torch.testing.assert_close(allowing.weights, strict.weights, rtol=0, atol=1e-6)


def test_every_page_is_in_the_table_of_contents() -> None:
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    for page in PAGES:
        name = page.relative_to(DOCS).with_suffix("").as_posix()
        if name != "index":
            assert re.search(rf"^{re.escape(name)}$", index, re.MULTILINE), name
