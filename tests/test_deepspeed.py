"""docs/recipes/deepspeed.md: FAMO with a DeepSpeed engine (ZeRO 1 and 2, CPU, 2 gloo ranks).

The page's block is tests/_scripts/docs_deepspeed.py, run here through deepspeed_stage.py for
each ZeRO stage. It trains with gradient accumulation in DeepSpeed's config and FAMO attached to
``engine.optimizer``, saves FAMO's state with ``save_checkpoint(client_state=...)``, resumes a
new engine from it, and asserts that the resumed run ends exactly where the run that never
stopped ends (FAMO's logits and the model's parameters, ``torch.equal``) and that every rank
holds the same logits; this test checks how many optimizer steps FAMO learned from.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests._scripts.launch import run_script

pytest.importorskip(
    "deepspeed",
    reason="DeepSpeed is not installed: `DS_BUILD_OPS=0 pip install --no-build-isolation "
    "deepspeed` (the Makefile does so)",
)
SCRIPTS = Path(__file__).resolve().parent / "_scripts"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_the_deepspeed_recipe_resumes_exactly_under_zero(stage: int, tmp_path: Path) -> None:
    if not torch.distributed.is_available():
        pytest.skip("this torch has no torch.distributed")
    output = run_script(SCRIPTS / "deepspeed_stage.py", str(stage), ranks=2, cwd=tmp_path)
    # 16 micro-batches, 2 per optimizer step: 8 steps, the 8th awaiting the next batch.
    assert "optimizer steps FAMO learned from: [7.0, 7.0]" in output
    assert (tmp_path / "checkpoints" / "latest").is_file()  # DeepSpeed's own checkpoint
