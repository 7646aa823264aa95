"""A small but real FAMO training run that checkpoints, for the crash-and-resume test.

    python -m tests._scripts.train_for_resume --dir DIR --steps N [--resume] [--slow-after K]

Every ``--save-every`` steps it writes model, optimizer, FAMO, step and RNG state in one
``torch.save``, atomically (a temporary file, then ``os.replace``), and prints ``saved <step>``.
With ``--slow-after K`` each step after the first checkpoint at or past step K sleeps briefly, so
that a test can SIGKILL it part-way. At the end it writes ``final.pt`` in DIR. Batches are drawn
from a generator seeded by the step number, like a deterministic data loader; dropout draws
from the global RNG, whose state the checkpoint carries.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch import nn

from famo import FAMOWeighting

TASKS = ["regression", "classification", "scale"]


def build() -> tuple[nn.Module, torch.optim.Optimizer, FAMOWeighting]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    famo = FAMOWeighting(TASKS, min_losses=[0.0, 0.0, -1.0])
    return model, optimizer, famo


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(64, 8, generator=generator)
    y_reg = x[:, :2].sum(dim=1, keepdim=True) * 3.0
    y_cls = (x[:, 2] > 0).long()
    y_scale = x[:, 3:4] * 100.0
    return x, y_reg, y_cls, y_scale


def task_losses(model: nn.Module, step: int) -> dict[str, torch.Tensor]:
    x, y_reg, y_cls, y_scale = batch(step)
    out = model(x)
    return {
        "regression": nn.functional.mse_loss(out[:, :1], y_reg),
        "classification": nn.functional.cross_entropy(out[:, 1:3], y_cls),
        # can go below zero: a bounded loss whose minimum is −1
        "scale": nn.functional.l1_loss(out[:, 3:], y_scale) / 100.0 - 1.0 + 1e-3,
    }


def save_atomically(payload: dict[str, object], path: Path) -> None:
    temporary = path.with_suffix(".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--save-every", type=int, default=5)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--slow-after", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # bit-identical results do not depend on the thread count

    model, optimizer, famo = build()
    checkpoint_path = args.dir / "checkpoint.pt"
    start = 0
    if args.resume:
        checkpoint = torch.load(checkpoint_path, weights_only=True)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        famo.load_state_dict(checkpoint["famo"])
        torch.set_rng_state(checkpoint["rng"])
        start = int(checkpoint["step"])
        print(f"resumed {start}", flush=True)

    slow = False
    for step in range(start, args.steps):
        model.train()
        optimizer.zero_grad()
        famo.backward(task_losses(model, step))
        optimizer.step()
        with torch.no_grad():
            famo.update(task_losses(model, step))
        done = step + 1
        if done % args.save_every == 0:
            payload = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "famo": famo.state_dict(),
                "rng": torch.get_rng_state(),
                "step": done,
            }
            save_atomically(payload, checkpoint_path)
            print(f"saved {done}", flush=True)
            slow = slow or (args.slow_after is not None and done >= args.slow_after)
        if slow:
            time.sleep(0.02)

    final = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    final["famo"] = famo.state_dict()
    torch.save(final, args.dir / "final.pt")
    print("finished", flush=True)


if __name__ == "__main__":
    main()
