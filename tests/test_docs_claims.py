"""What the documentation says about itself and about the weights, checked so it cannot drift.

Each test is named after the claim it keeps true: no example imports what ``pip install`` does not
ship, no user page shows the test suite's plumbing, the count of official γ values matches the
table's rows, every printed weight says which weights it is, the front page's sentence about the
two weights describes its own example, the Trainer recipe reports the ``eval_loss`` it promises,
and an example that needs a newer torch than the floor says so.
"""

from __future__ import annotations

import ast
import math
import re
import runpy
from pathlib import Path

import pytest
import torch

from tests.doc_blocks import ROOT, Block, blocks, diff_sides, run
from tests.test_floor import declared_floor

DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if not {"_build", "_generated"} & set(p.parts))
# Pages whose subject is how famo itself is checked: they cite the tests as their evidence.
HOW_IT_IS_CHECKED = {DOCS / "design.md", DOCS / "guarantees.md"}
USER_PAGES = [
    ROOT / "README.md",
    ROOT / "PYPI.md",
    *(p for p in PAGES if p not in HOW_IT_IS_CHECKED),
]
ALL_BLOCKS = [
    block for page in [ROOT / "README.md", ROOT / "PYPI.md", *PAGES] for block in blocks(page)
]
# Public torch APIs the examples use that are newer than some torch famo once supported.
NEWER_TORCH = {
    "torch.amp.GradScaler(": (2, 3),  # a device argument, "cpu" included
    "fully_shard": (2, 6),  # public in torch.distributed.fsdp
}


def programs(block: Block) -> list[str]:
    return list(diff_sides(block.code)) if block.language == "diff" else [block.code]


def imported_modules(code: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_no_docs_block_imports_a_module_that_pip_install_does_not_ship() -> None:
    """``famo`` is the only package of the checkout that ``pip install`` installs."""
    checkout_only = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()} - {"famo"}
    assert {"benchmarks", "tests"} <= checkout_only
    for block in ALL_BLOCKS:
        for code in programs(block):
            wrong = imported_modules(code) & checkout_only
            assert not wrong, f"{block.where} imports {wrong}, which pip install does not ship"


def test_user_pages_show_no_test_plumbing() -> None:
    """The files and functions of the test suite are for maintainers, not on a reader's page."""
    for page in USER_PAGES:
        text = re.sub(r"<!--.*?-->", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
        for plumbing in (r"\btests/", r"_scripts\b", r"\btest_[a-z_]+", r"This block is"):
            found = re.search(plumbing, text)
            assert not found, f"{page.relative_to(ROOT)} shows {found.group(0)!r}"


NUMBERS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7}


def test_the_count_of_official_gamma_values_matches_its_rows() -> None:
    section = (
        (DOCS / "hyperparameters.md").read_text(encoding="utf-8").split("## Choosing gamma")[1]
    )
    count = re.search(r"the official code itself uses (\w+) values:", section)
    assert count, "the sentence that counts the official values is gone"
    table = section.split("| value | where |\n|---|---|\n", 1)[1].split("\n\n", 1)[0]
    rows = [line.split(" | ", 1) for line in table.splitlines()]
    values = [float(value.strip("|` ")) for value, _ in rows]
    assert len(set(values)) == len(values), f"one value in two rows: {values}"
    official = [float(value.strip("|` ")) for value, where in rows if "official" in where]
    assert NUMBERS[count.group(1)] == len(official), (count.group(1), official)


def test_every_printed_weight_says_which() -> None:
    """z (``weights``, on the log losses) and w (``loss_weights``, on each loss) read alike."""
    for block in ALL_BLOCKS:
        for number, line in enumerate(block.code.splitlines(), start=1):
            code = line.lstrip("+ -")
            if not re.search(r"print\(.*weights", code) or "loss_weights" in code:
                continue
            assert re.search(r"#.*\b[zw]\b", code), f"{block.where}+{number}: z or w? {line}"


def test_the_front_page_says_which_weights_its_example_prints() -> None:
    """The sentence under the front page's loop describes the numbers that loop prints."""
    sentence = "`normal`, the 100× task, has the largest {z} and the smallest {w}"
    for page, (z, w) in {
        ROOT / "README.md": ("z", "w"),
        ROOT / "PYPI.md": ("z", "w"),
        DOCS / "index.md": ("$z$", "$w$"),
    }.items():
        text = re.sub(r"\s+", " ", page.read_text(encoding="utf-8"))
        assert sentence.format(z=z, w=w) in text, page.name
        assert "`loss_weights`" in text and "*log* losses" in text, page.name
    (diff,) = [block for block in blocks(ROOT / "README.md") if block.language == "diff"]
    torch.manual_seed(0)
    namespace = run(diff_sides(diff.code)[1], diff.where)
    famo, scales = namespace["famo"], namespace["scales"]
    assert isinstance(famo.loss_weights, torch.Tensor) and isinstance(scales, torch.Tensor)
    largest = int(scales.argmax())
    assert famo.task_names[largest] == "normal"
    assert int(famo.weights.argmax()) == largest  # the largest z
    assert int(famo.loss_weights.argmin()) == largest  # the smallest w


def test_the_trainer_recipe_reports_eval_loss_as_famos_objective(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("transformers")
    from transformers import TrainingArguments

    from famo.transformers import FAMOTrainer

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = runpy.run_path(
        str(ROOT / "tests" / "_scripts" / "readme_transformers.py"), run_name="recipe"
    )
    metrics, trainer, data = namespace["metrics"], namespace["trainer"], namespace["data"]
    model, size = trainer.model, trainer.args.per_device_eval_batch_size
    evaluation = data[:64]
    model.eval()
    with torch.no_grad():
        objectives = [
            model.famo.loss(
                model(
                    x=torch.stack([row["x"] for row in evaluation[start : start + size]]),
                    y=torch.stack([row["y"] for row in evaluation[start : start + size]]),
                )["task_losses"]
            )
            for start in range(0, len(evaluation), size)
        ]
    assert math.isclose(metrics["eval_loss"], float(torch.stack(objectives).mean()), rel_tol=1e-5)

    # What the page says happens without label_names: no eval_loss at all.
    args = TrainingArguments(
        str(tmp_path / "no-labels"), report_to="none", use_cpu=True, disable_tqdm=True
    )
    plain = FAMOTrainer(model=model, args=args, eval_dataset=evaluation)
    assert "eval_loss" not in plain.evaluate()


def test_blocks_that_need_a_newer_torch_than_the_floor_say_which() -> None:
    floor = tuple(int(part) for part in declared_floor().split(".")[:2])
    for api, needed in NEWER_TORCH.items():
        users = [block for block in ALL_BLOCKS if api in block.code]
        assert users, f"no example uses {api}: drop it from NEWER_TORCH"
        if needed <= floor:
            continue
        version = ".".join(map(str, needed))
        for block in users:
            text = block.page.read_text(encoding="utf-8")
            opening = text[: text.index(block.code)].rsplit("```", 1)[0]
            before = opening.rsplit("```", 1)[-1]  # the prose since the previous block
            assert re.search(rf"torch ?(≥|>=) ?{re.escape(version)}", before), (
                f"{block.where} uses {api}: say 'needs torch ≥ {version}' before the block"
            )
