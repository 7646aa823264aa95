"""Small shared pieces of the tests: driving a FAMOWeighting, snapshotting its state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from famo import FAMOWeighting

#: The checkpoint keys of layout 3, written out here so that the tests pin the layout on their own
#: (famo/_layout.py declares it): all of them registered buffers.
LAYOUT_3 = {
    "logits",
    "exp_avg",
    "exp_avg_sq",
    "adam_step",
    "lower_bounds",
    "window_sum",
    "window_count",
    "window_stepped",
    "warmup_count",
    "block_count",
    "block_sum",
    "block_tasks",
    "task_names_utf8",
    "format_version",
}


def loss_weights(famo: FAMOWeighting, losses: Sequence[float]) -> Tensor:
    """Call ``famo.backward`` on leaf losses and return ∂L/∂ℓ (the weights w)."""
    leaf = torch.tensor(list(losses), dtype=famo.logits.dtype, requires_grad=True)
    famo.backward(leaf)
    assert leaf.grad is not None
    return leaf.grad


def snapshot(famo: FAMOWeighting) -> dict[str, Any]:
    """A deep copy of everything ``state_dict`` holds."""
    return {
        key: value.clone() if isinstance(value, Tensor) else dict(value)
        for key, value in famo.state_dict().items()
    }


def assert_same_state(famo: FAMOWeighting, before: dict[str, Any]) -> None:
    after = famo.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        if isinstance(value, Tensor):
            assert torch.equal(after[key], value), key
        else:
            assert after[key] == value, key


def assert_same_trajectory(
    first: FAMOWeighting, second: FAMOWeighting, steps: list[tuple[list[float], list[float]]]
) -> None:
    """Both objects take the same steps, bit for bit: the weights on the losses, then their whole
    state, their weights and their bounds after each update."""
    assert_same_state(first, snapshot(second))
    for before, after in steps:
        assert torch.equal(loss_weights(first, before), loss_weights(second, before))
        first.update(after)
        second.update(after)
        assert_same_state(first, snapshot(second))
        assert torch.equal(first.weights, second.weights)
        assert torch.equal(first.min_losses, second.min_losses)


# A small float64 three-task model for the training-loop tests (accumulation, no extra forward).
K = 3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, K)).double()


def task_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return ((model(x) - y) ** 2).mean(dim=0) + 0.1
