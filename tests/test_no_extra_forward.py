"""``extra_forward=False``: a loop of only ``backward`` calls equals the hand-written loop that
calls ``update`` with each batch's losses before its ``loss`` (ℓ(θₜ₊₁; Bₜ₊₁) for ℓ(θₜ₊₁; Bₜ))."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from famo import FAMOWeighting
from tests.helpers import K, make_model, task_losses


def data(steps: int) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(3)
    scale = torch.tensor([1.0, 4.0, 30.0], dtype=torch.float64)
    return [
        (
            torch.randn(8, 4, generator=generator, dtype=torch.float64),
            torch.randn(8, K, generator=generator, dtype=torch.float64) * scale,
        )
        for _ in range(steps)
    ]


@pytest.mark.parametrize("form", ["backward", "loss"])
def test_only_backward_equals_update_by_hand_before_each_loss(form: str) -> None:
    automatic_model, by_hand_model = make_model(), make_model()
    automatic = FAMOWeighting(K, gamma=0.01, extra_forward=False).double()
    by_hand = FAMOWeighting(K, gamma=0.01).double()
    automatic_optimizer = torch.optim.SGD(automatic_model.parameters(), lr=0.05)
    by_hand_optimizer = torch.optim.SGD(by_hand_model.parameters(), lr=0.05)
    for step, (x, y) in enumerate(data(8)):
        automatic_optimizer.zero_grad()
        if form == "backward":
            automatic.backward(task_losses(automatic_model, x, y))
        else:
            automatic.loss(task_losses(automatic_model, x, y)).backward()
        automatic_optimizer.step()

        by_hand_optimizer.zero_grad()
        losses = task_losses(by_hand_model, x, y)
        if step > 0:
            by_hand.update(losses.detach())  # this batch's losses close the previous step
        by_hand.backward(losses)
        by_hand_optimizer.step()

        for a, b in zip(automatic_model.parameters(), by_hand_model.parameters(), strict=True):
            assert torch.equal(a, b)
        for name in ("logits", "exp_avg", "exp_avg_sq", "steps", "pending_sum", "pending_count"):
            assert torch.equal(getattr(automatic, name), getattr(by_hand, name)), name
    assert automatic.steps.tolist() == [7.0] * K  # the last step waits for the next batch
    assert automatic.logits.abs().min() > 1e-3


def test_the_first_call_only_records() -> None:
    famo = FAMOWeighting(2, extra_forward=False)
    famo.backward(torch.tensor([1.0, 2.0], requires_grad=True))
    assert torch.equal(famo.logits, torch.zeros(2))
    assert famo.pending_count.tolist() == [1.0, 1.0]
    famo.backward(torch.tensor([0.5, 1.9], requires_grad=True))
    assert famo.steps.tolist() == [1.0, 1.0]
    assert famo.logits[0] < 0 < famo.logits[1]  # task 0 improved more, so it lost weight


def test_update_is_refused_with_a_message_that_says_why() -> None:
    famo = FAMOWeighting(2, extra_forward=False)
    famo.backward(torch.tensor([1.0, 2.0], requires_grad=True))
    with pytest.raises(RuntimeError, match="extra_forward=False"):
        famo.update([0.5, 1.0])
