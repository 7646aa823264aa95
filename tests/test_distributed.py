"""torch.distributed: real gloo processes (2 ranks on CPU, launched by torchrun).

Every rank holds the same logits after every update, and R ranks training on shards of each
batch (DDP, FSDP's ``fully_shard``, with and without gradient accumulation) end where one
process training on the whole batch ends. ``process_group`` picks what is all-reduced.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from famo import FAMOWeighting
from tests._scripts import distributed_train as worker
from tests._scripts.launch import run_script

SCRIPTS = Path(__file__).resolve().parent / "_scripts"

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="this torch has no torch.distributed"
)


def torchrun(script: Path, *args: str) -> str:
    return run_script(script, *args, ranks=2)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("distributed") / "ranks.pt"
    torchrun(SCRIPTS / "distributed_train.py", str(out))
    results: list[dict[str, Any]] = torch.load(out)
    assert [r["world"] for r in results] == [2, 2]
    return results


def one_process(micro_batches: int = 1, world: int = 2) -> dict[str, Any]:
    """The same training in this process on the whole batch (no process group here)."""
    batches = []
    for batch in worker.make_batches(worker.STEPS):
        # Micro-batch m of the whole batch is micro-batch m of every rank's shard, together.
        shards = [worker.shard(batch, rank, world) for rank in range(world)]
        pieces = [
            (shard[0].chunk(micro_batches)[m], shard[1].chunk(micro_batches)[m])
            for m in range(micro_batches)
            for shard in shards
        ]
        batches.append((torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])))
    model, famo = worker.make_model(), FAMOWeighting(worker.TASKS).double()
    worker.train(model, famo, batches, micro_batches=micro_batches)
    parameters = {name: p.detach() for name, p in model.named_parameters()}
    return {"parameters": parameters, "famo": {k: v.clone() for k, v in famo.state_dict().items()}}


def assert_same_training(distributed: dict[str, Any], single: dict[str, Any]) -> None:
    # All-reduced shard means and DDP's averaged gradients add the same numbers in another
    # order than one process does: equal to float64 rounding, not bit for bit.
    assert distributed["parameters"].keys() == single["parameters"].keys()
    for name, value in single["parameters"].items():
        torch.testing.assert_close(distributed["parameters"][name], value, rtol=1e-12, atol=1e-13)
    for name in ("logits", "exp_avg", "exp_avg_sq", "adam_step"):
        torch.testing.assert_close(
            distributed["famo"][name], single["famo"][name], rtol=1e-10, atol=1e-13
        )


@pytest.mark.parametrize("run", ["ddp", "ddp_accumulation", "fsdp"])
def test_every_rank_holds_the_same_logits_after_every_update(
    ranks: list[dict[str, Any]], run: str
) -> None:
    if isinstance(ranks[0][run], str):
        pytest.skip(f"FSDP does not run on CPU with this torch: {ranks[0][run]}")
    for result in ranks:
        assert result[run]["agree"] == [True] * worker.STEPS
    for name, buffer in ranks[0][run]["famo"].items():
        assert torch.equal(buffer, ranks[1][run]["famo"][name]), name
    assert ranks[0][run]["famo"]["logits"].abs().min() > 1e-3  # they did move


@pytest.mark.parametrize(("run", "micro_batches"), [("ddp", 1), ("ddp_accumulation", 2)])
def test_ddp_on_two_ranks_equals_one_process_on_the_whole_batch(
    ranks: list[dict[str, Any]], run: str, micro_batches: int
) -> None:
    single = one_process(micro_batches)
    for result in ranks:
        assert_same_training(result[run], single)


def test_fsdp_on_two_ranks_equals_one_process_on_the_whole_batch(
    ranks: list[dict[str, Any]],
) -> None:
    if isinstance(ranks[0]["fsdp"], str):
        pytest.skip(f"FSDP does not run on CPU with this torch: {ranks[0]['fsdp']}")
    single = one_process()
    for result in ranks:
        assert_same_training(result["fsdp"], single)


def logits_from(sequence: list[Tensor]) -> Tensor:
    famo = FAMOWeighting(worker.TASKS).double()
    for before, after in itertools.pairwise(sequence):
        famo.loss(before.clone().requires_grad_()).backward()
        famo.update(after)
    return famo.logits


def test_process_group_chooses_whose_losses_are_learned_from(ranks: list[dict[str, Any]]) -> None:
    sequence = [torch.tensor(row, dtype=torch.float64) for row in worker.LOSS_SEQUENCE]
    own = [logits_from([row + rank for row in sequence]) for rank in range(2)]
    mean = logits_from([row + 0.5 for row in sequence])  # the mean over ranks of row + rank
    for rank, result in enumerate(ranks):
        groups = result["groups"]
        # None (default) and an explicit group of all ranks: the mean over ranks, everywhere.
        torch.testing.assert_close(groups["default"], mean, rtol=1e-12, atol=1e-15)
        assert torch.equal(groups["world_group"], groups["default"])
        # False and a group of one rank: this rank's own losses only. (Equal to rounding: the
        # workers run one thread each, where the logits' Adam is torch's fused kernel.)
        torch.testing.assert_close(groups["off"], own[rank], rtol=1e-12, atol=1e-15)
        assert torch.equal(groups["own_group"], groups["off"])
    assert not torch.equal(own[0], own[1])


def test_tasks_missing_on_some_ranks_average_over_the_ranks_that_have_them(
    ranks: list[dict[str, Any]],
) -> None:
    # Rank 0 has tasks a and b, rank 1 has b and c (its losses are shifted by 1): a learns from
    # rank 0 only, c from rank 1 only, b from the mean of both.
    shift = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    expected = logits_from(
        [torch.tensor(row, dtype=torch.float64) + shift for row in worker.LOSS_SEQUENCE]
    )
    for result in ranks:
        torch.testing.assert_close(result["groups"]["missing"], expected, rtol=1e-12, atol=1e-15)
    assert torch.equal(ranks[0]["groups"]["missing"], ranks[1]["groups"]["missing"])


def test_the_readme_torchrun_example_runs() -> None:
    output = torchrun(SCRIPTS / "readme_ddp.py")
    assert "weights on every rank:" in output


def test_a_group_without_an_initialised_process_group_is_an_error() -> None:
    famo = FAMOWeighting(2, process_group=None)
    famo.backward(torch.tensor([1.0, 2.0], requires_grad=True))  # None: one process, fine
    with pytest.raises(TypeError, match="process_group"):
        FAMOWeighting(2, process_group="world")


@pytest.fixture(scope="module")
def errors(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("distributed_errors") / "ranks.pt"
    torchrun(SCRIPTS / "distributed_errors.py", str(out))
    results: list[dict[str, Any]] = torch.load(out)
    return results


def test_a_nan_on_one_rank_raises_on_every_rank_and_training_goes_on(
    errors: list[dict[str, Any]],
) -> None:
    # Rank 1 alone produced the NaN; both ranks skipped that batch together (no hang), and the
    # logits stayed identical through the remaining steps.
    assert [rank["shared"]["skipped"] for rank in errors] == [[2], [2]]
    assert torch.equal(errors[0]["shared"]["logits"], errors[1]["shared"]["logits"])
    assert errors[0]["shared"]["logits"].abs().min() > 1e-4  # it did train


def test_process_group_false_inside_ddp_keeps_each_ranks_own_state(
    errors: list[dict[str, Any]],
) -> None:
    for rank in errors:
        # Equal to an object outside DDP fed this rank's losses: DDP overwrote nothing.
        assert torch.equal(rank["own"]["logits"], rank["own"]["twin"])
    assert errors[0]["own"]["skipped"] == errors[1]["own"]["skipped"] == []
    assert not torch.equal(errors[0]["own"]["logits"], errors[1]["own"]["logits"])
