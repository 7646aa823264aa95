"""Worker for tests/test_accelerate.py: ``accelerate launch --num_processes 2 THIS OUT.pt``
(or ``torchrun --nproc-per-node 2 THIS OUT.pt``) trains with Accelerate on 2 CPU processes
(gloo), each on half of every batch (``split_batches=True``), with gradient accumulation and an
attached ``FAMOWeighting(extra_forward=False)``; rank 0 saves the model, FAMO's state and the
logits of every rank. ``train(processes=1)`` is the same run in one process."""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from torch import Tensor, nn

from famo import FAMOWeighting
from tests._scripts.teardown import exit_worker

TASKS = 3
BATCH = 16  # per optimizer micro-step, over all processes
ACCUMULATE = 2
STEPS = 3


def data() -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(1)
    scale = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)
    samples = STEPS * ACCUMULATE * BATCH
    x = torch.randn(samples, 4, generator=generator, dtype=torch.float64)
    y = torch.randn(samples, TASKS, generator=generator, dtype=torch.float64)
    return torch.utils.data.TensorDataset(x, y * scale)


def train(accelerator: Accelerator) -> tuple[nn.Module, FAMOWeighting]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, TASKS)).double()
    famo = FAMOWeighting(TASKS, extra_forward=False, dtype=torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    loader = torch.utils.data.DataLoader(data(), batch_size=BATCH)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    famo.attach(optimizer)
    for x, y in loader:
        with accelerator.accumulate(model):
            losses = ((model(x) - y) ** 2).mean(dim=0)  # means over equal shards
            accelerator.backward(famo.loss(losses))  # FAMO averages the loss values over ranks
            optimizer.step()
            optimizer.zero_grad()
    return accelerator.unwrap_model(model), famo


def results(model: nn.Module, famo: FAMOWeighting) -> dict[str, Any]:
    return {
        "parameters": {name: p.detach().clone() for name, p in model.named_parameters()},
        "famo": {name: value.clone() for name, value in famo.state_dict().items()},
    }


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    accelerator = Accelerator(
        cpu=True,
        gradient_accumulation_steps=ACCUMULATE,
        dataloader_config=DataLoaderConfiguration(split_batches=True),  # 8 + 8 of each 16
    )
    assert accelerator.num_processes == 2, accelerator.num_processes
    model, famo = train(accelerator)
    gathered: list[Tensor] = [torch.empty_like(famo.logits) for _ in range(2)]
    torch.distributed.all_gather(gathered, famo.logits)
    if accelerator.is_main_process:
        torch.save({**results(model, famo), "logits_of_every_rank": gathered}, sys.argv[1])
    exit_worker()  # not accelerator.end_training() and the interpreter's exit: see teardown.py
