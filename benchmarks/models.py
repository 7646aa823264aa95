"""The two multi-task models: a shared trunk (the `features` that torchjd's `mtl_backward` needs)
and one head per task."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn


class MultiTaskNet(nn.Module):
    """Shared trunk plus one head per task; `forward` returns (features, per-task outputs)."""

    def __init__(self, trunk: nn.Module, heads: list[nn.Module]) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(heads)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        features = self.trunk(x)
        return features, [head(features) for head in self.heads]

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.trunk.parameters()

    def task_parameters(self) -> list[list[nn.Parameter]]:
        return [list(head.parameters()) for head in self.heads]


def multimnist_net(n_tasks: int = 2) -> MultiTaskNet:
    """LeNet-style trunk on 36×36 canvases (as in Sener & Koltun, 2018), MLP heads, 10 classes."""
    trunk = nn.Sequential(
        nn.Conv2d(1, 10, 5),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Conv2d(10, 20, 5),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(20 * 6 * 6, 50),
        nn.ReLU(),
    )
    heads: list[nn.Module] = [
        nn.Sequential(nn.Linear(50, 50), nn.ReLU(), nn.Linear(50, 10)) for _ in range(n_tasks)
    ]
    return MultiTaskNet(trunk, heads)


def qm9_net(n_tasks: int = 11, n_features: int = 35, width: int = 256) -> MultiTaskNet:
    """MLP on fixed per-molecule features, one linear head per target."""
    trunk = nn.Sequential(
        nn.Linear(n_features, width),
        nn.SiLU(),
        nn.Linear(width, width),
        nn.SiLU(),
        nn.Linear(width, width // 2),
        nn.SiLU(),
    )
    heads: list[nn.Module] = [nn.Linear(width // 2, 1) for _ in range(n_tasks)]
    return MultiTaskNet(trunk, heads)


class SingleTaskNets(nn.Module):
    """k independent copies, task i read from copy i: the single-task (STL) reference.

    Training them with a summed loss and Adam is exactly k separate single-task trainings (no
    parameter is shared, and Adam acts per coordinate), at the cost of one loop.
    """

    def __init__(self, nets: list[MultiTaskNet]) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        outputs = [net(x)[1][i] for i, net in enumerate(self.nets)]
        return torch.empty(0), outputs
