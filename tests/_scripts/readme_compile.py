import torch
from torch import nn

from famo import FAMOWeighting

model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
famo = FAMOWeighting(["small", "large"], validate=False)  # no host sync, so no graph break
x, y = torch.randn(64, 10), torch.randn(64, 2) * torch.tensor([1.0, 30.0])


def task_losses() -> torch.Tensor:
    return ((model(x) - y) ** 2).mean(dim=0)


@torch.compile(fullgraph=True)
def forward_loss() -> torch.Tensor:
    return famo.loss(task_losses())


@torch.compile(fullgraph=True)
@torch.no_grad()
def update() -> None:
    famo.update(task_losses())


for _ in range(20):
    optimizer.zero_grad()
    forward_loss().backward()
    optimizer.step()
    update()
print(f"weights: {famo.weights.tolist()}")  # z, the task weights
