"""Gradient accumulation: several ``loss`` calls, one optimizer step, one ``update``.

The recorded "before" losses are the mean over the window's micro-batches (never the last one
only), and ``update`` takes the after-losses the same way: a (micro_batches, k) tensor whose rows
are averaged. The objective is divided by the window length, as for any accumulated loss.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from famo import FAMOWeighting
from tests.helpers import K, make_model, task_losses


def batches(count: int, size: int = 8, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 4, generator=generator, dtype=torch.float64),
            torch.randn(size, K, generator=generator, dtype=torch.float64)
            * torch.tensor([1, 5, 20]),
        )
        for _ in range(count)
    ]


def accumulated_step(
    model: nn.Module,
    famo: FAMOWeighting,
    optimizer: torch.optim.Optimizer,
    window: list[tuple[Tensor, Tensor]],
) -> None:
    """The README's recipe: one step over the micro-batches of ``window``."""
    optimizer.zero_grad()
    for x, y in window:
        (famo.loss(task_losses(model, x, y)) / len(window)).backward()
    optimizer.step()
    with torch.no_grad():
        famo.update(torch.stack([task_losses(model, x, y) for x, y in window]))


def test_identical_micro_batches_equal_one_batch() -> None:
    one, accumulated = make_model(), make_model()
    famo_one, famo_accumulated = FAMOWeighting(K).double(), FAMOWeighting(K).double()
    optimizer_one = torch.optim.SGD(one.parameters(), lr=0.05)
    optimizer_accumulated = torch.optim.SGD(accumulated.parameters(), lr=0.05)
    for batch in batches(4):
        accumulated_step(one, famo_one, optimizer_one, [batch])
        accumulated_step(accumulated, famo_accumulated, optimizer_accumulated, [batch] * 3)
    # n · (g / n) and (ℓ + ℓ + ℓ) / 3 round differently from g and ℓ in the last bits only.
    for a, b in zip(one.parameters(), accumulated.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    for name in ("logits", "exp_avg", "exp_avg_sq", "steps"):
        torch.testing.assert_close(
            getattr(famo_one, name), getattr(famo_accumulated, name), rtol=1e-11, atol=1e-15
        )
    assert famo_one.logits.abs().min() > 1e-3  # the logits did move


def test_a_window_records_the_mean_of_its_micro_batches() -> None:
    before = torch.tensor([[1.0, 2.0, 3.0], [0.5, 4.0, 3.5], [1.5, 1.0, 2.0]], dtype=torch.float64)
    after = torch.tensor([[0.9, 1.9, 2.5], [0.45, 3.0, 3.4], [1.2, 0.9, 1.9]], dtype=torch.float64)
    accumulated = FAMOWeighting(K, gamma=0.01, min_losses=[0.0, 0.5, -1.0]).double()
    for row in before:
        accumulated.loss(row.clone().requires_grad_())
    assert torch.equal(accumulated.pending_count, torch.full((K,), 3.0, dtype=torch.float64))
    accumulated.update(after)

    mean = FAMOWeighting(K, gamma=0.01, min_losses=[0.0, 0.5, -1.0]).double()
    mean.loss(before.sum(dim=0).div(3).requires_grad_())
    mean.update(after.mean(dim=0))
    last_only = FAMOWeighting(K, gamma=0.01, min_losses=[0.0, 0.5, -1.0]).double()
    last_only.loss(before[-1].clone().requires_grad_())
    last_only.update(after[-1])

    for name in ("logits", "exp_avg", "exp_avg_sq"):
        expected = getattr(mean, name)
        torch.testing.assert_close(getattr(accumulated, name), expected, rtol=1e-12, atol=1e-15)
    # A first Adam step moves every logit by about ±lr; the moments show what was learned.
    assert (accumulated.exp_avg - last_only.exp_avg).abs().max() > 1e-4


def test_update_averages_the_rows_of_the_after_losses() -> None:
    rows = torch.tensor([[0.9, 1.9, 2.5], [0.45, 3.0, 3.4]], dtype=torch.float64)
    from_rows, from_mean = FAMOWeighting(K).double(), FAMOWeighting(K).double()
    for famo in (from_rows, from_mean):
        famo.loss(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True))
    from_rows.update(rows)
    from_mean.update(rows.mean(dim=0))
    assert torch.equal(from_rows.logits, from_mean.logits)
    assert torch.equal(from_rows.exp_avg, from_mean.exp_avg)


def test_every_micro_batch_is_weighted_with_the_same_logits() -> None:
    # Within a window the logits do not move: each micro-batch's gradient is the convex
    # combination w that a fresh object with the same state gives for its own losses.
    famo = FAMOWeighting(K).double()
    famo.loss(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True))
    famo.update([0.5, 1.9, 2.9])
    reference = copy.deepcopy(famo)
    for row in ([1.0, 1.0, 1.0], [0.3, 2.0, 5.0], [2.0, 0.2, 1.0]):
        losses = torch.tensor(row, dtype=torch.float64, requires_grad=True)
        famo.loss(losses).backward()
        expected = torch.tensor(row, dtype=torch.float64, requires_grad=True)
        copy.deepcopy(reference).loss(expected).backward()
        assert losses.grad is not None and expected.grad is not None
        assert torch.equal(losses.grad, expected.grad)
    assert torch.equal(famo.logits, reference.logits)


def test_a_task_missing_from_some_micro_batches_averages_where_present() -> None:
    famo = FAMOWeighting(["a", "b"], allow_missing_tasks=True).double()
    f64 = {"dtype": torch.float64, "requires_grad": True}
    famo.loss({"a": torch.tensor(1.0, **f64), "b": torch.tensor(4.0, **f64)})
    famo.loss({"a": torch.tensor(3.0, **f64)})
    assert famo.pending_count.tolist() == [2.0, 1.0]
    mean = FAMOWeighting(["a", "b"], allow_missing_tasks=True).double()
    mean.loss({"a": torch.tensor(2.0, **f64), "b": torch.tensor(4.0, **f64)})
    famo.update({"a": 1.5, "b": 3.0})
    mean.update({"a": 1.5, "b": 3.0})
    assert torch.equal(famo.logits, mean.logits)
