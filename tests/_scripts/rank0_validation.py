"""Worker for tests/test_local_evaluation.py: ``torchrun --nproc-per-node 2 THIS OUT``.

Trains the model of distributed_train.py inside DDP with FAMO as a submodule (shared state, two
accumulated micro-batches) twice: once plainly, once with rank 0 alone evaluating in the middle
of training, the way a validation or logging step guarded by ``if rank == 0`` does. Rank 0's
evaluation calls: ``famo.loss`` under ``torch.no_grad()`` (three batches, while losses are
pending) and under ``torch.inference_mode()``, ``weights_dict(as_floats=True)``, and saving
``state_dict()``. None of them may run a collective, so the other rank never waits for them
and training goes on as if they never happened. Each rank writes ``OUT.rank<r>.pt`` itself.
"""

from __future__ import annotations

import sys
import traceback
import warnings
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP

from tests._scripts import distributed_train as worker
from tests._scripts.ddp_buffers import MICRO_BATCHES, Holder, local_batches, task_losses
from tests._scripts.teardown import exit_worker

VALIDATION = [
    (torch.full((4, 4), 0.5 * i, dtype=torch.float64), torch.ones(4, worker.TASKS) * i)
    for i in range(1, 4)
]


def validate(ddp: DDP, step: int, folder: str) -> None:
    """Rank 0 only: what a validation loop and a checkpoint callback do between steps."""
    model = ddp.module  # DDP's own forward would broadcast its buffers: a collective
    famo = model.famo
    if step == 0:  # while the step's losses are recorded and waiting for `update`
        with torch.no_grad():
            for x, y in VALIDATION:  # as many batches as rank 0 has (rank 1 has none)
                famo.loss(task_losses(model, x, y.double()))
    elif step == 1:
        with torch.inference_mode():
            x, y = VALIDATION[0]
            famo.loss(task_losses(model, x, y.double()))
        famo.weights_dict(as_floats=True)  # for a logger
        torch.save(model.state_dict(), Path(folder) / f"checkpoint-{step}.pt")


def train(
    rank: int, world: int, extra_forward: bool, validating: bool, folder: str
) -> dict[str, Any]:
    ddp = DDP(Holder(extra_forward=extra_forward))
    famo = ddp.module.famo
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
    if not extra_forward:
        famo.attach(optimizer)
    for step, (x, y) in enumerate(local_batches(rank, world)):
        optimizer.zero_grad()
        windows = list(zip(x.chunk(MICRO_BATCHES), y.chunk(MICRO_BATCHES), strict=True))
        for index, (xm, ym) in enumerate(windows):
            last = index == len(windows) - 1
            with nullcontext() if last else ddp.no_sync():
                (famo.loss(task_losses(ddp, xm, ym)) / len(windows)).backward()
        optimizer.step()
        if validating and rank == 0:
            validate(ddp, step, folder)
        if extra_forward:
            with torch.no_grad():
                after = torch.stack([task_losses(ddp, xm, ym) for xm, ym in windows])
            famo.update(after)
    everyone: list[Tensor] = [torch.empty_like(famo.logits) for _ in range(world)]
    dist.all_gather(everyone, famo.logits)
    return {
        "parameters": {k: v.detach().clone() for k, v in ddp.module.net.named_parameters()},
        "famo": {k: v.clone() for k, v in famo.state_dict().items()},
        "logits_of_every_rank": everyone,
    }


def main(out: str) -> None:
    warnings.simplefilter("ignore")
    # A collective that one rank never joins fails after 20 s instead of hanging.
    dist.init_process_group("gloo", timeout=timedelta(seconds=20))
    rank, world = dist.get_rank(), dist.get_world_size()
    folder = str(Path(out).parent)
    results: dict[str, Any] = {"world": world}
    for extra_forward in (True, False):
        for validating in (False, True):
            name = f"{'extra_forward' if extra_forward else 'attached'}-{validating}"
            try:
                results[name] = train(rank, world, extra_forward, validating, folder)
            except Exception:
                results[name] = {"crashed": traceback.format_exc()}
            torch.save(results, f"{out}.rank{rank}.pt")
    exit_worker(strict=False)  # a hung collective may leave the group broken: see teardown.py


if __name__ == "__main__":
    main(sys.argv[1])
