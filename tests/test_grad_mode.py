"""Evaluation is decided by grad mode, the way autograd decides it, not by the module's mode.

A loop whose model is in eval mode (fine-tuning with frozen BatchNorm or no dropout, a loop that
forgot ``model.train()`` after validation) learns exactly as in train mode, with
``backward``/``update``, ``loss``/``update`` and attached with ``extra_forward=False``. Under
``torch.no_grad()``, ``torch.inference_mode()`` or ``set_grad_enabled(False)``, ``loss``
records nothing, moves nothing (no logit step, even attached after a real optimizer step) and
returns the weighted objective, in train mode and in eval mode; ``enable_grad()`` inside
``no_grad()`` records again. Beyond the named cases: ``update`` under ``inference_mode`` equals
``update`` under ``no_grad``, a model that ``from_pretrained`` returned in eval mode trains as
it would in train mode, and Lightning's ``trainer.validate`` mid-training (eval mode and
inference mode) leaves FAMO's state alone.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from famo import FAMOWeighting

F64 = torch.float64
TASKS = 3


class MultiTask(nn.Module):
    def __init__(self, **famo: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, TASKS)).double()
        self.famo = FAMOWeighting(TASKS, dtype=F64, **famo)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return ((self.net(x) - y) ** 2).mean(dim=0) + 0.1


def make_data(count: int) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(1)
    scale = torch.tensor([1.0, 10.0, 100.0], dtype=F64)
    return [
        (
            torch.randn(8, 4, generator=generator, dtype=F64),
            torch.randn(8, TASKS, generator=generator, dtype=F64) * scale,
        )
        for _ in range(count)
    ]


DATA = make_data(5)


def train(model: MultiTask, how: str) -> None:
    famo = model.famo
    optimizer = torch.optim.SGD(model.net.parameters(), lr=0.01)
    if how == "attached":
        famo.attach(optimizer)
    for x, y in DATA:
        optimizer.zero_grad()
        if how == "backward":
            famo.backward(model(x, y))
        else:
            famo.loss(model(x, y)).backward()
        optimizer.step()
        if how != "attached":
            with torch.no_grad():
                famo.update(model(x, y))


def assert_same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key, value in sa.items():
        assert torch.equal(value, sb[key]), key


@pytest.mark.parametrize("how", ["backward", "loss", "attached"])
def test_training_in_eval_mode_learns_exactly_as_in_train_mode(how: str) -> None:
    extra_forward = how != "attached"
    in_train_mode = MultiTask(extra_forward=extra_forward).train()
    in_eval_mode = MultiTask(extra_forward=extra_forward).eval()  # FAMO too: a submodule
    assert not in_eval_mode.famo.training
    train(in_train_mode, how)
    train(in_eval_mode, how)
    learned = len(DATA) if extra_forward else len(DATA) - 1
    assert in_train_mode.famo.steps.tolist() == [float(learned)] * TASKS
    assert in_eval_mode.famo.steps.tolist() == [float(learned)] * TASKS
    assert_same(in_eval_mode, in_train_mode)


NO_GRAD: dict[str, Callable[[], AbstractContextManager[Any]]] = {
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
    "set_grad_enabled": lambda: torch.set_grad_enabled(False),
}


@pytest.mark.parametrize("module_mode", ["train", "eval"])
@pytest.mark.parametrize("context", sorted(NO_GRAD))
@pytest.mark.parametrize("extra_forward", [True, False])
def test_without_grad_loss_records_nothing_and_moves_nothing(
    extra_forward: bool, context: str, module_mode: str
) -> None:
    model = MultiTask(extra_forward=extra_forward)
    famo = model.famo
    optimizer = torch.optim.SGD(model.net.parameters(), lr=0.01)
    if not extra_forward:
        famo.attach(optimizer)
    x, y = DATA[0]
    optimizer.zero_grad()
    famo.loss(model(x, y)).backward()
    optimizer.step()  # attached: the next recording call would take a logit step
    assert famo.pending
    getattr(model, module_mode)()
    before = {key: value.clone() for key, value in famo.state_dict().items()}
    weights = famo.weights
    validation = model(*DATA[1]).detach()
    with NO_GRAD[context]():
        value = famo.loss(validation)
    for key, tensor in famo.state_dict().items():
        assert torch.equal(tensor, before[key]), key
    shifted = validation + famo.eps
    w = (weights / shifted) / (weights / shifted).sum()
    assert value.item() == pytest.approx(float(w @ validation), rel=1e-12)
    # Grad mode decides: enable_grad() inside no_grad() records (and, attached, learns).
    with torch.no_grad(), torch.enable_grad():
        famo.loss(model(*DATA[1]))
    recorded = famo.state_dict()
    assert any(not torch.equal(recorded[key], before[key]) for key in before)


def test_update_under_inference_mode_equals_update_under_no_grad() -> None:
    models = [MultiTask(), MultiTask()]
    for model, context in zip(models, (torch.no_grad, torch.inference_mode), strict=True):
        optimizer = torch.optim.SGD(model.net.parameters(), lr=0.01)
        for x, y in DATA[:3]:
            optimizer.zero_grad()
            model.famo.backward(model(x, y))
            optimizer.step()
            with context():
                model.famo.update(model(x, y))  # inference tensors under inference_mode
    assert_same(models[1], models[0])
    assert models[0].famo.steps.tolist() == [3.0] * TASKS


def test_a_model_from_pretrained_trains_in_the_eval_mode_it_comes_in(tmp_path: Any) -> None:
    # from_pretrained returns the model in eval mode; a loop that trains it without .train()
    # learns what the same loop learns in train mode.
    from tests.test_module_contract import gpt2_with_famo, lm_steps, tiny_gpt2

    cls = gpt2_with_famo()
    tiny_gpt2(cls).save_pretrained(tmp_path)
    as_loaded, trained = cls.from_pretrained(tmp_path), cls.from_pretrained(tmp_path).train()
    assert not as_loaded.training and not as_loaded.famo.training
    for model in (as_loaded, trained):
        lm_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), range(2))
    assert as_loaded.famo.steps.tolist() == [2.0] * 3
    assert_same(as_loaded, trained)


# Raised inside Lightning 2.6 on torch >= 2.10 and about Lightning's own data loading.
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning")
@pytest.mark.filterwarnings("ignore:The '\\w+_dataloader' does not have many workers")
@pytest.mark.filterwarnings("ignore:The number of training batches")
def test_lightning_validation_mid_training_leaves_famo_alone() -> None:
    pl = pytest.importorskip("pytorch_lightning")
    from famo.lightning import FAMOCallback

    class Module(pl.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.model = MultiTask()
            self.famo = self.model.famo

        def task_losses(self, batch: tuple[Tensor, Tensor]) -> Tensor:
            return self.model(*batch)

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            return self.famo.loss(self.task_losses(batch))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.model.net.parameters(), lr=0.01)

    class Validating(Module):
        def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            return self.famo.loss(self.task_losses(batch))  # under eval and inference mode

    def fit(validate_every: int | None) -> Any:
        module = Validating() if validate_every else Module()
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(
                torch.stack([x for x, _ in DATA]).flatten(0, 1),
                torch.stack([y for _, y in DATA]).flatten(0, 1),
            ),
            batch_size=8,
        )
        options = {"val_check_interval": validate_every} if validate_every else {}
        pl.Trainer(
            max_steps=len(DATA),
            callbacks=[FAMOCallback()],
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=2 if validate_every else 0,
            **options,
        ).fit(module, loader, loader if validate_every else None)
        return module

    assert_same(fit(validate_every=2), fit(validate_every=None))
