"""docs/recipes/fsdp2.md: FAMO beside a ``fully_shard`` model, saved and resumed with
``torch.distributed.checkpoint`` (2 gloo ranks on CPU).

The page's block is tests/_scripts/docs_fsdp2.py. It saves the sharded model, the optimizer and
FAMO's ``state_dict`` with ``dcp.save``, loads them into a new model with ``dcp.load``, and
asserts that the resumed run ends exactly where the run that never stopped ends (FAMO's logits
and the full parameters, ``torch.equal``); this test checks that it ran to its end and what it
saved.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests._scripts.launch import run_script

SCRIPTS = Path(__file__).resolve().parent / "_scripts"


@pytest.mark.slow
def test_the_fsdp2_recipe_resumes_exactly_from_a_distributed_checkpoint(tmp_path: Path) -> None:
    if not torch.distributed.is_available():
        pytest.skip("this torch has no torch.distributed")
    output = run_script(SCRIPTS / "docs_fsdp2.py", ranks=2, cwd=tmp_path)
    assert "steps: [10.0, 10.0]" in output  # 10 steps, every one learned from
    assert (tmp_path / "checkpoint" / ".metadata").is_file()  # a DCP checkpoint
