"""Extreme numerics: huge and tiny losses, 16-bit inputs, k = 1 and k = 100,000, ties, bounds.

What float32 can represent gives the right weights; what it cannot fails with a clear error.
A long adversarial run keeps the logits finite; each update moves a logit by at most
``ADAM_STEP_BOUND * lr`` (``torch.optim.Adam`` with the default betas), whatever the losses.
"""

from __future__ import annotations

import math
import os
import time

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from famo import FAMOWeighting
from tests.helpers import assert_same_state, snapshot

DEEP = os.environ.get("FAMO_HYPOTHESIS_PROFILE") == "deep"

# |m̂| / √v̂ for Adam with betas (0.9, 0.999), by Cauchy–Schwarz over the moment sums:
# (1 − β1) / √((1 − β2)(1 − β1² / β2)) ≈ 7.27 (the bias corrections only lower it).
ADAM_STEP_BOUND = 0.1 / math.sqrt(0.001 * (1.0 - 0.81 / 0.999))

dtypes = st.sampled_from([torch.float32, torch.float64])
# Losses spanning 1e-30 … 1e30, as powers of ten.
loss_exponents = st.floats(min_value=-30.0, max_value=30.0)


def _reference_weights(logits: torch.Tensor, losses: list[float], eps: float) -> torch.Tensor:
    """w_i = (z_i / D_i) / Σ_j z_j / D_j (``docs/design.md`` §1), in float64 from the formula."""
    z = torch.softmax(logits.double(), dim=0)
    shifted = torch.tensor(losses, dtype=torch.float64) + eps
    return (z / shifted) / (z / shifted).sum()


@given(
    dtype=dtypes,
    exponents=st.lists(loss_exponents, min_size=1, max_size=8),
    after_exponents=st.lists(loss_exponents, min_size=8, max_size=8),
    logit_values=st.lists(st.floats(-20.0, 20.0), min_size=8, max_size=8),
    eps=st.sampled_from([0.0, 1e-8]),
)
@example(  # one loss at 1e-30, one at 1e30: the weight of the huge one underflows float32
    dtype=torch.float32,
    exponents=[-30.0, 30.0],
    after_exponents=[30.0, -30.0] + [0.0] * 6,
    logit_values=[0.0] * 8,
    eps=0.0,
)
def test_weights_are_right_for_losses_from_1e_minus_30_to_1e30(
    dtype: torch.dtype,
    exponents: list[float],
    after_exponents: list[float],
    logit_values: list[float],
    eps: float,
) -> None:
    k = len(exponents)
    famo = FAMOWeighting(k, gamma=0.0, eps=eps, dtype=dtype)
    famo.logits.copy_(torch.tensor(logit_values[:k]))
    losses = torch.tensor([10.0**e for e in exponents], dtype=dtype, requires_grad=True)
    objective = famo.loss(losses)
    objective.backward()
    assert losses.grad is not None
    weights = losses.grad.double()
    # The reference sees the losses as the state's dtype holds them.
    expected = _reference_weights(famo.logits, losses.detach().double().tolist(), eps)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.isfinite(weights).all() and (weights >= 0).all()
    assert abs(weights.sum().item() - 1.0) <= tolerance
    torch.testing.assert_close(weights, expected, rtol=tolerance, atol=tolerance)
    assert torch.isfinite(objective)

    before = famo.logits.clone()
    with torch.no_grad():
        famo.update(torch.tensor([10.0**e for e in after_exponents[:k]], dtype=dtype))
    assert torch.isfinite(famo.logits).all()
    assert (famo.logits - before).abs().max() <= ADAM_STEP_BOUND * famo.lr
    assert torch.isfinite(famo.weights).all()


def _expect_clear_error(famo: FAMOWeighting, losses: torch.Tensor, pattern: str) -> None:
    before = snapshot(famo)
    with pytest.raises(ValueError, match=pattern):
        famo.backward(losses)
    assert_same_state(famo, before)


