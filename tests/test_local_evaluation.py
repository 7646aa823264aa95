"""Collectives run only where every rank must run them: evaluation is local (2 gloo ranks).

Under DDP, rank 0 alone evaluates in the middle of training (``famo.loss`` under
``torch.no_grad()`` and ``torch.inference_mode()``, with losses pending; the weights for a
logger; a ``state_dict()`` saved by rank 0), as validation and checkpoint code guarded by
``if rank == 0`` does. A call that records nothing has nothing to agree on with the other
ranks: no hang, no collective mismatch, and training ends exactly where it ends without the
evaluation, with the same logits on every rank. With ``extra_forward=True`` (``update``) and
attached with ``extra_forward=False`` (an optimizer step already taken when rank 0 evaluates).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests._scripts.launch import run_script

SCRIPTS = Path(__file__).resolve().parent / "_scripts"

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="this torch has no torch.distributed"
)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("rank0_validation") / "result"
    run_script(SCRIPTS / "rank0_validation.py", str(out), ranks=2)
    results = [torch.load(f"{out}.rank{rank}.pt", weights_only=False) for rank in range(2)]
    assert [result["world"] for result in results] == [2, 2]
    return results


@pytest.mark.parametrize("mode", ["extra_forward", "attached"])
def test_rank_0_alone_evaluating_mid_training_changes_nothing(
    ranks: list[dict[str, Any]], mode: str
) -> None:
    for rank, result in enumerate(ranks):
        plain, validated = result[f"{mode}-False"], result[f"{mode}-True"]
        for run in (plain, validated):
            assert "crashed" not in run, f"rank {rank}:\n{run.get('crashed')}"
        everyone = validated["logits_of_every_rank"]
        assert torch.equal(everyone[0], everyone[1]), rank
        assert validated["famo"].keys() == plain["famo"].keys()
        for key, value in plain["famo"].items():
            assert torch.equal(validated["famo"][key], value), (rank, key)
        for name, value in plain["parameters"].items():
            assert torch.equal(validated["parameters"][name], value), (rank, name)
        assert plain["famo"]["logits"].abs().min() > 1e-3  # it did train
