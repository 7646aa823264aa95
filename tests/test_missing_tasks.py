"""Tasks missing from a batch (``allow_missing_tasks=True`` with named losses).

The present tasks are weighted among themselves; the logit step uses only the tasks present both
before and after; the others keep their logits, Adam moments and step counts. Checked against a
plain reference: one scalar ``torch.optim.Adam`` per task, stepped only when its task counts.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from famo import FAMOWeighting

DTYPE = torch.float64


class PerTaskReference:
    """``docs/design.md`` §1 restricted to a subset S of tasks per step, with an Adam per task."""

    def __init__(self, k: int, lr: float, gamma: float, bounds: list[float]) -> None:
        self.logits = [torch.zeros(1, dtype=DTYPE, requires_grad=True) for _ in range(k)]
        self.optimizers = [
            torch.optim.Adam([logit], lr=lr, weight_decay=gamma, foreach=False)
            for logit in self.logits
        ]
        self.bounds = bounds

    def _z(self, tasks: list[int]) -> torch.Tensor:
        return torch.softmax(torch.cat([self.logits[i].detach() for i in tasks]), dim=0)

    def weights(self, losses: dict[int, float]) -> dict[int, float]:
        tasks = sorted(losses)
        z = self._z(tasks)
        shifted = torch.tensor([losses[i] - self.bounds[i] + 1e-8 for i in tasks], dtype=DTYPE)
        w = (z / shifted) / (z / shifted).sum()
        return dict(zip(tasks, w.tolist(), strict=True))

    def update(self, before: dict[int, float], after: dict[int, float]) -> None:
        tasks = sorted(set(before) & set(after))
        if not tasks:
            return
        z = self._z(tasks)
        delta = torch.tensor(
            [
                math.log(before[i] - self.bounds[i] + 1e-8)
                - math.log(after[i] - self.bounds[i] + 1e-8)
                for i in tasks
            ],
            dtype=DTYPE,
        )
        grad = z * (delta - torch.dot(z, delta))
        for i, g in zip(tasks, grad, strict=True):
            self.logits[i].grad = g.reshape(1).clone()
            self.optimizers[i].step()


# One step: which tasks are present before and after, and their losses (gaps above bounds).
presence = st.lists(st.booleans(), min_size=4, max_size=4)
gap_lists = st.lists(st.floats(1e-3, 1e3), min_size=4, max_size=4)
steps = st.lists(st.tuples(presence, gap_lists, presence, gap_lists), min_size=1, max_size=8)


@given(steps=steps, gamma=st.sampled_from([0.0, 1e-3, 0.1]), bound=st.sampled_from([0.0, -2.0]))
@example(  # a task present only before, one only after, one never: none of them may move
    steps=[([True, True, True, False], [1.0] * 4, [True, True, False, True], [0.5] * 4)],
    gamma=0.1,
    bound=0.0,
)
@example(  # nothing in common: no task moves, and nothing becomes NaN
    steps=[([True, False, False, False], [1.0] * 4, [False, True, True, True], [0.5] * 4)],
    gamma=0.0,
    bound=0.0,
)
def test_missing_tasks_follow_the_per_task_reference_and_never_produce_nan(
    steps: list[tuple[list[bool], list[float], list[bool], list[float]]],
    gamma: float,
    bound: float,
) -> None:
    names = ["a", "b", "c", "d"]
    bounds = [bound] * 4
    famo = FAMOWeighting(
        names, gamma=gamma, min_losses=bounds, allow_missing_tasks=True, dtype=DTYPE
    )
    reference = PerTaskReference(4, famo.lr, gamma, bounds)
    for present_before, gaps_before, present_after, gaps_after in steps:
        before = {i: bound + g for i, g in enumerate(gaps_before) if present_before[i]}
        after = {i: bound + g for i, g in enumerate(gaps_after) if present_after[i]}
        if not before:
            before = {0: bound + gaps_before[0]}
        leaves = {
            names[i]: torch.tensor(v, dtype=DTYPE, requires_grad=True) for i, v in before.items()
        }
        state = {
            name: getattr(famo, name).clone()
            for name in ("logits", "exp_avg", "exp_avg_sq", "steps")
        }
        famo.backward(leaves)
        expected = reference.weights(before)
        for i, weight in expected.items():
            grad = leaves[names[i]].grad
            assert grad is not None
            assert math.isclose(grad.item(), weight, rel_tol=1e-12, abs_tol=1e-15)
        if after:
            famo.update({names[i]: v for i, v in after.items()})
        else:
            famo.discard()  # a batch where every task is missing afterwards: nothing to learn
        reference.update(before, after)
        moved = set(before) & set(after)
        for name, old in state.items():
            new = getattr(famo, name)
            assert torch.isfinite(new).all(), name
            for i in set(range(4)) - moved:
                assert new[i] == old[i], f"{name} of absent task {names[i]} changed"
        expected_logits = torch.cat([logit.detach() for logit in reference.logits])
        torch.testing.assert_close(famo.logits, expected_logits, rtol=0.0, atol=1e-12)
        weights = famo.weights
        assert torch.isfinite(weights).all() and abs(weights.sum().item() - 1.0) < 1e-12


loss_runs = st.lists(st.lists(st.floats(1e-2, 1e2), min_size=3, max_size=3), min_size=2, max_size=8)


@given(runs=loss_runs, dtype=st.sampled_from([torch.float32, torch.float64]))
def test_with_every_task_present_allowing_missing_tasks_changes_nothing(
    runs: list[list[float]], dtype: torch.dtype
) -> None:
    """The option costs nothing to tasks that are always there: the same weights bit for bit,
    the same logits up to rounding (a per-task Adam runs the explicit formulas where the default
    path runs torch's fused kernel)."""
    names = ["a", "b", "c"]
    plain = FAMOWeighting(names, dtype=dtype)
    allowing = FAMOWeighting(names, allow_missing_tasks=True, dtype=dtype)
    for before, after in itertools.pairwise(runs):
        grads = []
        for famo in (plain, allowing):
            leaves = torch.tensor(before, dtype=dtype, requires_grad=True)
            famo.backward(dict(zip(names, leaves.unbind(), strict=True)))
            assert leaves.grad is not None
            grads.append(leaves.grad)
            famo.update(dict(zip(names, after, strict=True)))
        assert torch.equal(grads[0], grads[1])
        tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
        torch.testing.assert_close(plain.logits, allowing.logits, **tolerance)
        torch.testing.assert_close(plain.exp_avg_sq, allowing.exp_avg_sq, **tolerance)
        # Equal logits give bit-identical weights for the next step's losses.
        plain.logits.copy_(allowing.logits)


@given(runs=loss_runs)
def test_a_task_that_never_shows_up_does_not_disturb_the_others(runs: list[list[float]]) -> None:
    """Three tasks plus one that is always missing behave like the three tasks alone."""
    three = FAMOWeighting(["a", "b", "c"], dtype=DTYPE)
    four = FAMOWeighting(["a", "b", "c", "ghost"], allow_missing_tasks=True, dtype=DTYPE)
    for before, after in itertools.pairwise(runs):
        grads = []
        for famo in (three, four):
            leaves = torch.tensor(before, dtype=DTYPE, requires_grad=True)
            famo.backward(dict(zip("abc", leaves.unbind(), strict=True)))
            assert leaves.grad is not None
            grads.append(leaves.grad)
            famo.update(dict(zip("abc", after, strict=True)))
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-14, atol=0.0)
    torch.testing.assert_close(four.logits[:3], three.logits, rtol=1e-14, atol=1e-16)
    assert four.logits[3] == 0.0 and four.steps[3] == 0.0