def test_a_loss_beyond_float32_fails_clearly_and_float64_state_takes_it() -> None:
    losses = torch.tensor([1e39, 1.0], dtype=torch.float64, requires_grad=True)
    _expect_clear_error(
        FAMOWeighting(2), losses, r"representable in float32.*1e\+39.*dtype=torch.float64"
    )
    wide = FAMOWeighting(2, dtype=torch.float64)
    wide.backward(losses)
    assert torch.isfinite(losses.grad).all()  # type: ignore[arg-type]


def test_a_loss_that_float32_rounds_onto_its_bound_fails_clearly() -> None:
    """ℓ = b + 1e-12 is above its bound, but float32 rounds it to b: an error, not log(ε)."""
    losses = torch.tensor([1.0 + 1e-12, 2.0], dtype=torch.float64, requires_grad=True)
    _expect_clear_error(
        FAMOWeighting(2, min_losses=1.0),
        losses,
        r"is 1e-08, but it rounds to 0.0 in float32.*dtype=torch.float64",
    )
    wide = FAMOWeighting(2, min_losses=1.0, dtype=torch.float64)
    wide.backward(losses)
    grad = losses.grad
    assert grad is not None and torch.isfinite(grad).all()
    # D = 1e-12 + 1e-8 versus D = 1 + 1e-8: the loss at its bound takes almost all the weight.
    assert grad[0] > 0.9999


def test_a_loss_minus_bound_that_overflows_float32_fails_clearly() -> None:
    famo = FAMOWeighting(2, min_losses=[-3e38, 0.0])
    losses = torch.tensor([3e38, 1.0], requires_grad=True)
    _expect_clear_error(famo, losses, r"difference overflows")


def test_accumulated_losses_that_overflow_float32_fail_clearly() -> None:
    famo = FAMOWeighting(2)
    famo.loss(torch.tensor([3e38, 1.0], requires_grad=True))
    _expect_clear_error(famo, torch.tensor([3e38, 1.0], requires_grad=True), r"recorded sum")


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"min_losses": 1e39}, r"`min_losses` should be representable.*float32"),
        ({"min_losses": [0.0, -1e39]}, r"`min_losses` should be representable.*float32"),
        ({"lr": 1e39}, r"`lr` should be representable"),
        ({"gamma": 1e39}, r"`gamma` should be representable"),
        ({"eps": 1e39}, r"`eps` should be representable"),
    ],
)
def test_hyper_parameters_beyond_float32_are_rejected(
    kwargs: dict[str, object], pattern: str
) -> None:
    with pytest.raises(ValueError, match=pattern):
        FAMOWeighting(2, **kwargs)  # type: ignore[arg-type]
    FAMOWeighting(2, dtype=torch.float64, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_denormal_loss_with_eps_zero_takes_all_the_weight(dtype: torch.dtype) -> None:
    """z / D overflows for D ≈ 1e-45 (float32); the weights must still be exact, not NaN."""
    tiny = torch.finfo(dtype).smallest_normal / 2**10  # subnormal
    famo = FAMOWeighting(2, eps=0.0, dtype=dtype)
    losses = torch.tensor([tiny, 1.0], dtype=dtype, requires_grad=True)
    famo.backward(losses)
    grad = losses.grad
    assert grad is not None
    assert grad[0] == 1.0 and 0.0 <= grad[1].item() <= 2 * tiny


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-6, 1.0, 6e4])
def test_16_bit_losses_get_float32_weights_in_their_own_dtype(
    dtype: torch.dtype, scale: float
) -> None:
    values = [scale, scale * 0.5, scale * 0.25]
    half = torch.tensor(values, dtype=dtype, requires_grad=True)
    full = half.detach().float().requires_grad_()  # the same values, exactly
    famo16, famo32 = FAMOWeighting(3), FAMOWeighting(3)
    famo16.backward(half)
    famo32.backward(full)
    assert half.grad is not None and full.grad is not None
    assert half.grad.dtype == dtype
    assert torch.equal(half.grad, full.grad.to(dtype))
    with torch.no_grad():
        after = half.detach() * 0.5
        famo16.update(after)
        famo32.update(after.float())
    assert torch.equal(famo16.logits, famo32.logits)
    assert famo16.logits.dtype == torch.float32


