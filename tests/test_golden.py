"""Golden values computed with the official implementation, in float64, to 1e-12.

Where they come from and what they pin is written in ``docs/design.md`` ("Golden values").
"""

from __future__ import annotations

import pytest
import torch

from famo import FAMOWeighting, functional
from tests.helpers import assert_same_state, loss_weights, snapshot
from tests.reference import ReferenceFAMO

F64 = torch.float64
G3_BOUNDS = (0.0, 0.5, -1.0)
G3_PAIRS = [
    ((1.0, 2.0, 3.0), (0.9, 1.9, 2.5)),
    ((0.9, 1.9, 2.5), (0.7, 1.85, 2.4)),
    ((0.8, 1.8, 2.4), (0.75, 1.6, 2.0)),
    ((0.75, 1.6, 2.0), (0.5, 1.55, 1.9)),
    ((0.5, 1.5, 1.9), (0.45, 1.2, 1.85)),
]
G3_FIRST_WEIGHTS = (0.521739129319471, 0.347826087372401, 0.130434783308129)
G3_FINAL_LOGITS = (-0.077863848702504, 0.066784089799676, 0.027741553087081)


def assert_close(actual: torch.Tensor, expected: tuple[float, ...]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=F64), rtol=0, atol=1e-12)


def test_g1_objective_and_loss_gradient() -> None:
    famo = FAMOWeighting(2, dtype=F64)
    losses = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    objective = famo.loss(losses)
    objective.backward()
    assert losses.grad is not None
    assert_close(losses.grad, (0.666666665555555, 0.333333334444444))
    # `loss` returns Σ w ℓ (same gradient); the published value comes from the functional core.
    assert objective.item() == pytest.approx(float(losses.grad @ losses.detach()), abs=1e-15)
    published = functional.published_objective(famo.logits, losses.detach(), 0.0, famo.eps)
    assert published.item() == pytest.approx(0.4620981342241145, abs=1e-12)


def test_g2_first_update() -> None:
    famo = FAMOWeighting(2, lr=0.025, gamma=1e-3, dtype=F64)
    loss_weights(famo, (1.0, 2.0))
    famo.update(torch.tensor([0.5, 1.5], dtype=F64))
    assert_close(famo.logits, (-0.024999997533697, 0.024999997533697))


def test_g3_five_steps_with_bounds() -> None:
    famo = FAMOWeighting(3, gamma=0.01, min_losses=G3_BOUNDS, dtype=F64)
    for step, (before, after) in enumerate(G3_PAIRS):
        weights = loss_weights(famo, before)
        if step == 0:
            assert_close(weights, G3_FIRST_WEIGHTS)
        famo.update(list(after))
    assert_close(famo.logits, G3_FINAL_LOGITS)


def test_reference_reproduces_g3() -> None:
    """The tests' own reference must agree with the official code before it judges famo."""
    reference = ReferenceFAMO(3, gamma=0.01, min_losses=G3_BOUNDS)
    for step, (before, after) in enumerate(G3_PAIRS):
        weights = reference.loss_weights(before)
        if step == 0:
            assert_close(weights, G3_FIRST_WEIGHTS)
        reference.update(after)
    assert_close(reference.logits.detach(), G3_FINAL_LOGITS)


def test_g4_loss_below_its_bound_is_an_error_not_a_wrong_gradient() -> None:
    famo = FAMOWeighting(2, dtype=F64)
    before = snapshot(famo)
    losses = torch.tensor([-0.5, 1.0], dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="min_losses") as error:
        famo.backward(losses)
    assert "-0.5 for task 0" in str(error.value)
    assert losses.grad is None
    assert_same_state(famo, before)
