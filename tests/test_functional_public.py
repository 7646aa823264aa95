"""``famo.functional``, the public pure functions, against their definitions.

Each function is checked as its documentation defines it, from values computed here (plain
float64 formulas, autograd, ``torch.optim.Adam``), never from famo itself:

* ``loss_weights(logits, losses, min_losses=0.0, eps=1e-8)``: w = softmax(ξ − log D), which is
  ∂L/∂ℓ of the published objective;
* ``published_objective(...)``: L = c Σ zᵢ log Dᵢ (golden G1: logits 0, losses (1, 2) in float64
  give 0.4620981342241145);
* ``log_improvement(before, after, min_losses=0.0, eps=1e-8)``: δ = log D_before − log D_after;
* ``logit_gradient(logits, improvement, mask=None)``: g = z ⊙ (δ − ⟨z, δ⟩), autograd through the
  softmax (over the tasks in ``mask``; 0 for the others);
* ``adam_step_(...)``: one ``torch.optim.Adam(weight_decay=γ)`` step in place, fused or op by op;
  where ``mask`` is False nothing changes, the step count included.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from famo import functional
from tests.reference import ReferenceFAMO

F64 = torch.float64
PUBLIC = ("loss_weights", "published_objective", "log_improvement", "logit_gradient", "adam_step_")
FUSED_ON_CPU = hasattr(torch, "_fused_adam_")

task_vectors = st.integers(1, 8).flatmap(
    lambda k: st.lists(st.floats(-3.0, 3.0), min_size=k, max_size=k)
)
epsilons = st.sampled_from([0.0, 1e-8, 0.1])


def tensor(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


@pytest.mark.parametrize("name", PUBLIC)
def test_each_public_function_is_exported_and_documented(name: str) -> None:
    function = getattr(functional, name)
    assert callable(function) and name in functional.__all__
    assert function.__doc__ and ">>>" in function.__doc__, "documented with an example"


def test_g1_the_published_objective_of_losses_1_and_2_is_0_4620981342241145() -> None:
    value = functional.published_objective(torch.zeros(2, dtype=F64), tensor([1.0, 2.0]))
    d = [1.0 + 1e-8, 2.0 + 1e-8]  # D = ℓ − 0 + ε
    by_hand = sum(0.5 * math.log(x) for x in d) / sum(0.5 / x for x in d)
    assert value.dtype == F64 and value.shape == ()
    assert math.isclose(value.item(), by_hand, rel_tol=1e-15)
    assert math.isclose(value.item(), 0.4620981342241145, rel_tol=1e-15)
    reference = ReferenceFAMO(2).objective(tensor([1.0, 2.0]))
    assert math.isclose(value.item(), reference.item(), rel_tol=1e-15)


@st.composite
def weighting_cases(draw: st.DrawFn) -> tuple[list[float], list[float], float | list[float], float]:
    """Logits, losses, bounds (one number or one per task) and eps, with ℓ − b + ε > 0."""
    logits = draw(task_vectors)
    k = len(logits)
    per_task = draw(st.booleans())
    bounds = draw(st.lists(st.floats(-5.0, 5.0), min_size=k, max_size=k))
    if not per_task:
        bounds = [bounds[0]] * k
    gaps = draw(st.lists(st.floats(-6.0, 6.0), min_size=k, max_size=k))
    losses = [b + math.exp(g) for b, g in zip(bounds, gaps, strict=True)]
    return logits, losses, (bounds if per_task else bounds[0]), draw(epsilons)


def expected_weights(
    logits: list[float], losses: list[float], bounds: float | list[float], eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂L/∂ℓ, L) of the published objective, by autograd, with z and c constants."""
    leaf = tensor(losses).requires_grad_()
    b = tensor(bounds if isinstance(bounds, list) else [bounds] * len(losses))
    z = torch.softmax(tensor(logits), dim=0)
    shifted = leaf - b + eps
    c = 1.0 / (z / shifted).sum().detach()
    objective = c * (z * shifted.log()).sum()
    objective.backward()
    assert leaf.grad is not None
    return leaf.grad, objective.detach()


