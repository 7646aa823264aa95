# train_deepspeed.py: run with `torchrun --nproc-per-node 2 train_deepspeed.py`
import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from famo import FAMOWeighting

CONFIG = {
    "train_micro_batch_size_per_gpu": 8,
    "gradient_accumulation_steps": 2,  # an optimizer step every 2nd micro-batch
    "zero_optimization": {"stage": 2},  # or 1
    "zero_allow_untested_optimizer": True,  # a torch.optim optimizer under ZeRO
}


def build() -> tuple[deepspeed.DeepSpeedEngine, FAMOWeighting]:
    torch.manual_seed(0)  # the same initial model on every rank
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=CONFIG)
    famo = FAMOWeighting(["small", "large"], extra_forward=False)
    famo.attach(engine.optimizer)  # learns once per optimizer step that DeepSpeed takes
    return engine, famo


def train(engine, famo: FAMOWeighting, batches: list) -> None:
    for x, y in batches:  # micro-batches
        losses = ((engine(x) - y) ** 2).mean(dim=0)
        engine.backward(famo.loss(losses))
        engine.step()  # a real optimizer step at the end of each accumulation window


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")  # "nccl" on GPUs
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1)
    x, y = torch.randn(256, 10), torch.randn(256, 2) * torch.tensor([1.0, 30.0])
    x, y = x[rank::world], y[rank::world]  # this rank's shard
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 128, 8)]

    engine, famo = build()
    train(engine, famo, batches[:8])
    engine.save_checkpoint("checkpoints", client_state={"famo": famo.state_dict()})
    train(engine, famo, batches[8:])  # the run that never stopped

    resumed, resumed_famo = build()  # a new run, in practice another process
    _, client_state = resumed.load_checkpoint("checkpoints")
    resumed_famo.load_state_dict(client_state["famo"])
    train(resumed, resumed_famo, batches[8:])
    # The resumed run ends exactly where the run that never stopped ends.
    assert torch.equal(resumed_famo.logits, famo.logits)
    for before, after in zip(engine.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(before, after)
    everyone = [torch.empty_like(famo.logits) for _ in range(world)]
    dist.all_gather(everyone, famo.logits)
    assert all(torch.equal(logits, famo.logits) for logits in everyone)  # on every rank
    if rank == 0:
        print("optimizer steps FAMO learned from:", famo.steps.tolist())
        print(f"weights: {famo.weights_dict(as_floats=True)}")  # z, the task weights
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
