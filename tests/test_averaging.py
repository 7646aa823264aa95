"""Averaging tools and FAMO's state: copied, never averaged.

``AveragedModel(use_buffers=True)`` (SWA and EMA), and Lightning's ``WeightAveraging`` (which
uses it and, at the end of training, copies the averages into the live module through
``.data``), average every buffer of a model. FAMO's state is its optimizer's: an average of
states taken at different steps (a step count of 18.5) is no state FAMO could be in. So famo
keeps its own: the live object trains on as if nothing had been averaged, and the averaged copy
holds a whole FAMO state (its own, from when it was made), which takes a next step and loads.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from famo import FAMOWeighting
from tests.helpers import K, assert_same_state, make_model, snapshot, task_losses

TASKS = ["a", "b", "c"]


class Holder(nn.Module):
    def __init__(self, extra_forward: bool = True) -> None:
        super().__init__()
        self.net = make_model()
        self.famo = FAMOWeighting(TASKS, dtype=torch.float64, extra_forward=extra_forward)


def batches(count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(8, 4, generator=generator, dtype=torch.float64),
            torch.randn(8, K, generator=generator, dtype=torch.float64),
        )
        for _ in range(count)
    ]


def train(
    model: Holder, optimizer: torch.optim.Optimizer, data: list[Any], hook: Any = None
) -> None:
    for x, y in data:
        optimizer.zero_grad()
        model.famo.backward(task_losses(model.net, x, y))
        optimizer.step()
        if model.famo.extra_forward:
            with torch.no_grad():
                model.famo.update(task_losses(model.net, x, y))
        if hook is not None:
            hook()


def next_step_and_checkpoint(famo: FAMOWeighting) -> None:
    """What must work after any averaging: a next step, and a checkpoint that loads."""
    famo.backward(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True))
    if famo.extra_forward:
        famo.update(torch.tensor([0.9, 1.9, 2.9], dtype=torch.float64))
    fresh = FAMOWeighting(TASKS, dtype=torch.float64, extra_forward=famo.extra_forward)
    fresh.load_state_dict(famo.state_dict())
    assert_same_state(fresh, famo.state_dict())
    assert float(fresh.steps[0]) == float(fresh.steps[0].round())


AVERAGING = {
    "swa": {},
    "ema": {"multi_avg_fn": get_ema_multi_avg_fn(0.9)},
}


@pytest.mark.parametrize("extra_forward", [True, False])
@pytest.mark.parametrize("rule", list(AVERAGING))
def test_an_averaged_model_keeps_famo_whole_and_the_live_one_trains_as_without_it(
    rule: str, extra_forward: bool
) -> None:
    data = batches(6)
    model, twin = Holder(extra_forward), Holder(extra_forward)
    optimizer = torch.optim.SGD(model.net.parameters(), lr=0.05)
    twin_optimizer = torch.optim.SGD(twin.net.parameters(), lr=0.05)
    train(model, optimizer, data[:1])
    copied = snapshot(model.famo)
    averaged = AveragedModel(model, use_buffers=True, **AVERAGING[rule])
    train(model, optimizer, data[1:], hook=lambda: averaged.update_parameters(model))
    train(twin, twin_optimizer, data)
    assert_same_state(model.famo, snapshot(twin.famo))  # the live FAMO: as without averaging
    # The averaged copy's FAMO: a whole state (its own, from when the copy was made).
    assert_same_state(averaged.module.famo, copied)
    next_step_and_checkpoint(averaged.module.famo)
    next_step_and_checkpoint(model.famo)


@pytest.mark.parametrize("through", ["copy_", ".data"])
def test_an_average_copied_into_the_live_model_leaves_famo_as_it_was(through: str) -> None:
    # What Lightning's WeightAveraging does at the end of training (through `.data`, which moves
    # no version counter), and what a hand-written "load the EMA weights" loop does (copy_).
    data = batches(6)
    model, twin = Holder(), Holder()
    optimizer = torch.optim.SGD(model.net.parameters(), lr=0.05)
    twin_optimizer = torch.optim.SGD(twin.net.parameters(), lr=0.05)
    averaged = AveragedModel(model, use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(0.5))
    train(model, optimizer, data[:4], hook=lambda: averaged.update_parameters(model))
    average = {key: value.clone() for key, value in averaged.module.famo.named_buffers()}
    assert not torch.equal(average["adam_step"], average["adam_step"].round())  # an average
    with torch.no_grad():
        for key, value in model.famo.named_buffers():
            target = value.data if through == ".data" else value
            target.copy_(average[key])
    train(twin, twin_optimizer, data[:4])
    assert_same_state(model.famo, snapshot(twin.famo))  # famo kept its own state
    train(model, optimizer, data[4:])
    train(twin, twin_optimizer, data[4:])
    assert_same_state(model.famo, snapshot(twin.famo))
    next_step_and_checkpoint(model.famo)


def test_a_hand_made_deepcopy_ema_keeps_famo_whole() -> None:
    # The common EMA loop: a deepcopy whose every floating tensor follows with lerp_.
    data = batches(5)
    model, twin = Holder(), Holder()
    optimizer = torch.optim.SGD(model.net.parameters(), lr=0.05)
    twin_optimizer = torch.optim.SGD(twin.net.parameters(), lr=0.05)
    ema = copy.deepcopy(model)
    copied = snapshot(ema.famo)

    def follow() -> None:
        with torch.no_grad():
            for mine, theirs in zip(
                ema.state_dict(keep_vars=True).values(),
                model.state_dict(keep_vars=True).values(),
                strict=True,
            ):
                if mine.is_floating_point():
                    mine.lerp_(theirs, 0.1)

    train(model, optimizer, data, hook=follow)
    train(twin, twin_optimizer, data)
    assert_same_state(model.famo, snapshot(twin.famo))
    assert_same_state(ema.famo, copied)  # its own state, from when the copy was made
    next_step_and_checkpoint(ema.famo)
    next_step_and_checkpoint(model.famo)


@pytest.mark.filterwarnings(
    "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning"
)
def test_lightning_weight_averaging_leaves_famo_as_it_would_be_without_it() -> None:
    pl = pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.callbacks import WeightAveraging

    from famo.lightning import FAMOCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()
            self.famo = FAMOWeighting(TASKS, dtype=torch.float64)

        def task_losses(self, batch: Any) -> torch.Tensor:
            return task_losses(self.net, *batch)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.famo.loss(self.task_losses(batch))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.net.parameters(), lr=0.05)

    def fit(callbacks: list[Any]) -> Module:
        module = Module()
        trainer = pl.Trainer(
            max_epochs=3,
            callbacks=[FAMOCallback(log_weights=False), *callbacks],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
        )
        trainer.fit(module, torch.utils.data.DataLoader(batches(4), batch_size=None))
        return module

    averaged = fit([WeightAveraging()])
    plain = fit([])
    assert averaged.famo.steps.tolist() == [12.0] * K
    assert_same_state(averaged.famo, snapshot(plain.famo))
    next_step_and_checkpoint(averaged.famo)
