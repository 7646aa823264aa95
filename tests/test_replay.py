"""A ``loss`` call that autograd makes again during backward records once per step, not twice.

Activation checkpointing around the loss (``torch.utils.checkpoint.checkpoint``) runs the
function again during backward to rebuild its graph. With ``use_reentrant=False`` the forward
records and the replay must not; with ``use_reentrant=True`` the forward runs under
``no_grad`` (records nothing) and the replay records. Either way the logits take the steps, and
reach the values, of the same loop without checkpointing: unattached and attached with
``extra_forward=False`` (two logit steps after three optimizer steps, not five), and with
``extra_forward=True`` and ``update``. Beyond the named cases: checkpoint regions nested in each
other, two backward passes through one checkpointed graph (``retain_graph=True``, one replay
each), and ``torch.autograd.grad`` instead of ``backward``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from famo import FAMOWeighting

F64 = torch.float64
TASKS = 3
STEPS = 3


class Model(nn.Module):
    """A shared body and the task heads; the heads and the loss run inside the checkpoint."""

    def __init__(self, extra_forward: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh()).double()
        self.heads = nn.Linear(8, TASKS).double()
        self.famo = FAMOWeighting(TASKS, dtype=F64, extra_forward=extra_forward)

    def task_losses(self, features: Tensor, y: Tensor) -> Tensor:
        return ((self.heads(features) - y) ** 2).mean(dim=0) + 0.1

    def objective(self, features: Tensor, y: Tensor) -> Tensor:
        return self.famo.loss(self.task_losses(features, y))


def make_data() -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(1)
    scale = torch.tensor([1.0, 10.0, 100.0], dtype=F64)
    return [
        (
            torch.randn(8, 4, generator=generator, dtype=F64),
            torch.randn(8, TASKS, generator=generator, dtype=F64) * scale,
        )
        for _ in range(STEPS)
    ]


DATA = make_data()

Region = Callable[[Model, Tensor, Tensor], Tensor]


def plain(model: Model, features: Tensor, y: Tensor) -> Tensor:
    return model.objective(features, y)


def non_reentrant(model: Model, features: Tensor, y: Tensor) -> Tensor:
    return checkpoint(model.objective, features, y, use_reentrant=False)  # type: ignore[no-any-return]


def reentrant(model: Model, features: Tensor, y: Tensor) -> Tensor:
    return checkpoint(model.objective, features, y, use_reentrant=True)  # type: ignore[no-any-return]


def nested(model: Model, features: Tensor, y: Tensor) -> Tensor:
    def outer(features: Tensor, y: Tensor) -> Tensor:
        hidden = features * 1.0
        return checkpoint(model.objective, hidden, y, use_reentrant=False)  # type: ignore[no-any-return]

    return checkpoint(outer, features, y, use_reentrant=False)  # type: ignore[no-any-return]


def train(mode: str, region: Region, backward: str = "backward") -> Model:
    """Three optimizer steps; ``mode``: "unattached", "attached" (both extra_forward=False) or
    "update" (extra_forward=True, update after each step)."""
    model = Model(extra_forward=mode == "update")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    if mode == "attached":
        model.famo.attach(optimizer)
    for x, y in DATA:
        optimizer.zero_grad()
        value = region(model, model.body(x), y)
        if backward == "twice":  # two backward passes through one graph: gradients doubled
            value.backward(retain_graph=True)
            value.backward()
        elif backward == "grad":
            parameters = list(model.body.parameters()) + list(model.heads.parameters())
            grads = torch.autograd.grad(value, parameters)
            for parameter, grad in zip(parameters, grads, strict=True):
                parameter.grad = grad
        else:
            value.backward()
        optimizer.step()
        if mode == "update":
            with torch.no_grad():
                model.famo.update(model.task_losses(model.body(x), y))
    return model


def assert_same(a: Model, b: Model) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key, value in sa.items():
        assert torch.equal(value, sb[key]), key


MODES = ["unattached", "attached", "update"]


@pytest.mark.parametrize("region", [non_reentrant, reentrant], ids=lambda f: f.__name__)
@pytest.mark.parametrize("mode", MODES)
def test_a_checkpointed_loss_records_once_per_step(mode: str, region: Region) -> None:
    expected = train(mode, plain)
    checkpointed = train(mode, region)
    learned = STEPS if mode == "update" else STEPS - 1  # 2 after three steps, not 5
    assert expected.famo.steps.tolist() == [float(learned)] * TASKS
    assert checkpointed.famo.steps.tolist() == [float(learned)] * TASKS
    assert_same(checkpointed, expected)
    assert expected.famo.logits.abs().min() > 1e-4


@pytest.mark.parametrize(
    ("region", "backward"),
    [(nested, "backward"), (non_reentrant, "twice"), (non_reentrant, "grad")],
    ids=["nested", "retain_graph", "autograd_grad"],
)
@pytest.mark.parametrize("mode", MODES)
def test_other_replays_record_nothing_either(mode: str, region: Region, backward: str) -> None:
    expected = train(mode, plain, backward)
    checkpointed = train(mode, region, backward)
    assert_same(checkpointed, expected)


def test_the_replay_sees_the_weights_the_forward_used() -> None:
    # Attached, the forward takes the logit step before weighting; the replay must neither
    # step again nor weight with other logits: the gradients equal those without checkpointing.
    grads: list[list[Tensor]] = []
    for region in (plain, non_reentrant, reentrant):
        model = Model(extra_forward=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        model.famo.attach(optimizer)
        found: list[Any] = []
        for x, y in DATA:
            optimizer.zero_grad()
            region(model, model.body(x), y).backward()
            found.append([p.grad.clone() for p in model.heads.parameters()])  # type: ignore[union-attr]
            optimizer.step()
        grads.append(found)
    for other in grads[1:]:
        for step, (a, b) in enumerate(zip(other, grads[0], strict=True)):
            for ga, gb in zip(a, b, strict=True):
                assert torch.equal(ga, gb), step
