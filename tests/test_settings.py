"""The constructor's controls: checked once, read-only or assignable, and what the defaults are.

``warmup_steps`` and ``update_every`` shape the state (a warm-up count, a partial block): they are
checked at construction and read-only. ``lr``, ``gamma``, ``eps``, ``betas`` and ``adam_eps`` are
assignable, and from the next call the object behaves exactly as if it had been built with the
new value: the same trajectory, bit for bit, not just a first step of the right size.
"""

from __future__ import annotations

from typing import Any

import numpy
import pytest
import torch

from famo import FAMOWeighting
from tests.helpers import assert_same_state, assert_same_trajectory, loss_weights, snapshot

F32, F64 = torch.float32, torch.float64
NAMES = ["seg", "depth", "normal"]
BOUNDS = [0.0, -1.0, 0.25]
# (losses recorded, losses after the step): three tasks falling at different rates
STEPS = [
    ([1.0, 2.0, 3.0], [0.9, 1.5, 2.9]),
    ([0.95, 1.6, 2.9], [0.8, 1.4, 2.85]),
    ([0.8, 1.5, 2.8], [0.75, 1.0, 2.7]),
    ([0.7, 1.1, 2.7], [0.6, 0.9, 2.65]),
    ([0.65, 0.9, 2.6], [0.6, 0.85, 2.4]),
    ([0.6, 0.8, 2.4], [0.5, 0.8, 2.35]),
    ([0.5, 0.8, 2.3], [0.45, 0.7, 2.3]),
]


def with_history(**options: Any) -> FAMOWeighting:
    """Not at its initial state, and with losses pending: a refused call must keep all of it."""
    famo = FAMOWeighting(NAMES, min_losses=BOUNDS, **options)
    for before, after in STEPS[:2]:
        loss_weights(famo, before)
        famo.update(after)
    loss_weights(famo, STEPS[2][0])
    return famo


# ---------------------------------------------------------------------- warmup_steps, update_every


BAD_SCHEDULES: list[tuple[str, dict[str, Any], type[Exception]]] = [
    ("negative warm-up", {"warmup_steps": -1}, ValueError),
    ("float warm-up", {"warmup_steps": 2.0}, TypeError),
    ("fractional warm-up", {"warmup_steps": 2.5}, TypeError),
    ("bool warm-up", {"warmup_steps": True}, TypeError),
    ("text warm-up", {"warmup_steps": "2"}, TypeError),
    ("None warm-up", {"warmup_steps": None}, TypeError),
    ("numpy float warm-up", {"warmup_steps": numpy.float64(2.0)}, TypeError),
    ("numpy fraction warm-up", {"warmup_steps": numpy.float64(2.5)}, TypeError),
    ("numpy float update_every", {"update_every": numpy.float32(3.0)}, TypeError),
    ("update every 0", {"update_every": 0}, ValueError),
    ("negative update_every", {"update_every": -2}, ValueError),
    ("float update_every", {"update_every": 1.0}, TypeError),
    ("bool update_every", {"update_every": True}, TypeError),
    ("text update_every", {"update_every": "1"}, TypeError),
    ("None update_every", {"update_every": None}, TypeError),
    ("tensor update_every", {"update_every": torch.tensor(2.0)}, TypeError),
]


@pytest.mark.parametrize(
    ("options", "error"),
    [case[1:] for case in BAD_SCHEDULES],
    ids=[case[0] for case in BAD_SCHEDULES],
)
def test_bad_warm_up_and_block_lengths_are_refused_with_the_parameter_named(
    options: dict[str, Any], error: type[Exception]
) -> None:
    ((name, value),) = options.items()
    with pytest.raises(error, match=f"`{name}`") as refused:
        FAMOWeighting(2, **options)
    message = str(refused.value)
    assert repr(value) in message or str(value) in message, message  # what was found


@pytest.mark.parametrize("name", ["warmup_steps", "update_every"])
def test_numpy_integers_are_accepted_as_plain_ints(name: str) -> None:
    """Any integer but a bool (``operator.index``): step counts often come from numpy."""
    famo = FAMOWeighting(2, **{name: numpy.int64(3)})
    assert getattr(famo, name) == 3 and type(getattr(famo, name)) is int


def test_the_schedule_is_read_back_as_given_and_defaults_to_every_step() -> None:
    assert (FAMOWeighting(2).warmup_steps, FAMOWeighting(2).update_every) == (0, 1)
    famo = FAMOWeighting(2, warmup_steps=5, update_every=4)
    assert (famo.warmup_steps, famo.update_every) == (5, 4)


@pytest.mark.parametrize(
    ("name", "value"), [("warmup_steps", 3), ("update_every", 2), ("update_every", 0)]
)
def test_the_schedule_is_read_only_and_a_refused_assignment_changes_nothing(
    name: str, value: int
) -> None:
    famo = with_history(warmup_steps=1, update_every=3)
    before = snapshot(famo)
    with pytest.raises(AttributeError):
        setattr(famo, name, value)
    assert (famo.warmup_steps, famo.update_every) == (1, 3)
    assert_same_state(famo, before)


