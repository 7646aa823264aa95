"""Bounds set at run time: ``famo.min_losses = b``, as the official code's ``set_min_losses``.

The property returns a copy, so an in-place edit of it cannot be half-applied (shown, but not
used; then restored by a checkpoint round trip). An assignment is checked like the constructor's
argument, refused while losses are waiting (their log-distances used the old bounds), and from
then on the object is exactly one built (or loaded) with the new bounds, through dtype moves and
checkpoints.
"""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch

from famo import FAMOWeighting
from tests.helpers import assert_same_state, assert_same_trajectory, loss_weights, snapshot

F32, F64 = torch.float32, torch.float64
NAMES = ["seg", "depth", "normal"]
FIRST = [0.5, -0.5, 0.25]  # the bounds the objects start with, before an assignment
STEPS = [
    ([1.0, 2.0, 3.0], [0.9, 1.5, 2.9]),
    ([0.95, 1.6, 2.9], [0.8, 1.4, 2.85]),
    ([0.8, 1.5, 2.8], [0.75, 1.0, 2.7]),
    ([0.7, 1.1, 2.7], [0.6, 0.9, 2.65]),
    ([0.65, 0.9, 2.6], [0.6, 0.85, 2.4]),
]
# Each way of giving bounds, and the bounds it means (float64). 0.1 and 1/3 are not exact in
# float32, so a float32 detour would show.
GIVEN: list[tuple[str, Any, list[float]]] = [
    ("a number", -1.0, [-1.0] * 3),
    ("k numbers", [0.1, -2.0, 1 / 3], [0.1, -2.0, 1 / 3]),
    ("a float64 tensor", torch.tensor([0.1, -2.0, 1 / 3], dtype=F64), [0.1, -2.0, 1 / 3]),
    ("a tensor with grad", torch.tensor([0.0, -0.5, 0.1], requires_grad=True), None),
    ("None", None, [0.0] * 3),
]
GIVEN_IDS = [case[0] for case in GIVEN]


def exact(given: Any, meant: list[float] | None) -> torch.Tensor:
    """The bounds in float64, as the checkpoint keeps them."""
    if meant is None:
        return given.detach().to(F64)  # type: ignore[no-any-return]
    return torch.tensor(meant, dtype=F64)


def round_trip(famo: FAMOWeighting, into: FAMOWeighting) -> FAMOWeighting:
    buffer = io.BytesIO()
    torch.save(famo.state_dict(), buffer)
    buffer.seek(0)
    into.load_state_dict(torch.load(buffer, weights_only=True))
    return into


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize(("given", "meant"), [case[1:] for case in GIVEN], ids=GIVEN_IDS)
def test_bounds_assigned_before_training_equal_bounds_given_to_the_constructor(
    given: Any, meant: list[float] | None, dtype: torch.dtype
) -> None:
    assigned = FAMOWeighting(NAMES, min_losses=FIRST, dtype=dtype)
    assigned.min_losses = given
    built = FAMOWeighting(NAMES, min_losses=given, dtype=dtype)
    assert assigned.min_losses.dtype == dtype
    assert torch.equal(assigned.min_losses, exact(given, meant).to(dtype))
    assert torch.equal(assigned.state_dict()["lower_bounds"], exact(given, meant))
    assert_same_trajectory(assigned, built, STEPS)


