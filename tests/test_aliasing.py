"""What is recorded is what is saved: nothing FAMO keeps aliases a tensor the caller holds.

A caller may edit its tensors in place after handing them to famo: a loss tensor reused for
logging, a static buffer that CUDA-graph code overwrites every step, a checkpoint dict edited
after loading. In every case three runs must agree bit for bit: the clean run (no edit), the
edited run continued, and the edited run resumed from its ``state_dict()`` at the point of the
edit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from famo import FAMOWeighting
from tests.helpers import assert_same_state, snapshot

F64 = torch.float64
NAMES = ["a", "b"]
BEFORE = [[1.0, 2.0], [0.9, 1.8], [0.8, 1.7], [0.75, 1.5]]
AFTER = [[0.9, 1.8], [0.85, 1.75], [0.7, 1.6], [0.7, 1.4]]


def make(extra_forward: bool) -> FAMOWeighting:
    return FAMOWeighting(NAMES, dtype=F64, extra_forward=extra_forward)


def leaf(values: list[float]) -> Tensor:
    return torch.tensor(values, dtype=F64, requires_grad=True)


def as_form(losses: Tensor, form: str) -> Any:
    if form == "tensor":
        return losses
    if form == "list":
        return list(losses.unbind())
    return dict(zip(NAMES, losses.unbind(), strict=True))


def edit_in_place(tensor: Tensor) -> None:
    with torch.no_grad():
        tensor.mul_(torch.tensor([10.0, 1.0], dtype=F64))


def resumed(famo: FAMOWeighting) -> FAMOWeighting:
    fresh = make(famo.extra_forward)
    fresh.load_state_dict(famo.state_dict())
    return fresh


def finish(famo: FAMOWeighting, start: int) -> None:
    for i in range(start, len(BEFORE)):
        famo.backward(leaf(BEFORE[i]))
        if famo.extra_forward:
            famo.update(AFTER[i])


def assert_three_runs_agree(
    step: Callable[[FAMOWeighting, bool], None], extra_forward: bool
) -> None:
    """``step(famo, edit)`` drives one step, editing the caller's tensors where ``edit``."""
    clean, edited = make(extra_forward), make(extra_forward)
    step(clean, False)
    step(edited, True)
    assert_same_state(edited, snapshot(clean))
    restored = resumed(edited)
    for famo in (clean, edited, restored):
        finish(famo, 1)
    assert_same_state(edited, snapshot(clean))
    assert_same_state(restored, snapshot(clean))
    assert torch.equal(edited.weights, clean.weights)


@pytest.mark.parametrize("extra_forward", [True, False])
@pytest.mark.parametrize("form", ["tensor", "list", "dict"])
@pytest.mark.parametrize("call", ["loss", "backward"])
def test_losses_edited_after_the_call_change_nothing(
    call: str, form: str, extra_forward: bool
) -> None:
    def step(famo: FAMOWeighting, edit: bool) -> None:
        losses = leaf(BEFORE[0])
        if call == "loss":
            famo.loss(as_form(losses, form)).backward()
        else:
            famo.backward(as_form(losses, form))
        if edit:
            edit_in_place(losses)

    assert_three_runs_agree(step, extra_forward)


@pytest.mark.parametrize("extra_forward", [True, False])
def test_the_first_losses_of_a_window_edited_after_the_second_call_change_nothing(
    extra_forward: bool,
) -> None:
    def step(famo: FAMOWeighting, edit: bool) -> None:
        first, second = leaf(BEFORE[0]), leaf(BEFORE[1])
        famo.backward(first)
        famo.backward(second)
        if edit:
            edit_in_place(first)
            edit_in_place(second)

    assert_three_runs_agree(step, extra_forward)


@pytest.mark.parametrize("extra_forward", [True, False])
def test_a_static_loss_buffer_overwritten_every_step_trains_as_fresh_tensors_do(
    extra_forward: bool,
) -> None:
    # The pattern of CUDA-graph code: one loss tensor, written in place by each step's forward.
    static = torch.zeros(2, dtype=F64)
    parameter = torch.zeros((), dtype=F64, requires_grad=True)
    reused, fresh = make(extra_forward), make(extra_forward)
    for before, after in zip(BEFORE, AFTER, strict=True):
        with torch.no_grad():
            static.copy_(torch.tensor(before, dtype=F64))
        reused.backward(static + parameter)  # the graph reads the static buffer
        fresh.backward(torch.tensor(before, dtype=F64) + parameter)
        if extra_forward:
            with torch.no_grad():
                static.copy_(torch.tensor(after, dtype=F64))
                reused.update(static)
                fresh.update(torch.tensor(after, dtype=F64))
        assert_same_state(reused, snapshot(fresh))
        assert_same_state(resumed(reused), snapshot(fresh))


def test_after_losses_edited_after_update_change_nothing() -> None:
    def step(famo: FAMOWeighting, edit: bool) -> None:
        famo.backward(leaf(BEFORE[0]))
        after = torch.tensor(AFTER[0], dtype=F64)
        famo.update(after)
        if edit:
            edit_in_place(after)

    assert_three_runs_agree(step, True)


@pytest.mark.parametrize("assign", [False, True])
def test_a_checkpoint_edited_after_loading_changes_nothing(assign: bool) -> None:
    source = make(True)
    source.backward(leaf(BEFORE[0]))
    source.update(AFTER[0])
    source.backward(leaf(BEFORE[1]))  # losses waiting
    saved = source.state_dict()
    loaded = make(True)
    loaded.load_state_dict(saved, assign=assign)
    for value in saved.values():
        with torch.no_grad():
            value.zero_() if value.is_floating_point() else None
    assert_same_state(loaded, snapshot(source))
    for famo in (loaded, source):
        famo.update(AFTER[1])
        finish(famo, 2)
    assert_same_state(loaded, snapshot(source))


def test_bounds_given_as_a_tensor_and_edited_afterwards_change_nothing() -> None:
    bounds = torch.tensor([0.0, -1.0], dtype=F64)
    famo = FAMOWeighting(NAMES, dtype=F64, min_losses=bounds)
    assigned = FAMOWeighting(NAMES, dtype=F64)
    later = bounds.clone()
    assigned.min_losses = later
    bounds.fill_(5.0)
    later.fill_(5.0)
    assert famo.min_losses.tolist() == [0.0, -1.0] == assigned.min_losses.tolist()
    famo.reset_parameters()
    assigned.reset_parameters()
    assert famo.min_losses.tolist() == [0.0, -1.0] == assigned.min_losses.tolist()
