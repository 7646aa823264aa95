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


# ---------------------------------------------------------------------- the learning schedule

#: How a step's ``update`` is called: "learn" (plain), "skip" (``skip=True``), and the same with
#: a 0-dim bool tensor ("skip tensor": ``skip=torch.tensor(True)``, "learn tensor": ``False``).
UPDATE_CALLS = ("learn", "skip", "skip tensor", "learn tensor")
LEARNING_CALLS = frozenset({"learn", "learn tensor"})
update_every_values = st.sampled_from([1, 2, 3, 5])
warmup_values = st.integers(min_value=0, max_value=3)


@dataclass(frozen=True)
class ScheduleStep:
    """One step: the losses recorded, those after the optimizer step (None: the task is missing
    from that batch), and how ``update`` is called (one of :data:`UPDATE_CALLS`)."""

    before: tuple[float | None, ...]
    after: tuple[float | None, ...]
    call: str

    def present(self, which: str) -> dict[int, float]:
        losses = self.before if which == "before" else self.after
        return {task: value for task, value in enumerate(losses) if value is not None}


@dataclass(frozen=True)
class ScheduleRun:
    """A run with a learning schedule: warm-up, blocks of ``update_every``, missing tasks."""

    num_tasks: int
    lr: float
    gamma: float
    min_losses: tuple[float, ...]
    warmup_steps: int
    update_every: int
    allow_missing_tasks: bool
    steps: tuple[ScheduleStep, ...]


@st.composite
def schedule_runs(
    draw: st.DrawFn,
    max_tasks: int = 5,
    max_steps: int = 12,
    warmups: st.SearchStrategy[int] = warmup_values,
    update_everys: st.SearchStrategy[int] = update_every_values,
    missing: st.SearchStrategy[bool] | None = None,
) -> ScheduleRun:
    """Task i's log-improvement is about 0.1 (i + 1)² (± 0.04): block means never tie.

    Where they tie, the logit gradient is rounding noise that Adam scales up to a step of about
    ``lr`` (see :func:`improvements_are_distinct`); the schedule's arithmetic is what is tested.
    """
    k = draw(st.integers(min_value=1, max_value=max_tasks))
    allow_missing = draw(st.booleans() if missing is None else missing)
    bounds = tuple(draw(st.lists(bound_values, min_size=k, max_size=k)))

    def presence() -> list[bool]:
        if not allow_missing:
            return [True] * k
        mask = draw(st.lists(st.booleans(), min_size=k, max_size=k))
        if not any(mask):
            mask[draw(st.integers(min_value=0, max_value=k - 1))] = True
        return mask

    steps = []
    for _ in range(draw(st.integers(min_value=1, max_value=max_steps))):
        gaps = draw(st.lists(log_gaps, min_size=k, max_size=k))
        noise = draw(st.lists(st.floats(-0.04, 0.04), min_size=k, max_size=k))
        was, now = presence(), presence()
        before = tuple(
            b + math.exp(g) if p else None for b, g, p in zip(bounds, gaps, was, strict=True)
        )
        after = tuple(
            b + math.exp(g - 0.1 * (i + 1) ** 2 - u) if p else None
            for i, (b, g, u, p) in enumerate(zip(bounds, gaps, noise, now, strict=True))
        )
        steps.append(ScheduleStep(before, after, draw(st.sampled_from(UPDATE_CALLS))))
    return ScheduleRun(
        num_tasks=k,
        lr=draw(learning_rates),
        gamma=draw(gammas),
        min_losses=bounds,
        warmup_steps=draw(warmups),
        update_every=draw(update_everys),
        allow_missing_tasks=allow_missing,
        steps=tuple(steps),
    )
