"""``docs/design.md`` §8: every bad input gets a clear error before anything changes."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from famo import FAMOWeighting
from tests.helpers import assert_same_state, snapshot

NAMES = ["seg", "depth", "normal"]


def grad_losses(*values: float) -> torch.Tensor:
    return torch.tensor(values, requires_grad=True)


def famo_with_history() -> FAMOWeighting:
    """Not at its initial state, with losses pending: a rejected call must keep all of it."""
    famo = FAMOWeighting(NAMES, min_losses=[0.0, -1.0, 0.0])
    famo.backward(grad_losses(1.0, 2.0, 3.0))
    famo.update([0.9, 1.5, 2.0])
    famo.backward(grad_losses(0.9, 1.5, 2.0))
    return famo


BAD_LOSSES: list[tuple[str, Any, type[Exception], str]] = [
    ("too few", grad_losses(1.0, 2.0), ValueError, r"shape \(3,\), one loss per task.*\(2,\)"),
    (
        "too many in a list",
        [grad_losses(1.0)[0]] * 4,
        ValueError,
        "3 entries, one per task. Found 4",
    ),
    ("2-D", torch.ones(3, 1, requires_grad=True), ValueError, r"Found shape \(3, 1\)"),
    ("integers", torch.tensor([1, 2, 3]), TypeError, "floating-point dtype.*torch.int64"),
    ("a string", "losses", TypeError, "Found str"),
    ("a number", 3.0, TypeError, "Found float"),
    ("not scalars", [torch.ones(2, requires_grad=True)] * 3, ValueError, "one scalar loss"),
    ("numbers in backward", [1.0, 2.0, 3.0], TypeError, "scalar tensors. Found float"),
    ("unknown name", {"seg": 1.0, "depht": 2.0}, ValueError, r"Found unknown \['depht'\]"),
    (
        "missing name",
        {"seg": grad_losses(1.0)[0], "depth": grad_losses(2.0)[0]},
        ValueError,
        r"Found none for \['normal'\].*allow_missing_tasks=True",
    ),
    ("nan", grad_losses(1.0, math.nan, 3.0), ValueError, "finite. Found nan for task 'depth'"),
    ("inf", grad_losses(1.0, 2.0, math.inf), ValueError, "finite. Found inf for task 'normal'"),
    ("bound - eps", grad_losses(-1e-8, 2.0, 3.0), ValueError, "for task 'seg'.*min_losses"),
    ("below the bound", grad_losses(1.0, -2.0, 3.0), ValueError, "-2.0 for task 'depth'"),
    ("no grad", torch.tensor([1.0, 2.0, 3.0]), RuntimeError, "should require grad"),
    ("empty", [], ValueError, "3 entries, one per task. Found 0"),
]


@pytest.mark.parametrize(
    ("losses", "error", "message"),
    [case[1:] for case in BAD_LOSSES],
    ids=[case[0] for case in BAD_LOSSES],
)
def test_bad_losses_in_backward_raise_and_change_nothing(
    losses: Any, error: type[Exception], message: str
) -> None:
    famo = famo_with_history()
    before = snapshot(famo)
    with pytest.raises(error, match=message):
        famo.backward(losses)
    assert_same_state(famo, before)


BAD_NEW_LOSSES: list[tuple[str, Any, type[Exception], str]] = [
    ("too few", [1.0, 2.0], ValueError, "3 entries, one per task. Found 2"),
    ("nan", [1.0, math.nan, 3.0], ValueError, "finite. Found nan for task 'depth'"),
    ("at the bound", [1.0, -1.0, 3.0], ValueError, "-1.0 for task 'depth', whose bound is -1.0"),
    ("bad rows", torch.ones(2, 4), ValueError, r"shape \(micro_batches, 3\).*\(2, 4\)"),
    ("no rows", torch.ones(0, 3), ValueError, r"at least one row. Found shape \(0, 3\)"),
    ("a bool", [True, 1.0, 1.0], TypeError, "Found bool for task 'seg'"),
]


@pytest.mark.parametrize(
    ("new_losses", "error", "message"),
    [case[1:] for case in BAD_NEW_LOSSES],
    ids=[case[0] for case in BAD_NEW_LOSSES],
)
def test_bad_losses_in_update_raise_and_change_nothing(
    new_losses: Any, error: type[Exception], message: str
) -> None:
    famo = famo_with_history()
    before = snapshot(famo)
    with pytest.raises(error, match=message):
        famo.update(new_losses)
    assert_same_state(famo, before)


def test_update_with_nothing_recorded_is_a_call_order_error() -> None:
    famo = FAMOWeighting(2)
    with pytest.raises(RuntimeError, match=r"no losses recorded\. Call `backward"):
        famo.update([1.0, 1.0])


def test_update_twice_is_a_call_order_error_and_the_second_changes_nothing() -> None:
    famo = famo_with_history()
    famo.update([0.8, 1.4, 1.9])
    before = snapshot(famo)
    with pytest.raises(RuntimeError, match="no losses recorded"):
        famo.update([0.7, 1.3, 1.8])
    assert_same_state(famo, before)


def test_mapping_needs_task_names() -> None:
    famo = FAMOWeighting(2)
    with pytest.raises(TypeError, match="has no task names"):
        famo.backward({"a": grad_losses(1.0)[0], "b": grad_losses(1.0)[0]})


def test_skip_must_be_a_bool() -> None:
    famo = famo_with_history()
    before = snapshot(famo)
    with pytest.raises(TypeError, match="`skip` should be a bool"):
        famo.update([1.0, 1.0, 1.0], skip=1)  # type: ignore[arg-type]
    assert_same_state(famo, before)


BAD_CONSTRUCTION: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    ("zero tasks", lambda: FAMOWeighting(0), ValueError, "`tasks` should be at least 1. Found 0"),
    ("a string", lambda: FAMOWeighting("seg"), TypeError, "sequence of task names"),
    ("no names", lambda: FAMOWeighting([]), ValueError, "at least one task"),
    ("duplicates", lambda: FAMOWeighting(["a", "a"]), ValueError, r"\['a'\] more than once"),
    (
        "empty name",
        lambda: FAMOWeighting(["a", ""]),
        TypeError,
        "non-empty strings without NUL. Found ''",
    ),
    ("negative lr", lambda: FAMOWeighting(2, lr=-1.0), ValueError, "`lr = -1.0`"),
    ("nan lr", lambda: FAMOWeighting(2, lr=math.nan), ValueError, "`lr = nan`"),
    ("negative gamma", lambda: FAMOWeighting(2, gamma=-1e-3), ValueError, "`gamma = -0.001`"),
    (
        "unknown gamma",
        lambda: FAMOWeighting(2, gamma="offical"),
        ValueError,
        r"one of \['official', 'paper'\]. Found 'offical'",
    ),
    ("negative eps", lambda: FAMOWeighting(2, eps=-1.0), ValueError, "`eps = -1.0`"),
    ("zero adam_eps", lambda: FAMOWeighting(2, adam_eps=0.0), ValueError, "`adam_eps` should"),
    ("beta of 1", lambda: FAMOWeighting(2, betas=(0.9, 1.0)), ValueError, r"in \[0, 1\)"),
    (
        "bounds count",
        lambda: FAMOWeighting(3, min_losses=[0.0, 1.0]),
        ValueError,
        "`min_losses` should have 3 entries, one per task. Found 2.",
    ),
    (
        "bounds nan",
        lambda: FAMOWeighting(2, min_losses=[0.0, math.nan]),
        ValueError,
        "`min_losses` should be finite",
    ),
    ("bounds text", lambda: FAMOWeighting(2, min_losses="0"), TypeError, "`min_losses` should"),
    ("half state", lambda: FAMOWeighting(2, dtype=torch.float16), TypeError, "float32 or"),
    ("flag", lambda: FAMOWeighting(2, validate=1), TypeError, "`validate` should be True"),
    ("group", lambda: FAMOWeighting(2, process_group="world"), TypeError, "`process_group`"),
]


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [case[1:] for case in BAD_CONSTRUCTION],
    ids=[case[0] for case in BAD_CONSTRUCTION],
)
def test_bad_hyper_parameters_are_rejected_with_the_value(
    build: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        build()


def test_mapping_order_follows_the_declaration_not_the_mapping() -> None:
    by_name, in_order = FAMOWeighting(NAMES), FAMOWeighting(NAMES)
    normal, seg, depth = grad_losses(3.0, 1.0, 2.0).unbind()
    by_name.backward({"normal": normal, "seg": seg, "depth": depth})
    in_order.backward(grad_losses(1.0, 2.0, 3.0))
    assert torch.equal(by_name.pending_sum, in_order.pending_sum)


def test_losses_of_any_floating_dtype_are_promoted_to_the_state() -> None:
    famo = FAMOWeighting(2)
    losses = torch.tensor([1.0, 2.0], dtype=torch.bfloat16, requires_grad=True)
    objective = famo.loss(losses)
    assert objective.dtype == torch.float32
    objective.backward()
    assert losses.grad is not None and losses.grad.dtype == torch.bfloat16


def test_a_loss_exactly_at_its_bound_is_usable_while_eps_is_positive() -> None:
    """log(ℓ − b + ε) is finite at ℓ = b: a confident batch's cross-entropy of exactly 0.0."""
    famo = FAMOWeighting(2)
    famo.backward(grad_losses(0.0, 1.0))
    famo.update([0.0, 0.5])
    assert torch.isfinite(famo.logits).all() and famo.weights[0] > famo.weights[1]
    strict = FAMOWeighting(2, eps=0.0)
    with pytest.raises(ValueError, match="bounds plus eps should be > 0"):
        strict.backward(grad_losses(0.0, 1.0))


