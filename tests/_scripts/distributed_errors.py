"""Worker for tests/test_distributed.py: ``torchrun --nproc-per-node 2 THIS OUT.pt``.

Two things that only show with several ranks:

* a NaN loss on rank 1 only: the values are checked after the all-reduce, so every rank raises
  at the same call, every rank skips the batch, and training goes on with identical logits;
* ``FAMOWeighting(process_group=False)`` inside a ``DistributedDataParallel`` model built with
  ``broadcast_buffers=False``: each rank keeps its own state (FAMO's state is buffers, which
  DDP would otherwise broadcast from rank 0; famo refuses that case, tested elsewhere).
  (No NaN there: a rank that raises alone and skips its backward would leave DDP's gradient
  all-reduce waiting on the others. That is why the shared default checks after the reduce.)
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from famo import FAMOWeighting
from tests._scripts.teardown import save_on_rank_0_and_exit

F64 = torch.float64
STEPS = 5
BAD_STEP = 2


def batch(step: int, rank: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(8, 4, generator=generator, dtype=F64)
    return x, torch.randn(8, 2, generator=generator, dtype=F64) * torch.tensor([1.0, 10.0])


class Net(nn.Module):
    def __init__(self, process_group: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 2).double()
        self.famo = FAMOWeighting(2, process_group=process_group, dtype=F64)

    def task_losses(self, x: Tensor, y: Tensor) -> Tensor:
        return ((self(x) - y) ** 2).mean(dim=0) + 0.1

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def train(process_group: Any, rank: int) -> dict[str, Any]:
    net = Net(process_group)
    # The shared state may take DDP's default buffer broadcast (the same values on every rank);
    # one state per rank needs broadcast_buffers=False.
    ddp = DistributedDataParallel(net, broadcast_buffers=process_group is not False)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    twin = FAMOWeighting(2, process_group=False, dtype=F64)  # outside DDP: this rank's values
    skipped = []
    for step in range(STEPS):
        x, y = batch(step, rank)
        losses = ((ddp(x) - y) ** 2).mean(dim=0) + 0.1
        if step == BAD_STEP and rank == 1 and process_group is None:
            losses = losses * torch.tensor([1.0, float("nan")], dtype=F64)
        optimizer.zero_grad()
        try:
            net.famo.backward(losses)
        except ValueError as error:
            assert "mean over the ranks" in str(error), error
            skipped.append(step)  # the README's advice: skip the batch, on every rank
            continue
        if process_group is False:
            twin.backward(losses.detach().clone().requires_grad_())
        optimizer.step()
        with torch.no_grad():
            after = ((ddp(x) - y) ** 2).mean(dim=0) + 0.1
            net.famo.update(after)
            if process_group is False:
                twin.update(after)
    return {"skipped": skipped, "logits": net.famo.logits.clone(), "twin": twin.logits.clone()}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {"shared": train(None, rank), "own": train(False, rank)}
    save_on_rank_0_and_exit(results, out)


if __name__ == "__main__":
    main(sys.argv[1])
