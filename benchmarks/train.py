"""One training run of one method on one data set, shared by the demo and the quality benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from benchmarks import methods
from benchmarks.models import MultiTaskNet, SingleTaskNets

LossFn = Callable[[list[Tensor], Tensor], list[Tensor]]


@dataclass
class Run:
    """What a training run produced."""

    model: nn.Module
    wall_time: float
    steps: int
    cpu_time: float = 0.0  # this process's CPU seconds: fair even when a neighbour shares cores
    history_steps: list[int] = field(default_factory=list)
    history_losses: list[list[float]] = field(default_factory=list)  # train batch losses
    history_weights: list[list[float]] = field(default_factory=list)  # FAMO's weights, if any

    def record(self, seed: int, **metrics: object) -> dict[str, object]:
        """The JSON record of this run: its seed, metrics, times and step count."""
        return {
            "seed": seed,
            **metrics,
            "wall_time": self.wall_time,
            "cpu_time": self.cpu_time,
            "steps": self.steps,
        }


def train(
    method_name: str,
    build: Callable[[], MultiTaskNet],
    n_tasks: int,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    record_every: int = 10,
    progress: bool = True,
    desc: str = "",
) -> Run:
    """Train a fresh model (seeded) with `method_name`; the batch order depends only on `seed`."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    model: nn.Module
    model = SingleTaskNets([build() for _ in range(n_tasks)]) if method_name == "stl" else build()
    method = methods.make(method_name, model, n_tasks, lr)
    order = torch.Generator().manual_seed(seed)
    n = len(inputs)
    steps_per_epoch = (n + batch_size - 1) // batch_size
    run = Run(model=model, wall_time=0.0, steps=0)
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, disable=not progress, leave=False)
    model.train()
    start = time.perf_counter()
    start_cpu = time.process_time()
    for _ in range(epochs):
        permutation = torch.randperm(n, generator=order)
        for b in range(steps_per_epoch):
            index = permutation[b * batch_size : (b + 1) * batch_size]
            x, y = inputs[index], targets[index]

            def compute(x: Tensor = x, y: Tensor = y) -> tuple[Tensor, list[Tensor]]:
                features, outputs = model(x)
                return features, loss_fn(outputs, y)

            losses = method.step(compute)
            run.steps += 1
            if run.steps % record_every == 0:
                run.history_steps.append(run.steps)
                run.history_losses.append(losses.tolist())
                weights = method.weights()
                if weights is not None:
                    run.history_weights.append(weights.tolist())
            bar.update()
        method.end_epoch()
    run.wall_time = time.perf_counter() - start
    run.cpu_time = time.process_time() - start_cpu
    bar.close()
    model.eval()
    return run


@torch.no_grad()
def predict(model: nn.Module, inputs: Tensor, batch_size: int = 2048) -> list[Tensor]:
    """Per-task outputs on `inputs`, concatenated over batches."""
    chunks: list[list[Tensor]] = []
    for start in range(0, len(inputs), batch_size):
        _, outputs = model(inputs[start : start + batch_size])
        chunks.append(outputs)
    return [torch.cat(parts) for parts in zip(*chunks, strict=True)]
