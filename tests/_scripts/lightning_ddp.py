"""Worker for tests/test_lightning.py: ``python THIS OUT.pt`` trains with Lightning's "ddp"
strategy on 2 CPU processes (Lightning starts the second one itself) and rank 0 saves the
module's parameters and FAMO state."""

from __future__ import annotations

import sys
import warnings

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from famo import FAMOWeighting
from famo.lightning import FAMOCallback
from tests._scripts.teardown import exit_worker

TASKS = 3
STEPS = 3
GLOBAL_BATCH = 16


class MultiTask(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, TASKS)).double()
        self.famo = FAMOWeighting(TASKS).double()

    def task_losses(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return ((self.net(x) - y) ** 2).mean(dim=0)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.famo.loss(self.task_losses(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.net.parameters(), lr=0.02)

    def train_dataloader(self) -> torch.utils.data.DataLoader[tuple[Tensor, ...]]:
        # Rank r takes samples r, r + R, …: each step's shards together are one process's batch.
        rank, world = self.trainer.global_rank, self.trainer.world_size
        shard = torch.utils.data.Subset(dataset(), range(rank, STEPS * GLOBAL_BATCH, world))
        return torch.utils.data.DataLoader(shard, batch_size=GLOBAL_BATCH // world)


def dataset() -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(1)
    scale = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)
    x = torch.randn(STEPS * GLOBAL_BATCH, 4, generator=generator, dtype=torch.float64)
    y = torch.randn(STEPS * GLOBAL_BATCH, TASKS, generator=generator, dtype=torch.float64)
    return torch.utils.data.TensorDataset(x, y * scale)


def fit(devices: int) -> MultiTask:
    """``devices`` processes, each on ``GLOBAL_BATCH / devices`` samples per step."""
    module = MultiTask()
    trainer = pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        callbacks=[FAMOCallback()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,  # train_dataloader shards by itself, without shuffling
    )
    trainer.fit(module)
    return module


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    module = fit(devices=2)
    gathered = [torch.empty_like(module.famo.logits) for _ in range(2)]
    torch.distributed.all_gather(gathered, module.famo.logits)
    if torch.distributed.get_rank() == 0:
        torch.save(
            {
                "parameters": {k: v.detach() for k, v in module.net.named_parameters()},
                "famo": {k: v.clone() for k, v in module.famo.state_dict().items()},
                "logits_of_every_rank": gathered,
            },
            sys.argv[1],
        )
    exit_worker()  # not the interpreter's own exit: see teardown.py
