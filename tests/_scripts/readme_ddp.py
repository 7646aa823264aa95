# train_ddp.py: run with `torchrun --nproc-per-node 2 train_ddp.py`
import torch
import torch.distributed as dist
from torch import nn

from famo import FAMOWeighting


def main() -> None:
    dist.init_process_group("gloo")  # "nccl" for GPUs (then move model and data to the GPU)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial model and data on every rank
    model = nn.parallel.DistributedDataParallel(nn.Linear(10, 2))
    famo = FAMOWeighting(["small", "large"])  # all-reduces over the default group by itself
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 10), torch.randn(64, 2) * torch.tensor([1.0, 30.0])
    x, y = x[rank::world], y[rank::world]  # this rank's shard (a DistributedSampler in practice)

    def task_losses() -> torch.Tensor:  # per-sample means over equal shards
        return ((model(x) - y) ** 2).mean(dim=0)

    for _ in range(20):
        optimizer.zero_grad()
        famo.backward(task_losses())  # weights from all ranks' losses, applied to the local ones
        optimizer.step()
        with torch.no_grad():
            famo.update(task_losses())  # all ranks take the same logit step

    everyone = [torch.empty_like(famo.logits) for _ in range(world)]
    dist.all_gather(everyone, famo.logits)
    assert all(torch.equal(logits, famo.logits) for logits in everyone)
    if rank == 0:
        print(f"weights on every rank: {famo.weights.tolist()}")  # z, the task weights
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
