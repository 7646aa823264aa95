"""docs/recipes/ray.md: FAMO in a Ray Train ``TorchTrainer`` (2 CPU workers, gloo), resumed from
a Ray ``Checkpoint``.

The page's block is tests/_scripts/docs_ray.py, run here in its own process (Ray starts a local
cluster). It trains 4 epochs with a checkpoint (model, optimizer, FAMO's ``state_dict``) after
each, starts a new run from the checkpoint of epoch 1, and asserts that the resumed run ends
with the same FAMO logits as the run that never stopped; this test checks that the resumed run
trained only the epochs after the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._scripts.launch import run_script

pytest.importorskip(
    "ray.train.torch", reason="Ray Train is not installed: pip install 'ray[train]'"
)
SCRIPTS = Path(__file__).resolve().parent / "_scripts"


@pytest.mark.slow
def test_the_ray_recipe_resumes_exactly_from_a_ray_checkpoint(tmp_path: Path) -> None:
    output = run_script(SCRIPTS / "docs_ray.py", cwd=tmp_path, timeout_s=400)
    assert "weights: [" in output
    assert len(checkpoints(tmp_path / "ray-results" / "straight")) == 4  # one per epoch
    assert len(checkpoints(tmp_path / "ray-results" / "resumed")) == 2  # epochs 2 and 3 only


def checkpoints(run: Path) -> list[Path]:
    return [path for path in run.glob("checkpoint_*") if path.is_dir()]