@pytest.mark.parametrize("update_every", [1, 3], ids=["every step", "inside a block"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize(("given", "meant"), [case[1:] for case in GIVEN], ids=GIVEN_IDS)
def test_bounds_assigned_during_training_equal_bounds_loaded_from_a_checkpoint(
    given: Any, meant: list[float] | None, dtype: torch.dtype, update_every: int
) -> None:
    """Only the bounds change; the rest of the run is the run of the edited checkpoint."""
    assigned = FAMOWeighting(NAMES, min_losses=FIRST, update_every=update_every, dtype=dtype)
    for before, after in STEPS[:2]:
        loss_weights(assigned, before)
        assigned.update(after)
    checkpoint = assigned.state_dict()
    checkpoint["lower_bounds"] = exact(given, meant)
    assigned.min_losses = given
    after_assignment = assigned.state_dict()
    for key, value in checkpoint.items():  # nothing else moved
        assert torch.equal(after_assignment[key], value), key
    loaded = FAMOWeighting(NAMES, update_every=update_every, dtype=dtype)
    loaded.load_state_dict(checkpoint)
    assert torch.equal(assigned.min_losses, loaded.min_losses)
    assert_same_trajectory(assigned, loaded, STEPS[2:])


@pytest.mark.parametrize("extra_forward", [True, False])
def test_bounds_cannot_change_while_losses_are_pending(extra_forward: bool) -> None:
    famo = FAMOWeighting(NAMES, min_losses=FIRST, extra_forward=extra_forward)
    loss_weights(famo, STEPS[0][0])
    assert famo.pending
    before, bounds = snapshot(famo), famo.min_losses.clone()
    with pytest.raises(RuntimeError, match="min_losses") as refused:
        famo.min_losses = [0.0, 0.0, 0.0]
    assert "discard" in str(refused.value) or "update" in str(refused.value)  # says what to do
    assert_same_state(famo, before)
    assert torch.equal(famo.min_losses, bounds)
    if extra_forward:
        famo.update(STEPS[0][1])
    else:
        famo.discard()
    famo.min_losses = [0.0, 0.0, 0.0]  # once nothing waits, it is taken
    assert famo.min_losses.tolist() == [0.0, 0.0, 0.0]


BAD_BOUNDS: list[tuple[str, Any]] = [
    ("too few", [0.0, 1.0]),
    ("too many", [0.0] * 4),
    ("nan", [0.0, math.nan, 0.0]),
    ("inf", [0.0, 0.0, -math.inf]),
    ("text", "0"),
    ("a bool", True),
    ("2-D", torch.zeros(3, 1)),
    ("on meta", torch.zeros(3, device="meta")),
    ("beyond float32", [0.0, 1e39, 0.0]),
]


@pytest.mark.parametrize("bad", [case[1] for case in BAD_BOUNDS], ids=[c[0] for c in BAD_BOUNDS])
def test_bad_bounds_are_refused_as_the_constructor_refuses_them_and_change_nothing(
    bad: Any,
) -> None:
    with pytest.raises((TypeError, ValueError)) as by_constructor:
        FAMOWeighting(NAMES, min_losses=bad)
    famo = FAMOWeighting(NAMES, min_losses=FIRST)
    for before_losses, after_losses in STEPS[:2]:
        loss_weights(famo, before_losses)
        famo.update(after_losses)
    before, bounds = snapshot(famo), famo.min_losses.clone()
    with pytest.raises(by_constructor.type) as by_assignment:
        famo.min_losses = bad
    assert "min_losses" in str(by_constructor.value)
    assert "min_losses" in str(by_assignment.value)
    assert_same_state(famo, before)
    assert torch.equal(famo.min_losses, bounds)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_the_bounds_property_is_a_copy_so_an_edit_of_it_is_never_half_applied(
    dtype: torch.dtype,
) -> None:
    """The issue's measured case: the edit showed, the gradients ignored it, a checkpoint round
    trip applied it. Now nothing of it reaches the object."""
    edited = FAMOWeighting(2, dtype=dtype)
    untouched = FAMOWeighting(2, dtype=dtype)
    view = edited.min_losses
    view[0] = 0.5
    view.add_(0.25)
    assert edited.min_losses.tolist() == [0.0, 0.0]
    assert torch.equal(edited.state_dict()["lower_bounds"], torch.zeros(2, dtype=F64))
    assert torch.equal(loss_weights(edited, [1.0, 2.0]), loss_weights(untouched, [1.0, 2.0]))
    edited.update([0.5, 1.9])
    untouched.update([0.5, 1.9])
    restored = round_trip(edited, FAMOWeighting(2, dtype=dtype))
    assert_same_trajectory(
        restored, untouched, [([1.0, 2.0], [0.9, 1.8]), ([0.9, 1.8], [0.8, 1.0])]
    )


def test_assigned_bounds_survive_float_then_double_exactly() -> None:
    bounds = [0.1, -2 / 3, 1e-9]
    famo = FAMOWeighting(NAMES, dtype=F64)
    famo.min_losses = bounds
    famo.float()
    assert famo.min_losses.dtype == F32
    assert torch.equal(famo.min_losses, torch.tensor(bounds, dtype=F64).float())
    famo.double()
    assert torch.equal(famo.min_losses, torch.tensor(bounds, dtype=F64))
    assert_same_trajectory(famo, FAMOWeighting(NAMES, min_losses=bounds, dtype=F64), STEPS)


def test_bounds_assigned_in_float32_come_back_exactly_in_float64() -> None:
    bounds = [0.1, -2 / 3, 1e-9]
    famo = FAMOWeighting(NAMES, min_losses=FIRST)
    famo.min_losses = bounds
    assert torch.equal(famo.min_losses, torch.tensor(bounds, dtype=F64).float())
    assert torch.equal(famo.double().min_losses, torch.tensor(bounds, dtype=F64))


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_assigned_bounds_survive_a_checkpoint_bit_for_bit(dtype: torch.dtype) -> None:
    bounds = [0.1, -2 / 3, 1e-9]
    famo = FAMOWeighting(NAMES, min_losses=FIRST, dtype=dtype)
    for before, after in STEPS[:2]:
        loss_weights(famo, before)
        famo.update(after)
    famo.min_losses = bounds
    assert torch.equal(famo.state_dict()["lower_bounds"], torch.tensor(bounds, dtype=F64))
    restored = round_trip(famo, FAMOWeighting(NAMES, dtype=dtype))
    assert torch.equal(restored.min_losses, famo.min_losses)
    assert_same_trajectory(restored, famo, STEPS[2:])
    wide = round_trip(famo, FAMOWeighting(NAMES, dtype=F64))  # the exact bounds, whatever dtype
    assert torch.equal(wide.min_losses, torch.tensor(bounds, dtype=F64))