def test_repr_shows_a_schedule_that_is_not_the_default() -> None:
    assert "warmup_steps" not in repr(FAMOWeighting(2))
    assert "update_every" not in repr(FAMOWeighting(2))
    text = repr(FAMOWeighting(2, warmup_steps=100, update_every=4))
    assert "warmup_steps=100" in text and "update_every=4" in text


# ---------------------------------------------------------------------- assignable hyper-parameters


NEW_VALUES: dict[str, Any] = {
    "lr": 0.1,
    "gamma": 0.05,
    "eps": 0.5,  # large enough to change every log-distance visibly
    "betas": (0.5, 0.9),
    "adam_eps": 1e-3,
}


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(NEW_VALUES))
def test_a_reassigned_hyper_parameter_behaves_as_if_built_with_it(name: str, dtype: Any) -> None:
    """Assigned between two steps: the rest of the run equals an object built with the value
    and loaded from the checkpoint at that point (a checkpoint holds no hyper-parameters)."""
    assigned = FAMOWeighting(NAMES, min_losses=BOUNDS, dtype=dtype)
    unchanged = FAMOWeighting(NAMES, min_losses=BOUNDS, dtype=dtype)
    assert_same_trajectory(assigned, unchanged, STEPS[:3])
    setattr(assigned, name, NEW_VALUES[name])
    assert getattr(assigned, name) == NEW_VALUES[name]
    built = FAMOWeighting(NAMES, min_losses=BOUNDS, dtype=dtype, **{name: NEW_VALUES[name]})
    built.load_state_dict(assigned.state_dict())
    assert_same_trajectory(assigned, built, STEPS[3:])
    # The value made a difference: the object that kept the default went elsewhere.
    for before, after in STEPS[3:]:
        loss_weights(unchanged, before)
        unchanged.update(after)
    assert not torch.equal(unchanged.logits, assigned.logits)


@pytest.mark.parametrize("name", list(NEW_VALUES))
def test_a_hyper_parameter_reassigned_while_losses_are_pending_applies_to_their_step(
    name: str,
) -> None:
    """As a checkpoint taken then and loaded into an object built with the value would: the
    waiting losses' log-distances are taken with the new ``eps`` too."""
    assigned = FAMOWeighting(NAMES, min_losses=BOUNDS, dtype=F64)
    assert_same_trajectory(assigned, FAMOWeighting(NAMES, min_losses=BOUNDS, dtype=F64), STEPS[:2])
    loss_weights(assigned, STEPS[2][0])  # pending
    setattr(assigned, name, NEW_VALUES[name])
    built = FAMOWeighting(NAMES, min_losses=BOUNDS, dtype=F64, **{name: NEW_VALUES[name]})
    built.load_state_dict(assigned.state_dict())
    for famo in (assigned, built):
        famo.update(STEPS[2][1])
    assert_same_state(assigned, snapshot(built))
    assert_same_trajectory(assigned, built, STEPS[3:])


def test_gamma_reassigned_by_preset_name_behaves_as_if_built_with_it() -> None:
    assigned = FAMOWeighting(NAMES, dtype=F64)
    assigned.gamma = "official"  # type: ignore[assignment]
    assert_same_trajectory(assigned, FAMOWeighting(NAMES, gamma=1e-5, dtype=F64), STEPS)


# ---------------------------------------------------------------------- the defaults


def test_the_defaults_are_lr_0_025_and_gamma_1e_3_in_behaviour_and_in_repr() -> None:
    default = FAMOWeighting(NAMES, min_losses=BOUNDS)
    assert_same_trajectory(
        default,
        FAMOWeighting(
            NAMES,
            lr=0.025,
            gamma=1e-3,
            min_losses=BOUNDS,
            eps=1e-8,
            betas=(0.9, 0.999),
            adam_eps=1e-8,
            warmup_steps=0,
            update_every=1,
        ),
        STEPS,
    )
    # The test can tell: a default 10% off, or the other gamma preset, takes other steps.
    for other in ({"lr": 0.0275}, {"gamma": 1e-5}):
        trajectory = FAMOWeighting(NAMES, min_losses=BOUNDS, **other)
        for before, after in STEPS:
            loss_weights(trajectory, before)
            trajectory.update(after)
        assert not torch.equal(trajectory.logits, default.logits), other
    assert (default.lr, default.gamma) == (0.025, 1e-3)
    text = repr(FAMOWeighting(NAMES))
    assert "lr=0.025" in text and "gamma=0.001" in text
    for name in ("betas", "adam_eps", "warmup_steps", "update_every"):
        assert name not in text, name
