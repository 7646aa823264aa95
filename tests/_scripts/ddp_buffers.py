"""Worker for tests/test_ddp_buffers.py: ``torchrun --nproc-per-node 2 THIS OUT``.

A model holds FAMO as a submodule inside ``DistributedDataParallel``. FAMO's state is made of
registered buffers, which DDP broadcasts from rank 0 in place, at construction and before every
forward (``broadcast_buffers``, in torch 2.13 also ``forward_sync_buffers``). Each case trains
on this rank's shard of every batch, with two accumulated micro-batches (``no_sync`` on the
first); after each case, the rank writes what it found to ``OUT.rank<r>.pt`` by itself (no
collective at the end, so that a rank that failed cannot hang the other).

Cases: the default shared state (``process_group=None``) under default DDP; one state per rank
(``process_group=False``) with ``broadcast_buffers=False``; ``torch.distributed.checkpoint``'s
``set_model_state_dict(broadcast_from_rank0=True)`` into a model holding FAMO; and last, a state
per rank under a DDP that broadcasts buffers (by default, with ``init_sync=False``, with torch
2.13's ``forward_sync_buffers=False``), which FAMO should refuse on every rank with an error that
names ``broadcast_buffers=False``.
"""

from __future__ import annotations

import inspect
import itertools
import sys
import traceback
import warnings
from contextlib import nullcontext
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.nn.parallel import DistributedDataParallel as DDP

from famo import FAMOWeighting
from tests._scripts import distributed_train as worker
from tests._scripts.teardown import exit_worker

MICRO_BATCHES = 2


class Holder(nn.Module):
    """The multi-task model of distributed_train.py, holding its FAMOWeighting."""

    def __init__(self, **famo: Any) -> None:
        super().__init__()
        self.net = worker.make_model()
        self.famo = FAMOWeighting(worker.TASKS, dtype=torch.float64, **famo)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def task_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return ((model(x) - y) ** 2).mean(dim=0)


def local_batches(rank: int, world: int) -> list[tuple[Tensor, Tensor]]:
    return [worker.shard(batch, rank, world) for batch in worker.make_batches(worker.STEPS)]


def train(ddp: DDP, batches: list[tuple[Tensor, Tensor]], twin: FAMOWeighting | None) -> None:
    """The README's loop with accumulation; ``twin`` (outside DDP) is fed the same losses."""
    famo = ddp.module.famo
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
    for x, y in batches:
        optimizer.zero_grad()
        windows = list(zip(x.chunk(MICRO_BATCHES), y.chunk(MICRO_BATCHES), strict=True))
        for index, (xm, ym) in enumerate(windows):
            last = index == len(windows) - 1
            with nullcontext() if last else ddp.no_sync():
                losses = task_losses(ddp, xm, ym)
                (famo.loss(losses) / len(windows)).backward()
            if twin is not None:
                twin.loss(losses.detach().clone().requires_grad_()).backward()
        optimizer.step()
        with torch.no_grad():
            after = torch.stack([task_losses(ddp, xm, ym) for xm, ym in windows])
        famo.update(after)
        if twin is not None:
            twin.update(after.clone())


def gathered(tensor: Tensor) -> list[Tensor]:
    everyone = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, tensor.contiguous())
    return everyone


def outcome(ddp: DDP) -> dict[str, Any]:
    famo = ddp.module.famo
    return {
        "parameters": {k: v.detach().clone() for k, v in ddp.module.net.named_parameters()},
        "famo": {k: v.clone() for k, v in famo.state_dict().items()},
        "logits_of_every_rank": gathered(famo.logits),
    }


def shared(rank: int, world: int) -> dict[str, Any]:
    ddp = DDP(Holder())  # default: buffers broadcast at construction and before every forward
    train(ddp, local_batches(rank, world), twin=None)
    return outcome(ddp)


def own(rank: int, world: int, **ddp_options: Any) -> dict[str, Any]:
    ddp = DDP(Holder(process_group=False), **ddp_options)
    twin = FAMOWeighting(worker.TASKS, dtype=torch.float64, process_group=False)
    train(ddp, local_batches(rank, world), twin)
    return {**outcome(ddp), "twin": {k: v.clone() for k, v in twin.state_dict().items()}}


def dcp_broadcast(rank: int, world: int) -> dict[str, Any]:
    """Rank 0 alone has the full state dict; set_model_state_dict broadcasts it to every rank."""
    full: dict[str, Any] = {}
    if rank == 0:
        source = Holder(process_group=False)  # trained here alone: no collective
        famo = source.famo
        for before, after in itertools.pairwise(worker.LOSS_SEQUENCE):
            famo.loss(torch.tensor(before, dtype=torch.float64, requires_grad=True)).backward()
            famo.update(list(after))
        famo.backward(torch.tensor(worker.LOSS_SEQUENCE[-1], dtype=torch.float64).requires_grad_())
        full = get_model_state_dict(source)
    target = Holder()
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(target, full, options=options)
    return {
        "famo": {k: v.clone() for k, v in target.famo.state_dict().items()},
        "source": {k.removeprefix("famo."): v for k, v in full.items() if k.startswith("famo.")},
        "pending": target.famo.pending,
    }


def refused(rank: int, world: int, **ddp_options: Any) -> dict[str, Any]:
    """One training step of a per-rank FAMO under a DDP that broadcasts buffers: the error each
    rank raised."""
    try:
        ddp = DDP(Holder(process_group=False), **ddp_options)
        train(ddp, local_batches(rank, world)[:1], twin=None)
    except Exception as error:  # what it is goes to the test
        return {"type": type(error).__name__, "message": str(error)}
    return {"type": None, "message": "no error"}


def main(out: str) -> None:
    warnings.simplefilter("ignore")  # torch 2.13 deprecates broadcast_buffers (a FutureWarning)
    # A collective that one rank never joins fails after 20 s instead of hanging.
    dist.init_process_group("gloo", timeout=timedelta(seconds=20))
    rank, world = dist.get_rank(), dist.get_world_size()
    cases: dict[str, Any] = {
        "shared": lambda: shared(rank, world),
        "own_no_broadcast": lambda: own(rank, world, broadcast_buffers=False),
        "dcp_broadcast": lambda: dcp_broadcast(rank, world),
        # Last: a rank that did not refuse may be left waiting in a collective.
        "refused_default": lambda: refused(rank, world),
    }
    if "forward_sync_buffers" in inspect.signature(DDP).parameters:  # torch >= 2.13
        # No broadcast before the forwards, but at construction (torch: "If you rely on buffers
        # NOT being synced at init (e.g. rank-local buffers), keep using broadcast_buffers=False").
        cases["refused_forward_sync_off"] = lambda: refused(rank, world, forward_sync_buffers=False)
    # No broadcast at construction, but before every forward, which keeps the buffers' version
    # counters: only the ranks it overwrote can see it, and the others must not be left waiting.
    cases["refused_without_init_sync"] = lambda: refused(rank, world, init_sync=False)
    results: dict[str, Any] = {"world": world}
    for name, case in cases.items():
        try:
            results[name] = case()
        except Exception:
            results[name] = {"crashed": traceback.format_exc()}
        torch.save(results, f"{out}.rank{rank}.pt")
    exit_worker(strict=False)  # a refused case may leave the group broken: see teardown.py


if __name__ == "__main__":
    main(sys.argv[1])