def test_a_rejected_update_keeps_the_recorded_losses_and_names_discard() -> None:
    famo = famo_with_history()
    before = snapshot(famo)
    with pytest.raises(ValueError, match=r"finite.*call `discard\(\)` to drop them"):
        famo.update([math.nan, 1.0, 1.0])
    assert_same_state(famo, before)
    famo.discard()  # what the message suggests: the next step starts afresh
    famo.backward(grad_losses(1.0, 2.0, 3.0))
    assert famo.pending_count.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("name", "value", "error", "message"),
    [
        ("lr", math.nan, ValueError, "`lr = nan`"),
        ("lr", -0.1, ValueError, "`lr = -0.1`"),
        ("gamma", "officiall", ValueError, "one of"),
        ("gamma", [1e-3], TypeError, "`gamma` should be a number"),
        ("eps", math.inf, ValueError, "`eps = inf`"),
        ("adam_eps", 0.0, ValueError, "`adam_eps` should be > 0"),
        ("betas", (0.9, 1.5), ValueError, r"in \[0, 1\)"),
        ("validate", 1, TypeError, "`validate` should be True or False"),
    ],
)
def test_hyper_parameters_are_checked_when_assigned(
    name: str, value: object, error: type[Exception], message: str
) -> None:
    famo = famo_with_history()
    before = snapshot(famo)
    old = getattr(famo, name)
    with pytest.raises(error, match=message):
        setattr(famo, name, value)
    assert getattr(famo, name) == old
    assert_same_state(famo, before)


@pytest.mark.parametrize("flag", ["extra_forward", "allow_missing_tasks", "task_names"])
def test_what_shapes_the_state_is_read_only(flag: str) -> None:
    famo = FAMOWeighting(2)
    with pytest.raises(AttributeError):
        setattr(famo, flag, True)


def test_assigned_hyper_parameters_become_plain_floats_and_are_used() -> None:
    numpy = pytest.importorskip("numpy")
    famo = FAMOWeighting(2)
    famo.lr = numpy.float64(0.5)  # type: ignore[assignment]
    famo.gamma = "official"  # type: ignore[assignment]
    famo.eps = torch.tensor(0.5)  # type: ignore[assignment]
    assert (type(famo.lr), famo.lr, famo.gamma, famo.eps) == (float, 0.5, 1e-5, 0.5)
    famo.backward(grad_losses(1.0, 1.0))
    famo.update([0.5, 0.75])
    assert famo.logits[1].item() == pytest.approx(0.5, rel=1e-3)  # a first Adam step is ±lr
    assert "lr=0.5" in repr(famo)