def test_an_infinite_16_bit_loss_is_reported_as_not_finite() -> None:
    half = torch.tensor([7e4, 1.0]).half().requires_grad_()  # 7e4 overflows float16
    _expect_clear_error(FAMOWeighting(2), half, r"should be finite. Found inf for task 0")


@given(dtype=dtypes, after=st.floats(min_value=1e-30, max_value=1e30), gamma=st.floats(0.0, 1.0))
def test_a_single_task_has_weight_one_and_never_moves(
    dtype: torch.dtype, after: float, gamma: float
) -> None:
    famo = FAMOWeighting(1, gamma=gamma, dtype=dtype)
    for _ in range(3):
        losses = torch.tensor([1.0], dtype=dtype, requires_grad=True)
        famo.backward(losses)
        assert losses.grad is not None and losses.grad.item() == 1.0
        famo.update([after])
    assert famo.logits.item() == 0.0 and famo.weights.item() == 1.0


def test_a_hundred_thousand_tasks_by_tensor_and_by_name() -> None:
    k = 100_000
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(k, generator=generator) + 0.5
    famo = FAMOWeighting(k)
    famo.backward(values.clone().requires_grad_())
    famo.update(values * torch.rand(k, generator=generator))
    assert torch.isfinite(famo.logits).all()
    assert abs(famo.weights.double().sum().item() - 1.0) < 1e-4
    # Names: checking and matching them must take linear time (it once took minutes).
    names = [f"task{i}" for i in range(k)]
    start = time.perf_counter()
    named = FAMOWeighting(names, allow_missing_tasks=True)
    named.backward(dict(zip(names, values.clone().requires_grad_().unbind(), strict=True)))
    named.update(dict(zip(names[::2], (0.9 * values[::2]).tolist(), strict=True)))
    assert time.perf_counter() - start < 20.0
    assert torch.isfinite(named.logits).all()
    assert torch.equal(named.logits[1::2], torch.zeros(k // 2))  # absent afterwards: unmoved


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tied_losses_get_exactly_equal_weights_and_equal_rates_keep_them(
    dtype: torch.dtype,
) -> None:
    famo = FAMOWeighting(4, gamma=0.0, eps=0.0, dtype=dtype)
    losses = torch.full((4,), 0.7, dtype=dtype, requires_grad=True)
    famo.backward(losses)
    assert losses.grad is not None
    assert torch.equal(losses.grad, losses.grad[:1].expand(4))
    famo.update(torch.full((4,), 0.35, dtype=dtype))
    # From uneven weights, equal relative improvements (every loss halves) keep the weights.
    famo.reset()
    famo.logits.copy_(torch.tensor([0.3, -1.2, 2.0, 0.0]))
    start = famo.weights.clone()
    for _ in range(50):
        famo.loss(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=dtype, requires_grad=True))
        famo.update(torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=dtype))
    torch.testing.assert_close(famo.weights, start, rtol=0.0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bound", [-1e6, 0.0, 0.5, 1e6])
def test_losses_very_close_to_their_bounds_give_finite_weights(
    dtype: torch.dtype, bound: float
) -> None:
    """The smallest gap the state's dtype can hold above the bound still works (ε = 1e-8)."""
    above = torch.nextafter(torch.tensor(bound, dtype=dtype), torch.tensor(math.inf, dtype=dtype))
    famo = FAMOWeighting(2, min_losses=bound, dtype=dtype)
    losses = torch.stack([above, torch.tensor(bound + 1.0, dtype=dtype)]).requires_grad_()
    famo.backward(losses)
    assert losses.grad is not None and torch.isfinite(losses.grad).all()
    assert losses.grad[0] > losses.grad[1]
    famo.update(torch.stack([above, torch.tensor(bound + 0.5, dtype=dtype)]))
    assert torch.isfinite(famo.logits).all()


def _adversarial_run(steps: int, seed: int, k: int, lr: float) -> None:
    """Losses jump across 1e-30 … 1e30 at random, or one task stalls while others collapse."""
    generator = torch.Generator().manual_seed(seed)
    famo = FAMOWeighting(k, gamma=0.0, lr=lr, validate=False)
    chunk = 10_000
    largest_step = 0.0
    for start in range(0, steps, chunk):
        n = min(chunk, steps - start)
        exponents = torch.empty(n, 2, k).uniform_(-30.0, 30.0, generator=generator)
        if seed % 2:  # task 0 never improves, the others improve by a factor 1e30
            exponents[:, 0, :] = 0.0
            exponents[:, 1, 0] = 0.0
            exponents[:, 1, 1:] = -30.0
        pairs = torch.pow(10.0, exponents)
        leaf = torch.ones(k, requires_grad=True)
        previous = famo.logits.clone()
        for before, after in pairs:
            famo.loss(leaf * before)
            famo.update(after)
            step = (famo.logits - previous).abs().max().item()
            largest_step = max(largest_step, step)
            previous.copy_(famo.logits)
        for name in ("logits", "exp_avg", "exp_avg_sq", "adam_step"):
            assert torch.isfinite(getattr(famo, name)).all(), name
        weights = famo.weights
        assert torch.isfinite(weights).all() and abs(weights.sum().item() - 1.0) < 1e-5
    assert largest_step <= ADAM_STEP_BOUND * lr * (1.0 + 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("seed", "k", "lr"), [(0, 3, 0.025), (1, 3, 0.025), (2, 2, 10.0)])
def test_a_long_adversarial_run_keeps_the_logits_finite(seed: int, k: int, lr: float) -> None:
    """A million updates under the deep profile, 10,000 in CI (the loop runs ~5k steps/s)."""
    _adversarial_run(1_000_000 if DEEP else 10_000, seed, k, lr)


def _collapse_then_reverse(gamma: float) -> float:
    """Task 0 improves far more than task 1, then far less: task 0's final weight."""
    famo = FAMOWeighting(2, gamma=gamma, lr=1.0)
    leaf = torch.ones(2, requires_grad=True)
    for after in [(1e-30, 0.999)] * 300 + [(0.999, 1e-30)] * 1000:
        famo.loss(leaf)
        famo.update(after)
    assert torch.isfinite(famo.logits).all()
    return famo.weights[0].item()


def test_with_gamma_zero_a_collapsed_weight_stays_collapsed_and_decay_lets_it_recover() -> None:
    """What γ = 0 allows (the ``gamma`` docstring): finite logits, but no way back."""
    assert _collapse_then_reverse(0.0) < 1e-6
    assert _collapse_then_reverse(0.01) > 0.5


def test_an_objective_near_float32_max_stays_finite_and_its_gradient_exact() -> None:
    """``loss`` returns Σ w ℓ, a convex combination: finite whenever the losses are (the
    published L ≈ D·log D overflowed float32 past ~4e36)."""
    losses = torch.tensor([1e37, 5e36], requires_grad=True)
    objective = FAMOWeighting(2).loss(losses)
    objective.backward()
    assert objective.item() == pytest.approx(2e37 / 3, rel=1e-6)
    assert losses.grad is not None
    torch.testing.assert_close(losses.grad, torch.tensor([1 / 3, 2 / 3]))


def test_float64_state_that_float32_cannot_hold_refuses_to_convert() -> None:
    """``model.float()`` must not round recorded losses of 1e39 to inf (NaN logits later)."""
    famo = FAMOWeighting(2, dtype=torch.float64)
    famo.loss(torch.tensor([1e39, 1.0], dtype=torch.float64, requires_grad=True))
    before = snapshot(famo)
    with pytest.raises(ValueError, match=r"`window_sum`.*float32"):
        famo.float()
    assert_same_state(famo, before)
    assert famo.logits.dtype == torch.float64
    famo.discard()
    famo.float()  # nothing out of range any more
    assert famo.logits.dtype == torch.float32
