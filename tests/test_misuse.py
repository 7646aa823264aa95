"""Misuse that users report with other FAMO implementations: each gets a clear message.

Every case checks the exception type, that the message explains the fix, and that the rejected
call left the object exactly as it was.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import famo as famo_package
from famo import FAMOWeighting
from tests.helpers import assert_same_state, snapshot


def _leaf(*values: float) -> torch.Tensor:
    return torch.tensor(values, requires_grad=True)


def test_negative_loss_without_bounds_points_to_min_losses() -> None:
    famo = FAMOWeighting(2)
    before = snapshot(famo)
    with pytest.raises(ValueError, match=r"min_losses") as info:
        famo.backward(_leaf(-0.5, 1.0))
    message = str(info.value)
    assert "-0.5" in message and "task 0" in message and "bound is 0.0" in message
    assert_same_state(famo, before)
    # The fix the message suggests works: a bound below the lowest value the loss can reach.
    fixed = FAMOWeighting(2, min_losses=[-1.0, 0.0])
    fixed.backward(_leaf(-0.5, 1.0))
    assert torch.isfinite(fixed.weights).all()


def test_a_loss_below_its_bound_names_the_task() -> None:
    famo = FAMOWeighting(["seg", "depth"])
    with pytest.raises(ValueError, match=r"task 'depth'.*min_losses"):
        famo.backward(
            {
                "seg": torch.tensor(1.0, requires_grad=True),
                "depth": torch.tensor(-1e-3, requires_grad=True),
            }
        )


def test_update_before_any_backward_says_what_to_call_first() -> None:
    famo = FAMOWeighting(2)
    before = snapshot(famo)
    with pytest.raises(RuntimeError, match=r"no losses recorded.*backward\(losses\)"):
        famo.update([0.5, 0.5])
    assert_same_state(famo, before)


def test_update_twice_after_one_backward_is_rejected() -> None:
    famo = FAMOWeighting(2)
    famo.backward(_leaf(1.0, 2.0))
    famo.update([0.9, 1.5])
    after_first = snapshot(famo)
    with pytest.raises(RuntimeError, match=r"`update` consumes the recorded losses"):
        famo.update([0.8, 1.4])
    assert_same_state(famo, after_first)


def test_update_on_an_object_that_updates_itself_is_rejected() -> None:
    famo = FAMOWeighting(2, extra_forward=False)
    famo.backward(_leaf(1.0, 2.0))
    before = snapshot(famo)
    with pytest.raises(RuntimeError, match=r"extra_forward=False"):
        famo.update([0.9, 1.5])
    assert_same_state(famo, before)


def test_famo_has_no_parameters_for_an_optimizer_to_pick_up() -> None:
    famo = FAMOWeighting(3)
    assert list(famo.parameters()) == []
    with pytest.raises(ValueError, match="empty parameter list"):
        torch.optim.Adam(famo.parameters())


class _ModelHoldingFamo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(3, 2)
        self.famo = FAMOWeighting(2, gamma=0.0)


def test_a_model_holding_famo_gives_its_optimizer_nothing_of_famo() -> None:
    torch.manual_seed(0)
    model = _ModelHoldingFamo()
    trunk_parameters = {id(p) for p in model.trunk.parameters()}
    assert {id(p) for p in model.parameters()} == trunk_parameters
    # Even an optimizer that decays every parameter it holds (and a step with a large lr) must
    # leave FAMO's state alone: the logits only move through `update`.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0, weight_decay=1.0)
    x = torch.randn(8, 3)
    model.famo.backward((model.trunk(x) ** 2).mean(dim=0) + 0.1)
    before = snapshot(model.famo)
    optimizer.step()
    model.zero_grad()
    assert_same_state(model.famo, before)
    # Its state still travels with the model's state_dict, as buffers.
    assert {k for k in model.state_dict() if k.startswith("famo.")} >= {"famo.logits"}


def test_backward_inside_no_grad_says_so() -> None:
    famo = FAMOWeighting(2)
    losses = _leaf(1.0, 2.0) * 1.0  # with history
    before = snapshot(famo)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"inside torch.no_grad\(\)"):
        famo.backward(losses)
    assert_same_state(famo, before)


def test_losses_from_a_no_grad_forward_say_why_they_cannot_be_used() -> None:
    model = nn.Linear(3, 2)
    famo = FAMOWeighting(2)
    with torch.no_grad():
        losses = model(torch.ones(1, 3)).squeeze(0).exp()
    with pytest.raises(RuntimeError, match=r"without autograd history.*no_grad"):
        famo.backward(losses)


def test_losses_from_inference_mode_are_rejected_clearly() -> None:
    model = nn.Linear(3, 2)
    famo = FAMOWeighting(2)
    with torch.inference_mode():
        losses = model(torch.ones(1, 3)).squeeze(0).exp()
    with pytest.raises(RuntimeError, match=r"inference_mode"):
        famo.backward(losses)


def test_a_frozen_model_is_named_as_a_possible_cause() -> None:
    model = nn.Linear(3, 2).requires_grad_(False)
    famo = FAMOWeighting(2)
    with pytest.raises(RuntimeError, match=r"frozen"):
        famo.backward(model(torch.ones(1, 3)).squeeze(0).exp())


def test_eval_mode_changes_nothing_in_famo() -> None:
    """``model.eval()`` on a model holding FAMO is the model's business: FAMO behaves the same."""
    trained, evaluated = FAMOWeighting(2), FAMOWeighting(2)
    evaluated.eval()
    for famo in (trained, evaluated):
        famo.backward(_leaf(1.0, 2.0))
        famo.update([0.5, 1.9])
    assert torch.equal(trained.logits, evaluated.logits)
    assert not torch.equal(trained.logits, torch.zeros(2))