def test_accumulated_calls_average_each_task_over_the_calls_it_appeared_in() -> None:
    famo = FAMOWeighting(["a", "b"], gamma=0.0, allow_missing_tasks=True, dtype=DTYPE)
    twin = FAMOWeighting(["a", "b"], gamma=0.0, dtype=DTYPE)
    one = torch.tensor(1.0, dtype=DTYPE, requires_grad=True)
    famo.loss({"a": one * 2.0, "b": one * 4.0})
    famo.loss({"a": one * 4.0})  # b missing from the second micro-batch
    twin.loss({"a": one * 3.0, "b": one * 4.0})  # the per-task means
    for f in (famo, twin):
        f.update({"a": 1.0, "b": 3.0})
    assert torch.equal(famo.logits, twin.logits)


def test_leaving_tasks_out_needs_the_option_and_the_message_names_it() -> None:
    famo = FAMOWeighting(["a", "b"])
    with pytest.raises(ValueError, match=r"none for \['b'\].*allow_missing_tasks=True"):
        famo.backward({"a": torch.tensor(1.0, requires_grad=True)})


def test_a_batch_with_no_task_at_all_is_rejected() -> None:
    famo = FAMOWeighting(["a", "b"], allow_missing_tasks=True)
    with pytest.raises(ValueError, match="at least one task"):
        famo.backward({})


def test_missing_tasks_survive_a_checkpoint_round_trip() -> None:
    names = ["a", "b", "c"]
    famo = FAMOWeighting(names, allow_missing_tasks=True)
    one = torch.tensor(1.0, requires_grad=True)
    famo.backward({"a": one * 1.0, "c": one * 2.0})
    famo.update({"a": 0.5, "c": 1.9})
    famo.backward({"a": one * 1.0, "b": one * 3.0})  # pending, b's first appearance
    restored = FAMOWeighting(names, allow_missing_tasks=True)
    restored.load_state_dict(famo.state_dict())
    for f in (famo, restored):
        f.update({"a": 0.9, "b": 2.0, "c": 1.0})
    assert torch.equal(famo.logits, restored.logits)
    assert famo.steps.tolist() == [2.0, 1.0, 1.0]


@given(
    before=st.floats(0.1, 10.0),
    after=st.floats(0.1, 10.0),
    absent=st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_tied_improvements_of_the_present_tasks_leave_the_logits_alone(
    before: float, after: float, absent: list[bool]
) -> None:
    """Also when the first task is absent (the centring once used its meaningless entry)."""
    absent[0] = True
    if all(absent):
        absent[1] = False
    names = ["a", "b", "c", "d"]
    famo = FAMOWeighting(names, gamma=0.0, allow_missing_tasks=True, dtype=torch.float64)
    present = [name for name, out in zip(names, absent, strict=True) if not out]
    famo.backward(
        {name: torch.tensor(before, dtype=torch.float64, requires_grad=True) for name in present}
    )
    famo.update(dict.fromkeys(present, after))
    assert torch.equal(famo.logits, torch.zeros(4, dtype=torch.float64))
