# train_fsdp2.py: run with `torchrun --nproc-per-node 2 train_fsdp2.py`
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from famo import FAMOWeighting


def build(mesh) -> tuple[nn.Module, torch.optim.Optimizer, FAMOWeighting]:
    torch.manual_seed(0)  # the same initial model on every rank
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # each rank holds a shard of every parameter
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return model, optimizer, FAMOWeighting(["small", "large"])  # FAMO: not sharded


def train(model, optimizer, famo, batches) -> None:
    for x, y in batches:
        optimizer.zero_grad()
        famo.backward(((model(x) - y) ** 2).mean(dim=0))
        optimizer.step()
        with torch.no_grad():
            famo.update(((model(x) - y) ** 2).mean(dim=0))


def save(folder: str, model, optimizer, famo) -> None:
    model_state, optimizer_state = get_state_dict(model, optimizer)  # sharded
    state = {"model": model_state, "optim": optimizer_state, "famo": famo.state_dict()}
    dcp.save(state, checkpoint_id=folder)  # every rank writes its own shards


def load(folder: str, model, optimizer, famo) -> None:
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optimizer_state, "famo": famo.state_dict()}
    dcp.load(state, checkpoint_id=folder)  # in place, into the tensors of `state`
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=optimizer_state,
    )
    famo.load_state_dict(state["famo"])


def main() -> None:
    dist.init_process_group("gloo")  # "nccl" with init_device_mesh("cuda", ...) on GPUs
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(1)
    x, y = torch.randn(160, 10), torch.randn(160, 2) * torch.tensor([1.0, 30.0])
    x, y = x[rank::world], y[rank::world]  # this rank's shard of every batch
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 80, 8)]

    model, optimizer, famo = build(mesh)
    train(model, optimizer, famo, batches[:5])
    save("checkpoint", model, optimizer, famo)
    train(model, optimizer, famo, batches[5:])  # the run that never stopped

    resumed = build(mesh)  # a new run, in practice another process
    load("checkpoint", *resumed)
    train(*resumed, batches[5:])
    # The resumed run ends exactly where the run that never stopped ends.
    assert torch.equal(resumed[2].logits, famo.logits)
    for before, after in zip(model.parameters(), resumed[0].parameters(), strict=True):
        assert torch.equal(before.full_tensor(), after.full_tensor())
    if rank == 0:
        print(f"steps: {famo.steps.tolist()} weights: {famo.weights.tolist()}")  # z
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
