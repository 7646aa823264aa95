import pytorch_lightning as pl
import torch
from torch import nn

from famo import FAMOWeighting
from famo.lightning import FAMOCallback


class TwoTasks(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
        self.famo = FAMOWeighting(["small", "large"])  # a submodule: in Lightning's checkpoints

    def task_losses(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return ((self.net(x) - y) ** 2).mean(dim=0)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        losses = self.task_losses(batch)
        self.log_dict({"small": losses[0], "large": losses[1]})
        return self.famo.loss(losses)  # Lightning runs backward and the optimizer step

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.net.parameters(), lr=1e-3)


x, y = torch.randn(256, 10), torch.randn(256, 2) * torch.tensor([1.0, 30.0])
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
trainer = pl.Trainer(
    max_steps=20,
    accumulate_grad_batches=2,  # optional: FAMOCallback averages the window's losses
    callbacks=[FAMOCallback()],  # calls famo.update after each optimizer step
    logger=False,
    enable_progress_bar=False,
)
module = TwoTasks()
trainer.fit(module, data)
print(f"weights: {module.famo.weights.tolist()}")  # z, the task weights
