"""Lightning: a batch that ``training_step`` skips by returning ``None`` is left out of FAMO's
window, with and without the extra forward, with ``accumulate_grad_batches=2``.

Returning ``None`` is Lightning's documented way to skip a batch (here: a non-finite loss, as
the README advises). Lightning 2.6, automatic optimization, 32-bit: a skipped batch is not
backpropagated, but the optimizer still steps at the window's boundary (with what the window's
other batch accumulated, also when the boundary batch itself was skipped), and the hooks run as
usual (``on_before_optimizer_step``; ``on_train_batch_end`` with ``outputs={}``). The callback
used to recompute the skipped batch's losses for ``update`` and crash. A run equals the plain
loop that skips the same batches: the first or the last batch of a window, and (beyond the named
case) a whole window, where the optimizer steps on zero gradients and FAMO has nothing to learn.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from famo import FAMOWeighting

pl = pytest.importorskip("pytorch_lightning")
from famo.lightning import FAMOCallback  # noqa: E402

pytestmark = [
    # Raised inside Lightning 2.6 on torch >= 2.10, about Lightning's own data loading, and
    # (deliberately here) about a training_step that returned None.
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning"),
    pytest.mark.filterwarnings("ignore:The '\\w+_dataloader' does not have many workers"),
    pytest.mark.filterwarnings("ignore:The number of training batches"),
    pytest.mark.filterwarnings("ignore:`training_step` returned `None`"),
]

TASKS = 3
BATCH = 8
BATCHES = 8
ACCUMULATE = 2


class SkipsNonFinite(pl.LightningModule):  # type: ignore[misc]
    def __init__(self, extra_forward: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, TASKS)).double()
        self.famo = FAMOWeighting(TASKS, extra_forward=extra_forward, dtype=torch.float64)

    def task_losses(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return ((self.net(x) - y) ** 2).mean(dim=0)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        losses = self.task_losses(batch)
        if not bool(torch.isfinite(losses).all()):
            return None  # skip this batch
        return self.famo.loss(losses)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.net.parameters(), lr=0.02, momentum=0.9)


def batches(bad: tuple[int, ...]) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(1)
    scale = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)
    data = []
    for index in range(BATCHES):
        x = torch.randn(BATCH, 4, generator=generator, dtype=torch.float64)
        y = torch.randn(BATCH, TASKS, generator=generator, dtype=torch.float64) * scale
        if index in bad:
            y[0, 1] = float("nan")
        data.append((x, y))
    return data


def fit(module: SkipsNonFinite, data: list[tuple[Tensor, Tensor]]) -> None:
    x = torch.cat([x for x, _ in data])
    y = torch.cat([y for _, y in data])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    pl.Trainer(
        max_epochs=1,
        accumulate_grad_batches=ACCUMULATE,
        callbacks=[FAMOCallback()],
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module, loader)


def plain_loop(module: SkipsNonFinite, data: list[tuple[Tensor, Tensor]]) -> None:
    """What the Trainer should do: skip the non-finite batches, step at every boundary, and
    learn (``update``) from the batches that were trained on."""
    famo = module.famo
    optimizer = module.configure_optimizers()
    if not famo.extra_forward:
        famo.attach(optimizer)
    for start in range(0, len(data), ACCUMULATE):
        optimizer.zero_grad()
        trained = []
        for batch in data[start : start + ACCUMULATE]:
            losses = module.task_losses(batch)
            if not bool(torch.isfinite(losses).all()):
                continue
            (famo.loss(losses) / ACCUMULATE).backward()
            trained.append(batch)
        optimizer.step()
        if famo.extra_forward and trained:
            with torch.no_grad():
                rows = [module.task_losses(batch) for batch in trained]
            famo.update(rows[0] if len(rows) == 1 else torch.stack(rows))


@pytest.mark.parametrize("bad", [(2,), (3,), (2, 3)], ids=["first", "boundary", "window"])
@pytest.mark.parametrize("extra_forward", [True, False])
def test_a_batch_skipped_by_returning_none_is_left_out_of_the_window(
    extra_forward: bool, bad: tuple[int, ...]
) -> None:
    data = batches(bad)
    module = SkipsNonFinite(extra_forward)
    fit(module, data)
    expected = SkipsNonFinite(extra_forward)
    plain_loop(expected, data)
    windows = BATCHES // ACCUMULATE - (1 if len(bad) == ACCUMULATE else 0)  # with a recording
    learned = windows if extra_forward else windows - 1  # attached: the last window waits
    assert expected.famo.steps.tolist() == [float(learned)] * TASKS
    assert module.famo.steps.tolist() == [float(learned)] * TASKS
    # Lightning divides the loss by accumulate_grad_batches at another point: equal to rounding.
    for (name, a), b in zip(module.net.named_parameters(), expected.net.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)
    for key, value in expected.famo.state_dict().items():
        torch.testing.assert_close(
            module.famo.state_dict()[key], value, rtol=1e-10, atol=1e-14, msg=key
        )
    assert module.famo.logits.abs().min() > 1e-4


def test_the_skipped_batch_is_never_recomputed() -> None:
    class Counting(SkipsNonFinite):
        def __init__(self) -> None:
            super().__init__(extra_forward=True)
            self.after: list[bool] = []

        def task_losses(self, batch: tuple[Tensor, Tensor]) -> Tensor:
            if not torch.is_grad_enabled():  # the callback's after-step forward
                self.after.append(bool(torch.isfinite(batch[1]).all()))
            return super().task_losses(batch)

    module = Counting()
    fit(module, batches((3,)))
    assert module.after == [True] * (BATCHES - 1)  # every batch but the skipped one, once
