"""Fuzzing: arbitrary calls of every public method, in arbitrary order, with arbitrary inputs.

A Hypothesis state machine drives one FAMOWeighting (validate=True) through ``loss``,
``backward``, ``update``, ``discard``, ``reset``, ``state_dict``/``load_state_dict`` (also of
corrupted checkpoints) and dtype moves, feeding them wrong types, shapes, dtypes, NaN/±inf,
huge and tiny values, wrong names, empty inputs and losses without grad. It checks:

- only TypeError, ValueError or RuntimeError escape, each naming the argument (or checkpoint)
  it rejects;
- a rejected call leaves the state exactly as it was (every buffer and the metadata);
- logits, Adam moments and weights stay finite, and the weights sum to 1;
- ``update`` fails exactly when nothing is recorded.

Beside it: every bad constructor argument is named in its error, and ``validate=False`` is
bit-identical to ``validate=True`` on valid input.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from famo import FAMOWeighting, _layout
from tests.helpers import assert_same_state, snapshot
from tests.strategies import Scenario, scenarios

DOCUMENTED = (TypeError, ValueError, RuntimeError)

# Gaps above the bound: ordinary, tiny, huge, and values no loss may take.
gaps = st.one_of(
    st.floats(min_value=1e-3, max_value=1e3),
    st.sampled_from([1e-30, 1e-12, 1e30, 1e38, 1e39, 0.0, -1.0, -1e-30]),
    st.sampled_from([math.nan, math.inf, -math.inf]),
)
float_dtypes = st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64])
any_dtypes = st.one_of(float_dtypes, st.sampled_from([torch.int64, torch.bool, torch.complex64]))
junk = st.sampled_from([None, "1.0", 1.0, b"xy", object(), [], {}, (), [[1.0]], set()])


def _scalar(value: float, dtype: torch.dtype, grad: bool) -> Any:
    try:
        tensor = torch.tensor(value, dtype=dtype)
    except (RuntimeError, OverflowError, ValueError):
        return value  # the dtype cannot hold it: pass the plain number instead
    if grad and tensor.is_floating_point():
        tensor.requires_grad_()
    return tensor


class FAMOMachine(RuleBasedStateMachine):
    """One FAMOWeighting under arbitrary use. ``self.pending``: whether losses are recorded."""

    checkpoints = Bundle("checkpoints")

    def __init__(self) -> None:
        super().__init__()
        self.famo: FAMOWeighting
        self.pending = False
        self.bounds: list[float] = []

    @initialize(
        k=st.integers(1, 4),
        named=st.booleans(),
        gamma=st.sampled_from([0.0, 1e-3, 1.0]),
        lr=st.sampled_from([0.025, 1.0]),
        bound=st.sampled_from([0.0, -1.0, 1e6]),
        eps=st.sampled_from([0.0, 1e-8]),
        allow_missing=st.booleans(),
        extra_forward=st.sampled_from([True, True, True, False]),
        dtype=st.sampled_from([torch.float32, torch.float64]),
    )
    def create(
        self,
        k: int,
        named: bool,
        gamma: float,
        lr: float,
        bound: float,
        eps: float,
        allow_missing: bool,
        extra_forward: bool,
        dtype: torch.dtype,
    ) -> None:
        self.names = [f"t{i}" for i in range(k)] if named else None
        self.bounds = [bound + i for i in range(k)]
        self.famo = FAMOWeighting(
            self.names if self.names is not None else k,
            lr=lr,
            gamma=gamma,
            min_losses=self.bounds,
            eps=eps,
            allow_missing_tasks=allow_missing,
            extra_forward=extra_forward,
            dtype=dtype,
        )

    # ---------------------------------------------------------------- inputs

    def _losses(self, data: st.DataObject, *, for_update: bool) -> Any:
        if data.draw(st.booleans(), label="well formed"):
            return self._good_losses(data, for_update=for_update)
        k = self.famo.num_tasks
        grad = data.draw(st.booleans() if for_update else st.sampled_from([True, True, False]))
        dtype = data.draw(float_dtypes, label="dtype")
        form = data.draw(
            st.sampled_from(["tensor", "tensor", "sequence", "mapping", "rows", "odd", "junk"]),
            label="form",
        )
        count = k + data.draw(st.sampled_from([0, 0, 0, -1, 1]), label="count offset")
        count = max(count, 0)
        values = [
            self.bounds[i % k] + data.draw(gaps, label=f"gap {i}") for i in range(max(count, 1))
        ]
        if form == "tensor":
            tensor = torch.tensor(values[:count], dtype=dtype)
            return tensor.requires_grad_() if grad else tensor
        if form == "rows":  # (micro_batches, k), as update accepts
            tensor = torch.tensor([values[:count]] * data.draw(st.integers(0, 2)), dtype=dtype)
            return tensor.requires_grad_() if grad else tensor
        if form == "sequence":
            return [_scalar(v, dtype, grad) for v in values[:count]]
        if form == "mapping":
            names = self.names if self.names is not None else [str(i) for i in range(k)]
            keys = data.draw(
                st.lists(st.sampled_from([*names, "bogus", ""]), unique=True, max_size=k + 1),
                label="keys",
            )
            return {
                key: _scalar(values[i % len(values)], dtype, grad) for i, key in enumerate(keys)
            }
        if form == "odd":
            odd_dtype = data.draw(any_dtypes, label="odd dtype")
            shape = data.draw(st.sampled_from([(), (k, 1), (0,), (1, k, 1), (k,)]), label="shape")
            return torch.ones(shape, dtype=odd_dtype)
        return data.draw(junk, label="junk")

    def _good_losses(self, data: st.DataObject, *, for_update: bool) -> Any:
        """Losses that should be accepted, so that the state keeps moving."""
        k = self.famo.num_tasks
        dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
        gap_values = data.draw(st.lists(st.floats(1e-3, 1e3), min_size=k, max_size=k), label="gaps")
        values = [bound + gap for bound, gap in zip(self.bounds, gap_values, strict=True)]
        form = data.draw(st.sampled_from(["tensor", "sequence", "mapping"]), label="form")
        if form == "mapping" and self.names is not None:
            keep = (
                data.draw(st.lists(st.booleans(), min_size=k, max_size=k), label="present")
                if self.famo.allow_missing_tasks
                else [True] * k
            )
            if not any(keep):
                keep[0] = True
            return {
                name: torch.tensor(v, dtype=dtype, requires_grad=not for_update)
                for name, v, kept in zip(self.names, values, keep, strict=True)
                if kept
            }
        if form == "sequence":
            return [torch.tensor(v, dtype=dtype, requires_grad=not for_update) for v in values]
        return torch.tensor(values, dtype=dtype, requires_grad=not for_update)

    def _call(self, action: Any, what: str) -> bool:
        """Run ``action``; on a documented error, check the message and that nothing changed."""
        before = snapshot(self.famo)
        dtype_before = self.famo.logits.dtype
        try:
            action()
        except DOCUMENTED as error:
            event(f"{what}: {type(error).__name__}")
            message = str(error)
            # Useful: it names the argument (in backticks) or the checkpoint it rejects.
            named = "`" in message or "The checkpoint" in message
            assert named and len(message) > 30, f"unhelpful message: {message!r}"
            assert_same_state(self.famo, before)
            assert self.famo.logits.dtype == dtype_before
            return False
        event(f"{what}: accepted")
        return True

    # ---------------------------------------------------------------- rules

    @rule(data=st.data(), through_backward=st.booleans())
    def record(self, data: st.DataObject, through_backward: bool) -> None:
        losses = self._losses(data, for_update=False)
        call = self.famo.backward if through_backward else self.famo.loss
        if self._call(lambda: call(losses), "record"):
            self.pending = True

    @rule(data=st.data(), skip=st.sampled_from([False, False, True, "tensor", "junk"]))
    def update(self, data: st.DataObject, skip: Any) -> None:
        new_losses = self._losses(data, for_update=True)
        if skip == "tensor":
            skip = torch.tensor(data.draw(st.booleans(), label="skip value"))
        elif skip == "junk":
            skip = data.draw(junk, label="skip junk")
        accepted = self._call(lambda: self.famo.update(new_losses, skip=skip), "update")
        if not self.famo.extra_forward or not self.pending:
            assert not accepted, "update must fail without recorded losses"
        if accepted:
            self.pending = False

    @precondition(lambda self: self.famo.extra_forward)
    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        """The usual loop: well-formed losses recorded, then an update with arbitrary ones."""
        losses = self._good_losses(data, for_update=False)
        if self._call(lambda: self.famo.backward(losses), "step backward"):
            self.pending = True
        self.update(data, skip=data.draw(st.sampled_from([False, False, True]), label="skip"))

    @rule()
    def discard(self) -> None:
        self.famo.discard()
        self.pending = False

    @rule()
    def reset(self) -> None:
        self.famo.reset()
        self.pending = False
        assert torch.equal(self.famo.logits, torch.zeros_like(self.famo.logits))

    @rule(target=checkpoints)
    def save(self) -> tuple[dict[str, Any], bool]:
        return snapshot(self.famo), self.pending

    @rule(checkpoint=checkpoints)
    def load(self, checkpoint: tuple[dict[str, Any], bool]) -> None:
        state, pending = checkpoint
        if state["logits"].dtype != self.famo.logits.dtype:
            self.famo.to(state["logits"].dtype)
        self.famo.load_state_dict(state)
        assert_same_state(self.famo, state)
        self.pending = pending

    @rule(
        checkpoint=checkpoints,
        damage=st.sampled_from(
            [
                "drop logits",
                "drop version",
                "nan logits",
                "short logits",
                "integer logits",
                "newer version",
                "version as a number",
                "other tasks",
                "names as text",
                "negative exp_avg_sq",
                "negative steps",
                "fractional count",
                "stepped without pending",
            ]
        ),
    )
    def load_damaged(self, checkpoint: tuple[dict[str, Any], bool], damage: str) -> None:
        state: dict[str, Any] = dict(checkpoint[0])
        if damage == "drop logits":
            del state["logits"]
        elif damage == "drop version":
            del state["format_version"]
        elif damage == "nan logits":
            state["logits"] = torch.full_like(state["logits"], math.nan)
        elif damage == "short logits":
            state["logits"] = state["logits"][1:]
        elif damage == "integer logits":
            state["logits"] = state["logits"].long()
        elif damage == "newer version":
            state["format_version"] = state["format_version"] + 1
        elif damage == "version as a number":
            state["format_version"] = 3
        elif damage == "other tasks":
            state["task_names_utf8"] = _layout.encode_task_names(
                ("x",) * self.famo.num_tasks, torch.device("cpu")
            )
        elif damage == "names as text":
            state["task_names_utf8"] = "a,b"
        elif damage == "negative exp_avg_sq":
            state["exp_avg_sq"] = -1.0 - state["exp_avg_sq"]
        elif damage == "negative steps":
            state["adam_step"] = -1.0 - state["adam_step"]
        elif damage == "fractional count":
            state["window_count"] = state["window_count"] + 0.5
        else:
            state["window_stepped"] = torch.tensor(True)
            state["window_count"] = torch.zeros_like(state["window_count"])
            state["window_sum"] = torch.zeros_like(state["window_sum"])
        assert not self._call(lambda: self.famo.load_state_dict(state), "load damaged"), damage

    @rule(checkpoint=checkpoints)
    def load_with_an_unexpected_key(self, checkpoint: tuple[dict[str, Any], bool]) -> None:
        """As for any module: reported under strict=False, and the rest loads."""
        state, pending = checkpoint
        if state["logits"].dtype != self.famo.logits.dtype:
            self.famo.to(state["logits"].dtype)
        result = self.famo.load_state_dict({**state, "head.weight": torch.zeros(2)}, strict=False)
        assert result.unexpected_keys == ["head.weight"] and result.missing_keys == []
        assert_same_state(self.famo, state)
        self.pending = pending

    @rule(dtype=st.sampled_from([torch.float16, torch.bfloat16]))
    def half_precision_model(self, dtype: torch.dtype) -> None:
        """``model.half()`` on a model holding FAMO must not round its state to 16 bits."""
        before = snapshot(self.famo)
        self.famo.to(dtype)
        assert_same_state(self.famo, before)

    @precondition(lambda self: self.famo.logits.dtype == torch.float32)
    @rule()
    def double(self) -> None:
        self.famo.double()

    @precondition(lambda self: self.famo.logits.dtype == torch.float64)
    @rule()
    def back_to_float32(self) -> None:
        """Refused, changing nothing, where float64 state holds values float32 cannot."""
        self._call(self.famo.float, "float")

    # ---------------------------------------------------------------- invariants

    @invariant()
    def state_is_finite_and_weights_sum_to_one(self) -> None:
        for name in ("logits", "exp_avg", "exp_avg_sq", "steps", "pending_sum", "pending_count"):
            assert torch.isfinite(getattr(self.famo, name)).all(), name
        weights = self.famo.weights
        assert torch.isfinite(weights).all() and (weights >= 0).all()
        assert abs(weights.double().sum().item() - 1.0) < 1e-5
        assert self.famo.pending == self.pending


FAMOMachine.TestCase.settings = settings(
    settings.default,
    max_examples=settings.default.max_examples * 5,  # ci: 200 runs of up to 25 calls
    stateful_step_count=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_arbitrary_call_sequences_fail_clearly_and_keep_the_state_sound = FAMOMachine.TestCase


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"tasks": ["a", "b", "a"]}, ValueError),
        ({"tasks": []}, ValueError),
        ({"tasks": 0}, ValueError),
        ({"tasks": True}, TypeError),
        ({"tasks": "ab"}, TypeError),
        ({"tasks": ["a", ""]}, TypeError),
        ({"tasks": 2, "lr": -1.0}, ValueError),
        ({"tasks": 2, "lr": math.nan}, ValueError),
        ({"tasks": 2, "gamma": "huge"}, ValueError),
        ({"tasks": 2, "eps": "1e-8"}, TypeError),
        ({"tasks": 2, "betas": (0.9, 1.0)}, ValueError),
        ({"tasks": 2, "betas": 0.9}, TypeError),
        ({"tasks": 2, "adam_eps": 0.0}, ValueError),
        ({"tasks": 2, "min_losses": [0.0]}, ValueError),
        ({"tasks": 2, "min_losses": [0.0, math.inf]}, ValueError),
        ({"tasks": 2, "min_losses": "low"}, TypeError),
        ({"tasks": 2, "validate": 1}, TypeError),
        ({"tasks": 2, "dtype": torch.float16}, TypeError),
        ({"tasks": 2, "process_group": "world"}, TypeError),
    ],
)
def test_bad_constructor_arguments_name_the_parameter(
    kwargs: dict[str, Any], error: type[Exception]
) -> None:
    tasks = kwargs.pop("tasks")
    name = next(iter(kwargs), "tasks")
    with pytest.raises(error, match=f"`{name}`"):
        FAMOWeighting(tasks, **kwargs)


@given(scenario=scenarios(max_tasks=8), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_the_unchecked_fast_path_equals_the_checked_one_on_valid_input(
    scenario: Scenario, dtype: torch.dtype
) -> None:
    """``validate=False`` only drops the checks: on valid losses it is bit-identical."""
    objects = [
        FAMOWeighting(
            scenario.num_tasks,
            lr=scenario.lr,
            gamma=scenario.gamma,
            min_losses=scenario.min_losses,
            validate=validate,
            dtype=dtype,
        )
        for validate in (True, False)
    ]
    for before, after in scenario.steps:
        grads = []
        for famo in objects:
            leaf = torch.tensor(before, dtype=dtype, requires_grad=True)
            famo.backward(leaf)
            grads.append(leaf.grad)
            famo.update(torch.tensor(after, dtype=dtype))
        assert grads[0] is not None and grads[1] is not None
        assert torch.equal(grads[0], grads[1])
    assert_same_state(objects[1], snapshot(objects[0]))
