"""``docs/design.md`` §7: convexity, scale invariance, permutation, rate balancing."""

from __future__ import annotations

import math

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from famo import FAMOWeighting
from tests.helpers import loss_weights
from tests.strategies import Scenario, improvements_are_distinct, scenarios

F64 = torch.float64


def trained(scenario: Scenario, **overrides: object) -> FAMOWeighting:
    """A FAMOWeighting that went through all of the scenario's steps."""
    options: dict[str, object] = {
        "lr": scenario.lr,
        "gamma": scenario.gamma,
        "min_losses": scenario.min_losses,
        "dtype": F64,
    }
    options.update(overrides)
    famo = FAMOWeighting(scenario.num_tasks, **options)  # type: ignore[arg-type]
    for before, after in scenario.steps:
        loss_weights(famo, before)
        famo.update(list(after))
    return famo


@given(scenarios())
def test_loss_gradient_is_a_convex_combination(scenario: Scenario) -> None:
    famo = trained(scenario)
    weights = loss_weights(famo, scenario.steps[-1][1])
    assert bool((weights >= 0).all())
    assert math.isclose(weights.sum().item(), 1.0, rel_tol=1e-12)


@given(scenarios())
def test_loss_gradient_is_c_z_over_shifted_losses(scenario: Scenario) -> None:
    famo = trained(scenario)
    losses = torch.tensor(scenario.steps[-1][1], dtype=F64)
    shifted = losses - torch.tensor(scenario.min_losses, dtype=F64) + famo.eps
    z = famo.weights
    expected = (z / shifted) / (z / shifted).sum()
    torch.testing.assert_close(loss_weights(famo, losses.tolist()), expected, rtol=1e-12, atol=0)


@given(
    scenarios(max_tasks=8, with_bounds=False),
    st.lists(st.floats(min_value=1e-3, max_value=1e3), min_size=8, max_size=8),
)
def test_rescaling_a_task_changes_neither_logits_nor_gradient_direction(
    scenario: Scenario, scales: list[float]
) -> None:
    assume(improvements_are_distinct(scenario))
    k = scenario.num_tasks
    a = scales[:k]
    rescaled = Scenario(
        k,
        scenario.lr,
        scenario.gamma,
        scenario.min_losses,
        tuple(
            (
                tuple(x * s for x, s in zip(before, a, strict=True)),
                tuple(x * s for x, s in zip(after, a, strict=True)),
            )
            for before, after in scenario.steps
        ),
    )
    # eps = 0 makes the invariance exact up to rounding; with eps = 1e-8 it holds up to eps.
    plain, scaled = trained(scenario, eps=0.0), trained(rescaled, eps=0.0)
    torch.testing.assert_close(scaled.logits, plain.logits, rtol=1e-9, atol=1e-9)
    # Model gradient Σ w'_i ∇(a_i ℓ_i) must point where Σ w_i ∇ℓ_i points: w'_i a_i ∝ w_i.
    w = loss_weights(plain, scenario.steps[-1][0])
    w_scaled = loss_weights(scaled, rescaled.steps[-1][0]) * torch.tensor(a, dtype=F64)
    torch.testing.assert_close(w_scaled / w_scaled.sum(), w, rtol=1e-9, atol=1e-12)


@given(scenarios(max_tasks=16), st.randoms(use_true_random=False))
def test_permuting_tasks_permutes_weights_and_logits(scenario: Scenario, rng: object) -> None:
    assume(improvements_are_distinct(scenario))
    k = scenario.num_tasks
    order = list(range(k))
    rng.shuffle(order)  # type: ignore[attr-defined]

    def permute(values: tuple[float, ...]) -> tuple[float, ...]:
        return tuple(values[i] for i in order)

    permuted = Scenario(
        k,
        scenario.lr,
        scenario.gamma,
        permute(scenario.min_losses),
        tuple((permute(b), permute(a)) for b, a in scenario.steps),
    )
    plain, shuffled = trained(scenario), trained(permuted)
    torch.testing.assert_close(shuffled.logits, plain.logits[order], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(shuffled.weights, plain.weights[order], rtol=1e-12, atol=1e-12)


@given(st.lists(st.floats(min_value=-2.0, max_value=2.0), min_size=2, max_size=32, unique=True))
def test_a_task_that_improved_less_than_average_gains_logit(log_improvements: list[float]) -> None:
    k = len(log_improvements)
    famo = FAMOWeighting(k, dtype=F64)
    loss_weights(famo, [1.0] * k)
    famo.update([math.exp(-d) for d in log_improvements])  # δ_i = log(1) − log(e^{-d_i}) = d_i
    mean = sum(log_improvements) / k  # z is uniform at the first step
    for delta, logit in zip(log_improvements, famo.logits.tolist(), strict=True):
        if delta < mean - 1e-9:
            assert logit > 0
        elif delta > mean + 1e-9:
            assert logit < 0


@given(
    st.integers(min_value=1, max_value=32),
    st.lists(st.floats(min_value=-1.0, max_value=1.0), min_size=1, max_size=10),
)
def test_equal_improvements_leave_logits_unchanged_without_decay(
    k: int, improvements: list[float]
) -> None:
    famo = FAMOWeighting(k, gamma=0.0, dtype=F64)
    level = 1.0
    for d in improvements:
        loss_weights(famo, [level] * k)
        level *= math.exp(-d)
        famo.update([level] * k)
    assert torch.equal(famo.logits, torch.zeros(k, dtype=F64))


def realised_rate_spread(speeds: list[float], steps: int, famo: FAMOWeighting | None) -> float:
    """Tasks whose log-improvement per step is s_i · w_i; max/min of the realised rates.

    ``famo=None`` keeps uniform weights w_i = 1/k. The speeds are scaled so that one step's
    log-improvement stays below FAMO's lr: the logits can then track the losses.
    """
    k = len(speeds)
    s = torch.tensor(speeds, dtype=F64) * 1e-4
    losses = torch.ones(k, dtype=F64)
    rates = []
    for _ in range(steps):
        w = torch.full((k,), 1.0 / k, dtype=F64) if famo is None else loss_weights(famo, losses)
        rate = s * w
        losses = losses * torch.exp(-rate)
        if famo is not None:
            famo.update(losses)
        rates.append(rate)
    realised = torch.stack(rates[-200:]).mean(dim=0)
    return (realised.max() / realised.min()).item()


@settings(max_examples=8)
@given(st.lists(st.floats(min_value=1.0, max_value=100.0), min_size=0, max_size=8))
def test_closed_loop_balances_the_rates_of_tasks_with_100x_different_speeds(
    middle_speeds: list[float],
) -> None:
    speeds = [1.0, *middle_speeds, 100.0]  # always spanning 100×
    uniform = realised_rate_spread(speeds, 3000, None)
    balanced = realised_rate_spread(
        speeds, 3000, FAMOWeighting(len(speeds), gamma=0.0, dtype=F64, validate=False)
    )
    assert uniform > 99.0
    assert balanced < 2.0