def bounds_argument(bounds: float | list[float]) -> float | torch.Tensor:
    return tensor(bounds) if isinstance(bounds, list) else bounds


@given(weighting_cases())
@example(([0.0, 0.0], [1.0, 2.0], 0.0, 1e-8))  # G1: (2/3, 1/3)
def test_loss_weights_are_softmax_of_logits_minus_log_d_and_the_objectives_gradient(
    case: tuple[list[float], list[float], float | list[float], float],
) -> None:
    logits, losses, bounds, eps = case
    weights = functional.loss_weights(tensor(logits), tensor(losses), bounds_argument(bounds), eps)
    by_autograd, _ = expected_weights(logits, losses, bounds, eps)
    torch.testing.assert_close(weights, by_autograd, rtol=1e-12, atol=1e-15)
    d = tensor(losses) - tensor(bounds if isinstance(bounds, list) else [bounds] * len(losses))
    by_definition = torch.softmax(tensor(logits) - (d + eps).log(), dim=0)
    torch.testing.assert_close(weights, by_definition, rtol=1e-12, atol=1e-15)


def test_loss_weights_default_to_zero_bounds_and_eps_1e_8() -> None:
    weights = functional.loss_weights(torch.zeros(2, dtype=F64), tensor([1.0, 2.0]))
    expected, _ = expected_weights([0.0, 0.0], [1.0, 2.0], 0.0, 1e-8)
    torch.testing.assert_close(weights, expected, rtol=1e-15, atol=0.0)


@given(weighting_cases())
def test_the_published_objective_is_c_sum_z_log_d(
    case: tuple[list[float], list[float], float | list[float], float],
) -> None:
    logits, losses, bounds, eps = case
    value = functional.published_objective(
        tensor(logits), tensor(losses), bounds_argument(bounds), eps
    )
    _, expected = expected_weights(logits, losses, bounds, eps)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)


@given(weighting_cases(), st.data())
def test_the_log_improvement_is_log_d_before_minus_log_d_after(
    case: tuple[list[float], list[float], float | list[float], float], data: st.DataObject
) -> None:
    _, before, bounds, eps = case
    k = len(before)
    b = bounds if isinstance(bounds, list) else [bounds] * k
    rates = data.draw(st.lists(st.floats(-3.0, 3.0), min_size=k, max_size=k))
    after = [bi + (x - bi) * math.exp(-r) for x, bi, r in zip(before, b, rates, strict=True)]
    value = functional.log_improvement(tensor(before), tensor(after), bounds_argument(bounds), eps)
    expected = [
        math.log(x - bi + eps) - math.log(y - bi + eps)
        for x, y, bi in zip(before, after, b, strict=True)
    ]
    torch.testing.assert_close(value, tensor(expected), rtol=1e-13, atol=1e-13)


@given(task_vectors, st.data())
def test_the_logit_gradient_is_autograd_through_the_softmax(
    logits: list[float], data: st.DataObject
) -> None:
    k = len(logits)
    delta = tensor(data.draw(st.lists(st.floats(-2.0, 2.0), min_size=k, max_size=k)))
    xi = tensor(logits).requires_grad_()
    (expected,) = torch.autograd.grad(torch.softmax(xi, dim=0), xi, grad_outputs=delta)
    gradient = functional.logit_gradient(tensor(logits), delta)
    torch.testing.assert_close(gradient, expected, rtol=0.0, atol=1e-14)


