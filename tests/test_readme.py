"""The README is the front door: short, in a fixed order, and every example in it runs.

Its ```python blocks run, and its ```diff block runs twice (the loop before and after FAMO).
Its results lines are what ``python -m benchmarks.report`` writes from benchmarks/results/, and
PYPI.md, the description on the package index, has the same shape with absolute links only.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks.report import SUMMARY_END, SUMMARY_START, summary_section
from tests.doc_blocks import ROOT, Block, blocks, diff_sides, run

README = ROOT / "README.md"
PYPI = ROOT / "PYPI.md"
MAX_LINES = 250
SECTIONS = [
    "Install",
    "The lines that change in your loop",
    "Or two lines: `attach`",
    "Your setup",
    "Results",
    "How to cite",
    "Development",
]
SETUPS = {
    "plain-loop": "plain PyTorch loop",
    "amp": "mixed precision",
    "accumulation": "gradient accumulation",
    "distributed": "DDP or FSDP",
    "compile": "torch.compile",
    "lightning": "Lightning",
    "transformers": "Hugging Face `Trainer`",
    "accelerate": "Accelerate",
    "deepspeed": "DeepSpeed",
    "fsdp2": "FSDP2",
    "ray": "Ray Train",
    "peft": "PEFT / LoRA",
}


def headings(path: Path) -> list[str]:
    return re.findall(r"^## (.+)$", path.read_text(encoding="utf-8"), re.MULTILINE)


def test_the_readme_is_short_and_in_order() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_LINES
    assert headings(README) == SECTIONS
    intro = text.split("\n## ", 1)[0]
    assert intro.startswith("# famo\n")
    assert len(re.split(r"\n\s*\n", intro.strip())) == 3  # title, tagline, one paragraph


@pytest.mark.parametrize("block", blocks(README), ids=lambda block: block.where)
def test_readme_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert block.marker is None, f"{block.where}: every README block runs here"
    if block.language == "diff":
        before, after = diff_sides(block.code)
        assert "famo" not in before  # the loop as it was
        run(before, f"{block.where} (before)")
        run(after, f"{block.where} (after)")
    else:
        run(block.code, block.where)


def test_readme_blocks_fit_the_page() -> None:
    for block in blocks(README):
        assert all(len(line) <= 88 for line in block.code.splitlines()), block.where


def test_the_readme_shows_the_diff_and_the_attach_variant() -> None:
    found = blocks(README)
    assert [block.language for block in found] == ["diff", "python"]
    diff, attach = found
    assert "+    famo.backward(" in diff.code and "+        famo.update(" in diff.code
    assert "extra_forward=False" in attach.code and "famo.attach(optimizer)" in attach.code
    assert "return famo.loss(losses)" in attach.code


def test_every_setup_links_to_its_recipe() -> None:
    table = README.read_text(encoding="utf-8").split("\n## Your setup\n", 1)[1].split("\n## ")[0]
    for page, setup in SETUPS.items():
        row = next((line for line in table.splitlines() if setup in line), None)
        assert row is not None, setup
        assert f"](docs/recipes/{page}.md)" in row, row
        assert (ROOT / "docs" / "recipes" / f"{page}.md").is_file(), page


def test_relative_links_name_files_of_the_repository() -> None:
    text = README.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+://", target):
            assert (ROOT / target).exists(), target


def test_the_readme_results_are_the_benchmarks_report() -> None:
    """Five lines and one figure, written by `python -m benchmarks.report` from the JSON files."""
    text = README.read_text(encoding="utf-8")
    section = text.split(SUMMARY_START + "\n", 1)[1].split(SUMMARY_END, 1)[0]
    assert section == summary_section() + "\n"
    assert len([line for line in section.splitlines() if line.startswith("- ")]) == 5
    assert len(re.findall(r"!\[[^\]]*\]\(benchmarks/results/[a-z0-9_]+\.png\)", section)) == 1


def test_pypi_md_has_the_readme_shape_with_absolute_links() -> None:
    """The package index shows PYPI.md: the same sections and examples, no relative link."""
    readme, pypi = README.read_text(encoding="utf-8"), PYPI.read_text(encoding="utf-8")
    assert headings(PYPI) == SECTIONS
    assert [b.code for b in blocks(PYPI)] == [b.code for b in blocks(README)]
    assert readme.split("\n## ", 1)[0] == pypi.split("\n## ", 1)[0]
    bullets = [line for line in summary_section().splitlines() if line.startswith("- ")]
    assert all(line in pypi.splitlines() for line in bullets)
    targets = re.findall(r"\]\(([^)]*)\)", pypi) + re.findall(r"<(\S+://\S+)>", pypi)
    assert targets and all(t.startswith("https://") for t in targets), targets
    for page in SETUPS:
        assert f"`docs/recipes/{page}.md`" in pypi, page


def test_the_claims_found_wrong_stay_out() -> None:
    """Two statements once made here were wrong when checked against the code (see
    tests/test_docs_peers.py and the missing-tasks tests): they must not come back."""
    texts = [README, PYPI, *sorted((ROOT / "docs").rglob("*.md"))]
    for path in texts:
        text = re.sub(r"\s+", " ", path.read_text(encoding="utf-8"))
        assert "same weights bit for bit" not in text, path
        assert not re.search(r"parent module steps (them|its logits|TorchJD)", text), path
