"""FAMO's buffers inside ``DistributedDataParallel``, on 2 gloo ranks (torchrun).

DDP broadcasts a module's buffers from rank 0, in place, at construction and before every
forward. With the default shared state (``process_group=None``) every rank holds the same FAMO
state, so the broadcast changes nothing: DDP with accumulation (``no_sync``) trains as one
process on the whole batch, the logits identical on every rank. With one state per rank
(``process_group=False``) the broadcast would overwrite ranks 1.. with rank 0's state: FAMO
refuses on every rank, naming ``broadcast_buffers=False``, under DDP's default and (beyond the
named case) under ``init_sync=False`` and torch 2.13's ``forward_sync_buffers=False``, each of
which still broadcasts at one of the two points; with ``broadcast_buffers=False`` each rank's
state is its own, equal to an object outside DDP fed the same losses. Beyond DDP:
``set_model_state_dict(broadcast_from_rank0=True)`` gives every rank rank 0's FAMO state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from famo import FAMOWeighting
from tests._scripts import distributed_train as worker
from tests._scripts.ddp_buffers import MICRO_BATCHES
from tests._scripts.launch import run_script

SCRIPTS = Path(__file__).resolve().parent / "_scripts"

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="this torch has no torch.distributed"
)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp_buffers") / "result"
    run_script(SCRIPTS / "ddp_buffers.py", str(out), ranks=2)
    results = [torch.load(f"{out}.rank{rank}.pt", weights_only=False) for rank in range(2)]
    assert [result["world"] for result in results] == [2, 2]
    return results


def case(ranks: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    found = [result[name] for result in ranks]
    for rank, result in enumerate(found):
        assert "crashed" not in result, f"rank {rank}:\n{result.get('crashed')}"
    return found


def one_process() -> tuple[torch.nn.Module, FAMOWeighting]:
    """The same training in this process: micro-batch m of the whole batch is micro-batch m of
    every rank's shard, together."""
    batches = []
    for batch in worker.make_batches(worker.STEPS):
        shards = [worker.shard(batch, rank, 2) for rank in range(2)]
        pieces = [
            (shard[0].chunk(MICRO_BATCHES)[m], shard[1].chunk(MICRO_BATCHES)[m])
            for m in range(MICRO_BATCHES)
            for shard in shards
        ]
        batches.append((torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])))
    model, famo = worker.make_model(), FAMOWeighting(worker.TASKS, dtype=torch.float64)
    worker.train(model, famo, batches, micro_batches=MICRO_BATCHES)
    return model, famo


def test_the_shared_state_inside_ddp_trains_as_one_process(ranks: list[dict[str, Any]]) -> None:
    # DDP's broadcast before every forward (the micro-batches under no_sync too) meets a state
    # that is the same on every rank: nothing recorded on one rank is lost.
    model, famo = one_process()
    for rank, result in enumerate(case(ranks, "shared")):
        everyone = result["logits_of_every_rank"]
        assert torch.equal(everyone[0], everyone[1]), rank
        for name, parameter in model.named_parameters():
            torch.testing.assert_close(
                result["parameters"][name], parameter.detach(), rtol=1e-12, atol=1e-13
            )
        for key, value in famo.state_dict().items():
            torch.testing.assert_close(result["famo"][key], value, rtol=1e-10, atol=1e-13)
    assert famo.steps.tolist() == [float(worker.STEPS)] * worker.TASKS
    assert famo.logits.abs().min() > 1e-3


def test_without_the_buffer_broadcast_each_rank_keeps_its_own_state(
    ranks: list[dict[str, Any]],
) -> None:
    found = case(ranks, "own_no_broadcast")
    for result in found:
        # Equal to an object outside DDP fed this rank's losses: DDP overwrote nothing.
        assert result["famo"].keys() == result["twin"].keys()
        for key, value in result["twin"].items():
            assert torch.equal(result["famo"][key], value), key
    # The ranks were fed different losses (their own shards) and learned different logits.
    assert not torch.equal(found[0]["famo"]["logits"], found[1]["famo"]["logits"])
    assert found[0]["famo"]["logits"].abs().min() > 1e-3


@pytest.mark.parametrize(
    "name", ["refused_default", "refused_without_init_sync", "refused_forward_sync_off"]
)
def test_a_per_rank_state_under_ddps_buffer_broadcast_is_refused_on_every_rank(
    ranks: list[dict[str, Any]], name: str
) -> None:
    # By default DDP broadcasts buffers at construction and before every forward;
    # init_sync=False leaves out the first, torch 2.13's forward_sync_buffers=False the second.
    # Only broadcast_buffers=False leaves out both.
    if name not in ranks[0]:
        pytest.skip("this torch's DDP has no forward_sync_buffers")
    for rank, result in enumerate(case(ranks, name)):
        assert result["type"] == "RuntimeError", (rank, result)
        assert "broadcast_buffers=False" in result["message"], (rank, result["message"])


def test_set_model_state_dict_broadcasts_rank_0s_famo_state(ranks: list[dict[str, Any]]) -> None:
    source = case(ranks, "dcp_broadcast")[0]["source"]
    assert source  # rank 0 had the full state dict; rank 1 passed {}
    for rank, result in enumerate(case(ranks, "dcp_broadcast")):
        assert result["famo"].keys() == source.keys(), rank
        for key, value in source.items():
            assert torch.equal(result["famo"][key], value), (rank, key)
        assert result["pending"], rank
