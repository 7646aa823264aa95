"""Worker for tests/test_transformers.py: ``torchrun --nproc-per-node 2 THIS OUT.pt`` trains a
FAMOTrainer on 2 CPU processes (gloo DDP), each on half of every batch, and rank 0 saves the
model's parameters and FAMO's state. ``fit(folder, processes=1)`` is the same run in one process
on whole batches."""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from transformers import TrainingArguments

from famo import FAMOWeighting
from famo.transformers import FAMOTrainer
from tests._scripts.teardown import exit_worker

TASKS = 3
GLOBAL_BATCH = 8
ACCUMULATE = 2
STEPS = 3


class MultiTask(nn.Module):
    def __init__(self, extra_forward: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, TASKS)).double()
        self.famo = FAMOWeighting(TASKS, extra_forward=extra_forward, dtype=torch.float64)

    def forward(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        return {"task_losses": ((self.net(x) - y) ** 2).mean(dim=0)}  # means over equal shards


def data() -> list[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(1)
    samples = STEPS * ACCUMULATE * GLOBAL_BATCH
    x = torch.randn(samples, 4, generator=generator, dtype=torch.float64)
    scale = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)
    y = torch.randn(samples, TASKS, generator=generator, dtype=torch.float64) * scale
    return [{"x": x[i], "y": y[i]} for i in range(samples)]


def fit(folder: str, processes: int, extra_forward: bool) -> MultiTask:
    model = MultiTask(extra_forward)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    args = TrainingArguments(
        folder,
        max_steps=STEPS,
        per_device_train_batch_size=GLOBAL_BATCH // processes,
        gradient_accumulation_steps=ACCUMULATE,
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        ddp_backend="gloo" if processes > 1 else None,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    trainer = FAMOTrainer(
        model=model, args=args, train_dataset=data(), optimizers=(optimizer, schedule)
    )
    trainer.train()
    return model


def results(model: MultiTask) -> dict[str, Any]:
    return {
        "parameters": {name: p.detach().clone() for name, p in model.net.named_parameters()},
        "famo": {name: value.clone() for name, value in model.famo.state_dict().items()},
    }


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    out, extra_forward = sys.argv[1], sys.argv[2] == "extra_forward"
    model = fit(out + ".run", processes=2, extra_forward=extra_forward)
    assert torch.distributed.get_world_size() == 2
    gathered = [torch.empty_like(model.famo.logits) for _ in range(2)]
    torch.distributed.all_gather(gathered, model.famo.logits)
    if torch.distributed.get_rank() == 0:
        torch.save({**results(model), "logits_of_every_rank": gathered}, out)
    exit_worker()  # not the interpreter's own exit: see teardown.py
