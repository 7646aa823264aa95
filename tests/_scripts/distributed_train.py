"""Worker for tests/test_distributed.py: run with ``torchrun --nproc-per-node 2 THIS OUT.pt``.

Trains the same small multi-task model on each rank's shard of every batch under DDP and under
FSDP (``fully_shard``), with and without gradient accumulation, feeds rank-specific loss
sequences to objects with each ``process_group`` setting, and checks after every update that
all ranks hold the same logits. Rank 0 saves what the test compares with one process.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from famo import FAMOWeighting
from tests._scripts.teardown import save_on_rank_0_and_exit

TASKS = 3
GLOBAL_BATCH = 16
STEPS = 3
MICRO_BATCHES = 2
LOSS_SEQUENCE = [(1.0, 2.0, 3.0), (0.9, 1.9, 2.5), (0.7, 1.85, 2.4), (0.6, 1.6, 2.0)]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, TASKS)).double()


def make_batches(count: int) -> list[tuple[Tensor, Tensor]]:
    """The global batches: per-task targets on scales 1, 10, 100."""
    generator = torch.Generator().manual_seed(1)
    scale = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)
    return [
        (
            torch.randn(GLOBAL_BATCH, 4, generator=generator, dtype=torch.float64),
            torch.randn(GLOBAL_BATCH, TASKS, generator=generator, dtype=torch.float64) * scale,
        )
        for _ in range(count)
    ]


def task_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Per-sample means, so the mean over equal shards is the loss of the whole batch."""
    return ((model(x) - y) ** 2).mean(dim=0)


def shard(batch: tuple[Tensor, Tensor], rank: int, world: int) -> tuple[Tensor, Tensor]:
    size = batch[0].shape[0] // world
    return batch[0][rank * size : (rank + 1) * size], batch[1][rank * size : (rank + 1) * size]


def train(
    model: nn.Module,
    famo: FAMOWeighting,
    batches: list[tuple[Tensor, Tensor]],
    *,
    micro_batches: int = 1,
    after_update: Callable[[], None] = lambda: None,
) -> None:
    """The README's loop; ``batches`` are this process's data, split into ``micro_batches``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for x, y in batches:
        optimizer.zero_grad()
        windows = list(zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=True))
        for xm, ym in windows:
            (famo.loss(task_losses(model, xm, ym)) / len(windows)).backward()
        optimizer.step()
        with torch.no_grad():
            famo.update(torch.stack([task_losses(model, xm, ym) for xm, ym in windows]))
        after_update()


def logits_agree(famo: FAMOWeighting) -> Callable[[], None]:
    """After every update: gather the logits of all ranks and record whether they are equal."""
    record: list[bool] = []

    def check() -> None:
        gathered = [torch.empty_like(famo.logits) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, famo.logits)
        record.append(all(torch.equal(g, gathered[0]) for g in gathered))

    check.record = record  # type: ignore[attr-defined]
    return check


def state(model: nn.Module, famo: FAMOWeighting, agree: Callable[[], None]) -> dict[str, Any]:
    parameters = {}
    for name, parameter in model.named_parameters():
        full = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
        parameters[name.removeprefix("module.")] = full.detach().clone()
    famo_state = {key: value.clone() for key, value in famo.state_dict().items()}
    return {"parameters": parameters, "famo": famo_state, "agree": agree.record}  # type: ignore[attr-defined]


def run_ddp(rank: int, world: int, micro_batches: int) -> dict[str, Any]:
    model = nn.parallel.DistributedDataParallel(make_model())
    famo = FAMOWeighting(TASKS).double()
    agree = logits_agree(famo)
    local = [shard(batch, rank, world) for batch in make_batches(STEPS)]
    train(model, famo, local, micro_batches=micro_batches, after_update=agree)
    return state(model, famo, agree)


def run_fsdp(rank: int, world: int) -> dict[str, Any] | str:
    """FSDP2 with every Linear sharded; a string if this torch cannot shard on CPU."""
    model = make_model()
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    except (ImportError, NotImplementedError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    famo = FAMOWeighting(TASKS).double()
    agree = logits_agree(famo)
    local = [shard(batch, rank, world) for batch in make_batches(STEPS)]
    train(model, famo, local, after_update=agree)
    return state(model, famo, agree)


def run_groups(rank: int, world: int) -> dict[str, Tensor]:
    """Rank r's losses are the sequence plus r: which ranks' losses each object learns from."""
    singletons = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    objects = {
        "default": FAMOWeighting(TASKS).double(),
        "off": FAMOWeighting(TASKS, process_group=False).double(),
        "world_group": FAMOWeighting(TASKS, process_group=dist.new_group(list(range(world)))),
        "own_group": FAMOWeighting(TASKS, process_group=singletons[rank]),
    }
    for famo in objects.values():
        famo.double()
        for before, after in itertools.pairwise(LOSS_SEQUENCE):
            losses = torch.tensor(before, dtype=torch.float64) + rank
            famo.loss(losses.requires_grad_()).backward()
            famo.update(torch.tensor(after, dtype=torch.float64) + rank)
    # Tasks missing on some ranks: each task's loss is the mean over the ranks that have it.
    names = ["a", "b", "c"]
    missing = FAMOWeighting(names, allow_missing_tasks=True).double()
    mine = names[rank : rank + 2]  # rank 0: a, b; rank 1: b, c
    for before, after in itertools.pairwise(LOSS_SEQUENCE):
        losses = {n: torch.tensor(before[names.index(n)] + rank, dtype=torch.float64) for n in mine}
        missing.loss({n: v.requires_grad_() for n, v in losses.items()}).backward()
        missing.update({n: after[names.index(n)] + rank for n in mine})
    objects["missing"] = missing
    return {name: famo.logits.clone() for name, famo in objects.items()}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results: dict[str, Any] = {
        "world": world,
        "ddp": run_ddp(rank, world, micro_batches=1),
        "ddp_accumulation": run_ddp(rank, world, micro_batches=MICRO_BATCHES),
        "fsdp": run_fsdp(rank, world),
        "groups": run_groups(rank, world),
    }
    save_on_rank_0_and_exit(results, out)


if __name__ == "__main__":
    main(sys.argv[1])
