"""`loss_weights`: the weights applied to each loss at the last recording call, first-class.

They are what multiplies each loss's gradient: the gradient of `loss(losses)` with respect to
the losses, and `functional.loss_weights` of the logits the call used.
"""

from __future__ import annotations

import torch

from famo import FAMOWeighting, functional


def test_they_are_the_gradient_that_each_loss_received() -> None:
    famo = FAMOWeighting(3, dtype=torch.float64)
    for before, after in [([1.0, 10.0, 100.0], [0.9, 9.0, 99.0]), ([0.8, 8.0, 98.0], None)]:
        losses = torch.tensor(before, dtype=torch.float64, requires_grad=True)
        logits = famo.logits.clone()
        famo.backward(losses)
        assert famo.loss_weights is not None
        assert torch.equal(famo.loss_weights, losses.grad)
        assert torch.equal(famo.loss_weights, functional.loss_weights(logits, losses.detach()))
        if after is not None:
            famo.update(torch.tensor(after, dtype=torch.float64))
    # The smallest loss gets the largest weight on its gradient; z does not say so.
    assert famo.loss_weights.argmax().item() == 0


def test_evaluation_calls_leave_them_and_the_first_recording_call_sets_them() -> None:
    famo = FAMOWeighting(["a", "b"])
    assert famo.loss_weights is None and famo.loss_weights_dict() == {}
    with torch.no_grad():
        famo.loss(torch.tensor([1.0, 3.0]))
    assert famo.loss_weights is None
    famo.loss(torch.tensor([1.0, 3.0], requires_grad=True))
    recorded = famo.loss_weights
    with torch.no_grad():
        famo.loss(torch.tensor([5.0, 1.0]))
    assert famo.loss_weights is recorded
    assert set(famo.loss_weights_dict()) == {"famo/loss_weight/a", "famo/loss_weight/b"}


def test_without_the_extra_forward_they_use_the_logits_after_the_step_the_call_took() -> None:
    famo = FAMOWeighting(2, extra_forward=False, gamma=0.0)
    famo.backward(torch.tensor([1.0, 1.0], requires_grad=True))
    losses = torch.tensor([0.5, 0.9], requires_grad=True)
    famo.backward(losses)  # learns from (1, 1) -> (0.5, 0.9) first, then weights these losses
    assert famo.steps.tolist() == [1.0, 1.0]
    assert torch.equal(famo.loss_weights, losses.grad)
    assert torch.equal(famo.loss_weights, functional.loss_weights(famo.logits, losses.detach()))


def test_a_missing_task_gets_weight_zero() -> None:
    famo = FAMOWeighting(["a", "b", "c"], allow_missing_tasks=True)
    famo.loss(
        {"a": torch.tensor(1.0, requires_grad=True), "c": torch.tensor(3.0, requires_grad=True)}
    )
    weights = famo.loss_weights
    assert weights is not None and weights[1].item() == 0.0
    assert torch.allclose(weights.sum(), torch.tensor(1.0))
