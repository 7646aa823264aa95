"""Evaluation without side effects: the objective and weights of a validation batch.

Whether a ``loss`` call trains is decided by grad mode alone, as autograd decides it: under
``torch.no_grad()``/``inference_mode()`` it returns the same value and changes nothing, so a
validation loop cannot shift the next logit step; ``.eval()`` changes nothing (fine-tuning with
frozen batch norm, or a loop that forgot ``model.train()`` after validation, still learns).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
import torch

from famo import FAMOWeighting
from tests.helpers import assert_same_state, snapshot

F64 = torch.float64


def _train_step(famo: FAMOWeighting, before: list[float], after: list[float]) -> None:
    famo.backward(torch.tensor(before, dtype=F64, requires_grad=True))
    famo.update(after)


EVALUATIONS: dict[str, Callable[[FAMOWeighting], AbstractContextManager[object]]] = {
    "no_grad": lambda famo: torch.no_grad(),
    "inference_mode": lambda famo: torch.inference_mode(),
}


@pytest.mark.parametrize("how", sorted(EVALUATIONS))
def test_a_validation_call_records_nothing_and_does_not_shift_the_next_step(how: str) -> None:
    plain = FAMOWeighting(2, dtype=F64)
    validated = FAMOWeighting(2, dtype=F64)
    for famo in (plain, validated):
        _train_step(famo, [1.0, 2.0], [0.8, 1.9])
    famo = validated
    famo.backward(torch.tensor([0.8, 1.9], dtype=F64, requires_grad=True))
    state = snapshot(famo)
    with EVALUATIONS[how](famo):
        validation = torch.tensor([5.0, 0.1], dtype=F64)
        value = famo.loss(validation)
    assert_same_state(famo, state)
    # The value is the training objective's: Σ w ℓ with the current weights.
    z, shifted = famo.weights, validation.detach() + famo.eps
    w = (z / shifted) / (z / shifted).sum()
    assert value.item() == pytest.approx(float(w @ validation.detach()), rel=1e-12)
    plain.backward(torch.tensor([0.8, 1.9], dtype=F64, requires_grad=True))
    for twin in (plain, validated):
        twin.update([0.6, 1.85])
    assert torch.equal(plain.logits, validated.logits)


def test_validation_losses_need_no_grad_and_may_leave_tasks_out_of_nothing() -> None:
    famo = FAMOWeighting(["a", "b"])
    with torch.no_grad():
        value = famo.loss({"a": torch.tensor(1.0), "b": torch.tensor(3.0)})
    assert value.item() == pytest.approx(1.5)  # w = (3/4, 1/4): 0.75 + 0.75
    assert not famo.pending


@pytest.mark.parametrize("call", ["backward", "loss"])
def test_eval_mode_changes_nothing_in_what_famo_learns(call: str) -> None:
    """A fine-tuning loop with the model in eval mode learns exactly as in train mode."""
    trained = {}
    for mode in ("train", "eval"):
        famo = FAMOWeighting(2, dtype=F64)
        famo.train(mode == "train")
        for before, after in (([1.0, 2.0], [0.8, 1.9]), ([0.8, 1.9], [0.5, 1.85])):
            losses = torch.tensor(before, dtype=F64, requires_grad=True)
            if call == "backward":
                famo.backward(losses)
            else:
                famo.loss(losses).backward()
            assert famo.pending
            famo.update(after)
        trained[mode] = famo
    assert trained["eval"].steps.tolist() == [2.0, 2.0]
    assert torch.equal(trained["eval"].logits, trained["train"].logits)


def test_the_weights_for_a_logger_are_named_and_need_no_sync() -> None:
    famo = FAMOWeighting(["seg", "depth"])
    tensors = famo.weights_dict()
    assert list(tensors) == ["famo/seg", "famo/depth"]
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in tensors.values())
    assert FAMOWeighting(2).weights_dict("w_", as_floats=True) == {"w_0": 0.5, "w_1": 0.5}
