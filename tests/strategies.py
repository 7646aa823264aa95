"""Hypothesis strategies named after the domain: task counts, bounds, loss sequences."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hypothesis import strategies as st

task_counts = st.integers(min_value=1, max_value=64)
learning_rates = st.floats(min_value=1e-4, max_value=0.5)
gammas = st.one_of(st.just(0.0), st.floats(min_value=1e-6, max_value=0.1))
# log of (loss − bound): losses from e^-4 to e^4 above their bounds
log_gaps = st.floats(min_value=-4.0, max_value=4.0)
bound_values = st.floats(min_value=-10.0, max_value=10.0)


@dataclass(frozen=True)
class Scenario:
    """A run: hyper-parameters, bounds, and (before, after) loss pairs for each step."""

    num_tasks: int
    lr: float
    gamma: float
    min_losses: tuple[float, ...]
    steps: tuple[tuple[tuple[float, ...], tuple[float, ...]], ...]


@st.composite
def scenarios(
    draw: st.DrawFn, max_tasks: int = 64, max_steps: int = 6, with_bounds: bool = True
) -> Scenario:
    k = draw(st.integers(min_value=1, max_value=max_tasks))
    bounds = (
        tuple(draw(st.lists(bound_values, min_size=k, max_size=k))) if with_bounds else (0.0,) * k
    )
    n = draw(st.integers(min_value=1, max_value=max_steps))

    def losses() -> tuple[float, ...]:
        gaps = draw(st.lists(log_gaps, min_size=k, max_size=k))
        return tuple(b + math.exp(g) for b, g in zip(bounds, gaps, strict=True))

    steps = tuple((losses(), losses()) for _ in range(n))
    return Scenario(k, draw(learning_rates), draw(gammas), bounds, steps)


def improvements_are_distinct(scenario: Scenario, eps: float = 1e-8) -> bool:
    """Whether every step's log-improvements δ differ across tasks by at least 1e-3 (relative).

    Where they (nearly) tie, the logit gradient g = z ⊙ (δ − ⟨z, δ⟩) is pure rounding noise,
    and Adam scales any nonzero g to a step of about ``lr``: two correct implementations that
    round differently then take visibly different steps. Exact comparisons (lockstep,
    permutation, rescaling) are meaningful only away from ties; ties have their own property
    (equal improvements leave the logits unchanged).
    """
    if scenario.num_tasks < 2:
        return True
    for before, after in scenario.steps:
        delta = [
            math.log(b - bound + eps) - math.log(a - bound + eps)
            for b, a, bound in zip(before, after, scenario.min_losses, strict=True)
        ]
        if max(delta) - min(delta) < 1e-3 * (1.0 + max(map(abs, delta))):
            return False
    return True
