"""famo against the tests' reference (autograd + torch.optim.Adam), step by step, in float64."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st

from famo import FAMOWeighting
from tests.helpers import loss_weights
from tests.reference import ReferenceFAMO
from tests.strategies import Scenario, improvements_are_distinct, scenarios

F64 = torch.float64


def run_lockstep(scenario: Scenario, betas: tuple[float, float], adam_eps: float) -> None:
    assume(improvements_are_distinct(scenario))
    options: dict[str, Any] = {
        "lr": scenario.lr,
        "gamma": scenario.gamma,
        "min_losses": scenario.min_losses,
        "betas": betas,
        "adam_eps": adam_eps,
    }
    famo = FAMOWeighting(scenario.num_tasks, dtype=F64, **options)
    reference = ReferenceFAMO(scenario.num_tasks, **options)
    for before, after in scenario.steps:
        torch.testing.assert_close(
            loss_weights(famo, before), reference.loss_weights(before), rtol=1e-12, atol=1e-12
        )
        famo.update(list(after))
        reference.update(after)
        torch.testing.assert_close(famo.logits, reference.logits.detach(), rtol=1e-12, atol=1e-12)


@given(scenarios())
@example(Scenario(1, 0.025, 1e-3, (0.0,), (((1.0,), (0.5,)),)))  # one task: weight 1, logit 0
def test_famo_matches_reference_step_by_step(scenario: Scenario) -> None:
    run_lockstep(scenario, betas=(0.9, 0.999), adam_eps=1e-8)


@given(
    scenarios(max_tasks=8),
    st.tuples(st.floats(0.0, 0.99), st.floats(0.0, 0.9999)),
    st.sampled_from([1e-12, 1e-8, 1e-3]),
)
def test_inner_adam_matches_torch_adam_for_any_betas_and_eps(
    scenario: Scenario, betas: tuple[float, float], adam_eps: float
) -> None:
    run_lockstep(scenario, betas=betas, adam_eps=adam_eps)


def test_official_gamma_is_selectable_by_name() -> None:
    assert FAMOWeighting(2, gamma="official").gamma == 1e-5
    assert FAMOWeighting(2, gamma="paper").gamma == 1e-3
    assert FAMOWeighting(2).gamma == 1e-3
