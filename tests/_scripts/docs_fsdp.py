# train_fsdp.py: run with `torchrun --nproc-per-node 2 train_fsdp.py`
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from famo import FAMOWeighting


def main() -> None:
    dist.init_process_group("gloo")  # "nccl" for GPUs, with init_device_mesh("cuda", ...)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial model and data on every rank
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)  # each rank holds a shard of the parameters
    fully_shard(model, mesh=mesh)
    famo = FAMOWeighting(["small", "large"])  # not sharded: a few numbers, the same on every rank
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 10), torch.randn(64, 2) * torch.tensor([1.0, 30.0])
    x, y = x[rank::world], y[rank::world]  # this rank's shard of the batch

    def task_losses() -> torch.Tensor:
        return ((model(x) - y) ** 2).mean(dim=0)

    for _ in range(20):
        optimizer.zero_grad()
        famo.backward(task_losses())
        optimizer.step()
        with torch.no_grad():
            famo.update(task_losses())

    everyone = [torch.empty_like(famo.logits) for _ in range(world)]
    dist.all_gather(everyone, famo.logits)
    assert all(torch.equal(logits, famo.logits) for logits in everyone)
    if rank == 0:
        print(f"weights on every rank: {famo.weights.tolist()}")  # z, the task weights
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