@given(task_vectors, st.data())
@example([0.5, -1.0, 2.0], None)  # no task in the mask: zero, not NaN
def test_with_a_mask_the_logit_gradient_is_over_the_tasks_in_it(
    logits: list[float], data: st.DataObject | None
) -> None:
    k = len(logits)
    if data is None:
        mask, delta = torch.zeros(k, dtype=torch.bool), torch.linspace(-1.0, 1.0, k, dtype=F64)
    else:
        mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=k, max_size=k)))
        delta = tensor(data.draw(st.lists(st.floats(-2.0, 2.0), min_size=k, max_size=k)))
    delta_outside = delta.masked_fill(mask, 0.0)
    gradient = functional.logit_gradient(tensor(logits), delta + 7.0 * delta_outside, mask)
    expected = torch.zeros(k, dtype=F64)
    if mask.any():
        xi = tensor(logits)[mask].requires_grad_()
        (inside,) = torch.autograd.grad(torch.softmax(xi, dim=0), xi, grad_outputs=delta[mask])
        expected[mask] = inside
    torch.testing.assert_close(gradient, expected, rtol=0.0, atol=1e-14)
    assert torch.equal(gradient[~mask], torch.zeros_like(gradient[~mask]))


# ---------------------------------------------------------------------- the Adam step

adam_settings = st.fixed_dictionaries(
    {
        "lr": st.floats(1e-3, 0.5),
        "gamma": st.sampled_from([0.0, 1e-3, 0.1]),
        "betas": st.tuples(st.floats(0.0, 0.99), st.floats(0.5, 0.9999)),
        "eps": st.sampled_from([1e-8, 1e-3]),
    }
)


def fresh(k: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Starting logits (not zero, so that weight decay shows) and four gradients."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(k, generator=generator, dtype=F64)
    return start, [torch.randn(k, generator=generator, dtype=F64) for _ in range(4)]


def moments(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(k, dtype=F64), torch.zeros(k, dtype=F64)


@pytest.mark.parametrize("fused", [True, False, None], ids=["fused", "op by op", "dispatched"])
@given(k=st.integers(1, 8), settings=adam_settings, seed=st.integers(0, 2**16))
def test_the_adam_step_is_torch_optim_adam_with_weight_decay_gamma(
    fused: bool | None, k: int, settings: dict[str, Any], seed: int
) -> None:
    if fused and not FUSED_ON_CPU:
        pytest.skip("this torch has no fused Adam kernel")
    start, gradients = fresh(k, seed)
    options = {"lr": settings["lr"], "betas": settings["betas"], "eps": settings["eps"]}
    single = start.clone().requires_grad_()
    by_torch = torch.optim.Adam([single], weight_decay=settings["gamma"], foreach=False, **options)
    logits, exp_avg, exp_avg_sq = start.clone(), *moments(k)
    step = torch.zeros((), dtype=torch.float32)
    for grad in gradients:
        single.grad = grad.clone()
        by_torch.step()
        functional.adam_step_(
            logits, grad.clone(), exp_avg, exp_avg_sq, step, fused=fused, **settings
        )
        torch.testing.assert_close(logits, single.detach(), rtol=1e-13, atol=1e-13)
        state = by_torch.state[single]
        torch.testing.assert_close(exp_avg, state["exp_avg"], rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(exp_avg_sq, state["exp_avg_sq"], rtol=1e-13, atol=1e-15)
    assert step.item() == len(gradients)


@pytest.mark.skipif(not FUSED_ON_CPU, reason="this torch has no fused Adam kernel")
@given(k=st.integers(1, 8), settings=adam_settings, seed=st.integers(0, 2**16))
def test_the_fused_adam_step_is_the_very_kernel_of_torch_optim_adam_fused(
    k: int, settings: dict[str, Any], seed: int
) -> None:
    start, gradients = fresh(k, seed)
    single = start.clone().requires_grad_()
    by_torch = torch.optim.Adam(
        [single],
        lr=settings["lr"],
        betas=settings["betas"],
        eps=settings["eps"],
        weight_decay=settings["gamma"],
        fused=True,
    )
    logits, exp_avg, exp_avg_sq = start.clone(), *moments(k)
    step = torch.zeros((), dtype=torch.float32)
    for grad in gradients:
        single.grad = grad.clone()
        by_torch.step()
        functional.adam_step_(
            logits, grad.clone(), exp_avg, exp_avg_sq, step, fused=True, **settings
        )
        assert torch.equal(logits, single.detach())


@pytest.mark.parametrize("fused", [False, None], ids=["op by op", "dispatched"])
@given(k=st.integers(1, 8), settings=adam_settings, seed=st.integers(0, 2**16), data=st.data())
def test_a_masked_adam_step_is_torch_adam_per_task_and_leaves_the_rest_untouched(
    fused: bool | None, k: int, settings: dict[str, Any], seed: int, data: st.DataObject
) -> None:
    """Per-task step counts (k,), as with missing tasks: one torch Adam per task."""
    start, gradients = fresh(k, seed)
    singles = [start[i : i + 1].clone().requires_grad_() for i in range(k)]
    by_torch = [
        torch.optim.Adam(
            [single],
            lr=settings["lr"],
            betas=settings["betas"],
            eps=settings["eps"],
            weight_decay=settings["gamma"],
            foreach=False,
        )
        for single in singles
    ]
    logits, exp_avg, exp_avg_sq = start.clone(), *moments(k)
    steps = torch.zeros(k, dtype=torch.float32)
    counts = [0] * k
    for grad in gradients:
        mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=k, max_size=k)))
        untouched = [t.clone() for t in (logits, exp_avg, exp_avg_sq, steps)]
        functional.adam_step_(
            logits, grad.clone(), exp_avg, exp_avg_sq, steps, fused=fused, mask=mask, **settings
        )
        for old, new in zip(untouched, (logits, exp_avg, exp_avg_sq, steps), strict=True):
            assert torch.equal(new[~mask], old[~mask])  # bit for bit
        for i in range(k):
            if mask[i]:
                singles[i].grad = grad[i : i + 1].clone()
                by_torch[i].step()
                counts[i] += 1
        expected = torch.cat([single.detach() for single in singles])
        torch.testing.assert_close(logits, expected, rtol=1e-13, atol=1e-13)
        assert steps.tolist() == [float(c) for c in counts]


