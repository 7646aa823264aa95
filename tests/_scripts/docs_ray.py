import os
import tempfile

import ray.train
import torch
from ray.train import Checkpoint, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, prepare_model
from torch import nn

from famo import FAMOWeighting


def train_loop(config: dict) -> None:
    torch.manual_seed(0)
    model = prepare_model(nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2)))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    famo = FAMOWeighting(["small", "large"])  # all-reduces over Ray's process group
    first_epoch = 0
    # After a failure, Ray restarts the loop from the run's latest checkpoint;
    # a new run resumes from the checkpoint it is given.
    checkpoint = ray.train.get_checkpoint() or config.get("resume_from")
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, "state.pt"))
        model.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        famo.load_state_dict(state["famo"])
        first_epoch = state["epoch"] + 1

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 10, generator=generator)
    y = torch.randn(64, 2, generator=generator) * torch.tensor([1.0, 30.0])
    x, y = x[rank::world], y[rank::world]  # this rank's shard
    for epoch in range(first_epoch, config["epochs"]):
        for i in range(0, len(x), 8):
            optimizer.zero_grad()
            famo.backward(((model(x[i : i + 8]) - y[i : i + 8]) ** 2).mean(dim=0))
            optimizer.step()
            with torch.no_grad():
                famo.update(((model(x[i : i + 8]) - y[i : i + 8]) ** 2).mean(dim=0))
        state = {
            "model": model.module.state_dict(),
            "optimizer": optimizer.state_dict(),
            "famo": famo.state_dict(),
            "epoch": epoch,
        }
        metrics = {"epoch": epoch, "logits": famo.logits.tolist()}
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:  # every rank holds the same state
                torch.save(state, os.path.join(folder, "state.pt"))
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))
            else:
                ray.train.report(metrics)


def fit(name: str, resume_from: Checkpoint | None = None) -> ray.train.Result:
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"epochs": 4, "resume_from": resume_from},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=RunConfig(name=name, storage_path=os.path.abspath("ray-results")),
    )
    return trainer.fit()


straight = fit("straight")  # 4 epochs; a checkpoint after each
after_two_epochs = next(c for c, m in straight.best_checkpoints if m["epoch"] == 1)
resumed = fit("resumed", resume_from=after_two_epochs)  # epochs 2 and 3 again
# The resumed run ends exactly where the run that never stopped ends.
assert resumed.metrics["logits"] == straight.metrics["logits"]
weights = torch.softmax(torch.tensor(straight.metrics["logits"]), dim=0)
print(f"weights: {weights.tolist()}")  # z, the task weights