def test_losses_with_grad_passed_to_update_are_used_as_values() -> None:
    """Forgetting ``no_grad`` around the recomputed losses is harmless: only values are read."""
    with_grad, without_grad = FAMOWeighting(2), FAMOWeighting(2)
    for famo in (with_grad, without_grad):
        famo.backward(_leaf(1.0, 2.0))
    with_grad.update(_leaf(0.5, 1.9) * 1.0)
    without_grad.update(torch.tensor([0.5, 1.9]))
    assert torch.equal(with_grad.logits, without_grad.logits)
    assert not with_grad.logits.requires_grad


def test_summed_loss_instead_of_per_task_losses_is_rejected() -> None:
    famo = FAMOWeighting(3)
    with pytest.raises(ValueError, match=r"shape \(3,\).*Found shape \(\)"):
        famo.backward(_leaf(1.0, 2.0, 3.0).sum())


def test_mapping_for_an_unnamed_object_explains_how_to_name_tasks() -> None:
    famo = FAMOWeighting(2)
    with pytest.raises(TypeError, match=r"FAMOWeighting\(\[name, \.\.\.\]\)"):
        famo.backward({"a": torch.tensor(1.0, requires_grad=True)})


class _FailingBackward(torch.autograd.Function):
    """Identity whose backward raises, like running out of memory half-way through backward."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("simulated: out of memory during backward")


def test_a_backward_that_runs_out_of_memory_records_nothing() -> None:
    """The usual OOM retry (halve the batch, try again) must match a run that never failed."""
    failing, clean = FAMOWeighting(2), FAMOWeighting(2)
    for famo in (failing, clean):  # one ordinary step first, so that there is history
        famo.backward(_leaf(1.0, 2.0))
        famo.update([0.8, 1.9])
    before = snapshot(failing)
    with pytest.raises(torch.OutOfMemoryError):
        failing.backward(_FailingBackward.apply(_leaf(3.0, 3.0)))
    assert_same_state(failing, before)
    for famo in (failing, clean):  # the retry
        famo.backward(_leaf(0.7, 1.8))
        famo.update([0.6, 1.7])
    assert_same_state(failing, snapshot(clean))


def test_without_extra_forward_a_failed_backward_changes_nothing() -> None:
    """All or nothing: the logit step it would have taken is not taken either, so a retry (or
    the next batch) takes it, exactly as if the failed call had never been made."""
    failing = FAMOWeighting(2, extra_forward=False)
    clean = FAMOWeighting(2, extra_forward=False)
    failing.backward(_leaf(1.0, 2.0))
    before = snapshot(failing)
    with pytest.raises(torch.OutOfMemoryError):
        failing.backward(_FailingBackward.apply(_leaf(0.8, 1.9)))
    assert_same_state(failing, before)
    clean.backward(_leaf(1.0, 2.0))
    for famo in (failing, clean):
        famo.backward(_leaf(0.7, 1.8))
        famo.backward(_leaf(0.6, 1.7))
    assert_same_state(failing, snapshot(clean))
    assert not torch.equal(clean.logits, torch.zeros(2))


def test_backward_twice_through_a_freed_graph_records_the_losses_once() -> None:
    famo = FAMOWeighting(2)
    losses = _leaf(1.0, 2.0) * 1.0
    famo.backward(losses)
    once = snapshot(famo)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        famo.backward(losses)
    assert_same_state(famo, once)


def test_bounds_given_as_a_tensor_with_grad_are_taken_as_constants() -> None:
    """Without a detach, the bounds buffer would join the caller's graph (and break deepcopy)."""
    bounds = torch.tensor([-1.0, 0.0], requires_grad=True)
    famo = FAMOWeighting(2, min_losses=bounds)
    assert not famo.min_losses.requires_grad and famo.min_losses.grad_fn is None
    copy.deepcopy(famo).backward(_leaf(0.5, 1.0))
    assert bounds.grad is None


@pytest.mark.parametrize("module", ["lightning", "transformers"])
def test_the_integrations_use_only_the_public_api(module: str) -> None:
    """They are what users copy: no private attribute of FAMOWeighting (``famo._pending``…)."""
    lines = (Path(famo_package.__file__).parent / f"{module}.py").read_text().splitlines()
    code = "\n".join(line for line in lines if not line.lstrip().startswith(("from ", "import ")))
    private = sorted(set(re.findall(r"\bfamo\._[a-z]\w*", code)))
    assert private == [], private
