"""The functional core on its own: each function against autograd or ``torch.optim.Adam``.

``famo.functional`` holds the arithmetic of ``docs/design.md`` §1 as pure functions; here
each one is checked directly, without the bookkeeping of ``FAMOWeighting`` around it.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from famo import functional as F

F64 = torch.float64
vectors = st.integers(1, 12).flatmap(
    lambda k: st.lists(st.floats(-3.0, 3.0), min_size=k, max_size=k)
)


def _tensor(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


@given(vectors, st.data())
def test_the_logit_gradient_is_autograd_through_the_softmax(
    logits: list[float], data: st.DataObject
) -> None:
    delta = _tensor(
        data.draw(st.lists(st.floats(-2, 2), min_size=len(logits), max_size=len(logits)))
    )
    xi = _tensor(logits).requires_grad_()
    (expected,) = torch.autograd.grad(torch.softmax(xi, dim=0), xi, grad_outputs=delta)
    torch.testing.assert_close(F.logit_gradient(xi.detach(), delta), expected, rtol=0, atol=1e-14)


@given(vectors, st.floats(-5, 5))
def test_shifting_the_improvements_leaves_the_gradient_unchanged(
    logits: list[float], shift: float
) -> None:
    delta = torch.linspace(-1, 1, len(logits), dtype=F64)
    xi = _tensor(logits)
    torch.testing.assert_close(
        F.logit_gradient(xi, delta + shift), F.logit_gradient(xi, delta), rtol=0, atol=1e-13
    )


@given(vectors, st.floats(-3, 3))
def test_tied_improvements_give_exactly_zero_once_centred(logits: list[float], d: float) -> None:
    delta = torch.full((len(logits),), d, dtype=F64)
    assert torch.equal(F.logit_gradient(_tensor(logits), delta), torch.zeros_like(delta))


@given(vectors, st.data())
def test_masked_gradient_ties_are_exact_and_absent_tasks_get_zero(
    logits: list[float], data: st.DataObject
) -> None:
    k = len(logits)
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=k, max_size=k)))
    d = data.draw(st.floats(-3, 3))
    # Tied among the present tasks; absent tasks hold anything, the first one included.
    delta = torch.where(mask, d, torch.linspace(-7, 7, k, dtype=F64))
    grad = F.logit_gradient(_tensor(logits), delta, mask)
    assert torch.equal(grad, torch.zeros(k, dtype=F64))


@given(vectors, st.data())
def test_the_masked_gradient_is_the_gradient_over_the_present_tasks(
    logits: list[float], data: st.DataObject
) -> None:
    k = len(logits)
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=k, max_size=k)))
    delta = _tensor(data.draw(st.lists(st.floats(-2, 2), min_size=k, max_size=k)))
    grad = F.logit_gradient(_tensor(logits), delta, mask)
    expected = torch.zeros(k, dtype=F64)
    if mask.any():
        expected[mask] = F.logit_gradient(_tensor(logits)[mask], delta[mask])
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-13)


@given(vectors, st.data())
def test_weights_are_z_over_d_normalised_and_the_published_objective_matches(
    logits: list[float], data: st.DataObject
) -> None:
    k = len(logits)
    d = _tensor(data.draw(st.lists(st.floats(1e-3, 1e3), min_size=k, max_size=k)))
    z = torch.softmax(_tensor(logits), dim=0)
    weights = F.loss_weights(_tensor(logits), d, eps=0.0)  # losses d, bounds 0: D = d
    torch.testing.assert_close(weights, (z / d) / (z / d).sum(), rtol=1e-12, atol=0)
    published = (z * d.log()).sum() / (z / d).sum()
    torch.testing.assert_close(
        F.published_objective(_tensor(logits), d, eps=0.0), published, rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("fused", [True, False])
@given(
    k=st.integers(1, 8),
    lr=st.floats(1e-3, 0.5),
    gamma=st.sampled_from([0.0, 1e-3, 0.1]),
    betas=st.tuples(st.floats(0.0, 0.99), st.floats(0.5, 0.9999)),
    seed=st.integers(0, 2**16),
)
def test_the_adam_step_is_torch_adam(
    fused: bool, k: int, lr: float, gamma: float, betas: tuple[float, float], seed: int
) -> None:
    if fused and not F.fused_adam_available(torch.device("cpu")):
        pytest.skip("this torch has no fused Adam on the CPU")
    generator = torch.Generator().manual_seed(seed)
    grads = [torch.randn(k, generator=generator, dtype=F64) for _ in range(4)]
    reference = torch.zeros(k, dtype=F64, requires_grad=True)
    adam = torch.optim.Adam([reference], lr=lr, betas=betas, weight_decay=gamma, fused=fused)
    logits, exp_avg, exp_avg_sq = (torch.zeros(k, dtype=F64) for _ in range(3))
    step = torch.zeros((), dtype=torch.float32 if fused else F64)
    for grad in grads:
        reference.grad = grad.clone()
        adam.step()
        F.adam_step_(
            logits, grad.clone(), exp_avg, exp_avg_sq, step,
            lr=lr, gamma=gamma, betas=betas, eps=1e-8, fused=fused,
        )  # fmt: skip
        if fused:  # the very kernel torch.optim.Adam(fused=True) runs
            assert torch.equal(logits, reference.detach())
        else:
            torch.testing.assert_close(logits, reference.detach(), rtol=1e-13, atol=1e-15)
    assert step.item() == len(grads)


@pytest.mark.parametrize("fused", [True, False])
def test_a_skipped_adam_step_changes_nothing(fused: bool) -> None:
    logits, exp_avg, exp_avg_sq = (torch.tensor([0.1, -0.2, 0.3]) for _ in range(3))
    exp_avg_sq = exp_avg_sq.abs()
    step = torch.tensor(3.0)
    state = [t.clone() for t in (logits, exp_avg, exp_avg_sq, step)]
    options = {"lr": 0.025, "gamma": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}
    F.adam_step_(
        logits,
        torch.ones(3),
        exp_avg,
        exp_avg_sq,
        step,
        fused=fused,
        mask=torch.tensor(False),
        **options,
    )
    for before, after in zip(state, (logits, exp_avg, exp_avg_sq, step), strict=True):
        assert torch.equal(before, after)
    F.adam_step_(
        logits,
        torch.ones(3),
        exp_avg,
        exp_avg_sq,
        step,
        fused=fused,
        mask=torch.tensor(True),
        **options,
    )
    assert step.item() == 4.0 and not torch.equal(logits, state[0])


def test_the_masked_adam_step_moves_only_the_tasks_in_the_mask() -> None:
    logits, exp_avg, exp_avg_sq, steps = (torch.zeros(3, dtype=F64) for _ in range(4))
    mask = torch.tensor([True, False, True])
    F.adam_step_(
        logits, torch.ones(3, dtype=F64), exp_avg, exp_avg_sq, steps,
        lr=0.1, gamma=0.0, betas=(0.9, 0.999), eps=1e-8, mask=mask,
    )  # fmt: skip
    assert steps.tolist() == [1.0, 0.0, 1.0]
    assert logits[1] == 0.0 and exp_avg[1] == 0.0
    assert logits[0].item() == pytest.approx(-0.1) and math.isclose(logits[0], logits[2])


def test_log_distance_is_finite_exactly_for_usable_losses() -> None:
    offset = torch.tensor([1e-8, 1e-8, 1e-8, 1e-8])
    log_d = F.log_distance(torch.tensor([0.0, -1e-8, -1.0, math.inf]), offset)
    assert torch.isfinite(log_d).tolist() == [True, False, False, False]