@pytest.mark.parametrize("step_shape", [(), (1,)], ids=["shared step", "per-task step"])
@pytest.mark.parametrize("fused", [False, True, None], ids=["op by op", "fused", "dispatched"])
def test_one_task_with_its_step_masked_out_changes_nothing_and_masked_in_is_adam(
    fused: bool | None, step_shape: tuple[int, ...]
) -> None:
    """k = 1 (a mask is how a skipped step reaches the Adam step), weight decay moving it."""
    if fused and (not FUSED_ON_CPU or step_shape):
        pytest.skip("the fused kernel takes one shared step count")
    settings: dict[str, Any] = {"lr": 0.1, "gamma": 0.1, "betas": (0.9, 0.999), "eps": 1e-8}
    logits = torch.tensor([0.7], dtype=F64)
    exp_avg, exp_avg_sq = torch.tensor([0.01], dtype=F64), torch.tensor([1e-4], dtype=F64)
    step = torch.full(step_shape, 3.0, dtype=torch.float32)
    state = (logits, exp_avg, exp_avg_sq, step)
    before = [t.clone() for t in state]
    grad = torch.tensor([0.2], dtype=F64)
    skipped = torch.tensor([False])
    functional.adam_step_(
        logits, grad.clone(), exp_avg, exp_avg_sq, step, fused=fused, mask=skipped, **settings
    )
    for old, new in zip(before, state, strict=True):
        assert torch.equal(new, old)
    single = torch.tensor([0.7], dtype=F64, requires_grad=True)
    by_torch = torch.optim.Adam([single], lr=0.1, weight_decay=0.1, foreach=False)
    by_torch.state[single] = {
        "step": torch.tensor(3.0),
        "exp_avg": torch.tensor([0.01], dtype=F64),
        "exp_avg_sq": torch.tensor([1e-4], dtype=F64),
    }
    single.grad = grad.clone()
    by_torch.step()
    taken = torch.tensor([True])
    functional.adam_step_(
        logits, grad.clone(), exp_avg, exp_avg_sq, step, fused=fused, mask=taken, **settings
    )
    torch.testing.assert_close(logits, single.detach(), rtol=1e-13, atol=1e-15)
    assert step.tolist() == torch.full(step_shape, 4.0).tolist()
    assert not torch.equal(logits, before[0])
