"""The learning schedule: ``warmup_steps`` and ``update_every``, against the tests' reference.

A *learning step* is an ``update`` that is not skipped, or (``extra_forward=False``) the logit
step a ``loss`` call takes. The first ``warmup_steps`` of them consume their losses as
``discard()`` would; after them the logits take one Adam step per block of ``update_every``
learning steps, from the block's mean log-improvements (per task, over the steps where it was
present). ``tests/reference.py``'s ``ScheduleReference`` writes that contract out plainly.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st
from torch import Tensor

from famo import FAMOWeighting
from tests.helpers import K, make_model, task_losses
from tests.reference import ScheduleReference
from tests.strategies import (
    LEARNING_CALLS,
    ScheduleRun,
    ScheduleStep,
    schedule_runs,
)

F32, F64 = torch.float32, torch.float64


# ---------------------------------------------------------------------- driving an object


def names_of(run: ScheduleRun) -> list[str] | None:
    """Tasks by name when they may be missing (a mapping of losses), else by count."""
    return [f"task{i}" for i in range(run.num_tasks)] if run.allow_missing_tasks else None


def build(run: ScheduleRun, **overrides: Any) -> FAMOWeighting:
    options: dict[str, Any] = {
        "lr": run.lr,
        "gamma": run.gamma,
        "min_losses": run.min_losses,
        "warmup_steps": run.warmup_steps,
        "update_every": run.update_every,
        "allow_missing_tasks": run.allow_missing_tasks,
        "dtype": F64,
    }
    options.update(overrides)
    names = names_of(run)
    return FAMOWeighting(names if names is not None else run.num_tasks, **options)


def record(famo: FAMOWeighting, losses: Mapping[int, float], names: list[str] | None) -> Tensor:
    """``famo.backward`` on leaf losses; returns ∂L/∂ℓ of the present tasks, in task order."""
    dtype = famo.logits.dtype
    tasks = sorted(losses)
    if names is None:
        stacked = torch.tensor([losses[i] for i in tasks], dtype=dtype, requires_grad=True)
        famo.backward(stacked)
        assert stacked.grad is not None
        return stacked.grad
    leaves = [torch.tensor(losses[i], dtype=dtype, requires_grad=True) for i in tasks]
    famo.backward({names[i]: leaf for i, leaf in zip(tasks, leaves, strict=True)})
    grads = [leaf.grad for leaf in leaves]
    assert all(grad is not None for grad in grads)
    return torch.stack(grads)  # type: ignore[arg-type]


def after_losses(losses: Mapping[int, float], names: list[str] | None) -> Any:
    if names is None:
        return [losses[i] for i in sorted(losses)]
    return {names[i]: value for i, value in losses.items()}


def update(famo: FAMOWeighting, step: ScheduleStep, names: list[str] | None) -> None:
    """``update`` as the step says: plain, or skipped by a bool or by a 0-dim bool tensor."""
    after = after_losses(step.present("after"), names)
    if step.call == "learn":
        famo.update(after)
    elif step.call == "skip":
        famo.update(after, skip=True)
    else:
        famo.update(after, skip=torch.tensor(step.call == "skip tensor"))


@contextmanager
def cpu_threads(count: int | None) -> Iterator[None]:
    """One thread runs torch's fused Adam kernel on the CPU; several run Adam op by op."""
    threads = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def reload(famo: FAMOWeighting, make: Any) -> FAMOWeighting:
    """A fresh object from ``famo``'s checkpoint, through a file as a real resume is."""
    buffer = io.BytesIO()
    torch.save(famo.state_dict(), buffer)
    buffer.seek(0)
    fresh: FAMOWeighting = make()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


def assert_same_schedule_state(
    famo: FAMOWeighting, other: FAMOWeighting, *, but: tuple[str, ...] = ()
) -> None:
    """Bit for bit: every state_dict entry (except ``but``), the weights and the views."""
    ours, theirs = famo.state_dict(), other.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours.keys() - set(but):
        assert torch.equal(ours[key], theirs[key]), key
    for view in ("weights", "logits", "exp_avg", "exp_avg_sq", "steps"):
        assert torch.equal(getattr(famo, view), getattr(other, view)), view
    for view in ("pending_sum", "pending_count"):
        assert torch.equal(getattr(famo, view), getattr(other, view)), view
    assert famo.pending == other.pending


# ---------------------------------------------------------------------- warm-up is discard()


@pytest.mark.parametrize("threads", [1, None], ids=["one thread", "default threads"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
@given(run=schedule_runs(max_tasks=4, max_steps=10, warmups=st.integers(1, 5)))
@example(  # a skipped update (bool or tensor) in the warm-up is not one of its steps
    run=ScheduleRun(
        num_tasks=2,
        lr=0.1,
        gamma=1e-3,
        min_losses=(0.0, 0.0),
        warmup_steps=2,
        update_every=1,
        allow_missing_tasks=False,
        steps=(
            ScheduleStep((1.0, 2.0), (0.9, 1.0), "skip tensor"),
            ScheduleStep((1.0, 2.0), (0.9, 1.0), "learn"),
            ScheduleStep((1.0, 2.0), (0.9, 1.0), "skip"),
            ScheduleStep((1.0, 2.0), (0.9, 1.0), "learn tensor"),
            ScheduleStep((1.0, 2.0), (0.5, 1.9), "learn"),
            ScheduleStep((1.0, 2.0), (0.5, 1.9), "learn"),
        ),
    ),
)
def test_warm_up_steps_equal_discard_bit_for_bit(
    run: ScheduleRun, dtype: torch.dtype, threads: int | None
) -> None:
    """With ``warmup_steps=n``, the first n learning steps are ``discard()``: nothing else moves,
    and the blocks start counting after them."""
    names = names_of(run)
    warming = build(run, dtype=dtype)
    discarding = build(run, dtype=dtype, warmup_steps=0)
    learning_steps = 0
    with cpu_threads(threads):
        for step in run.steps:
            before = step.present("before")
            assert torch.equal(record(warming, before, names), record(discarding, before, names))
            learning_steps += step.call in LEARNING_CALLS
            update(warming, step, names)
            if step.call in LEARNING_CALLS and learning_steps <= run.warmup_steps:
                discarding.discard()
            else:
                update(discarding, step, names)
            assert_same_schedule_state(warming, discarding, but=("warmup_count",))
    if learning_steps <= run.warmup_steps:
        assert warming.steps.tolist() == [0.0] * run.num_tasks
        assert torch.equal(warming.logits, torch.zeros(run.num_tasks, dtype=dtype))


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
@given(run=schedule_runs(max_tasks=4, max_steps=10, warmups=st.integers(1, 5)))
def test_without_extra_forward_warm_up_steps_equal_discard_before_the_loss_call(
    run: ScheduleRun, dtype: torch.dtype
) -> None:
    """Unattached, every ``loss`` call with losses waiting is a learning step."""
    names = names_of(run)
    warming = build(run, dtype=dtype, extra_forward=False)
    discarding = build(run, dtype=dtype, extra_forward=False, warmup_steps=0)
    learning_steps = 0
    for step in run.steps:
        if discarding.pending:
            learning_steps += 1
            if learning_steps <= run.warmup_steps:
                discarding.discard()
        before = step.present("before")
        assert torch.equal(record(warming, before, names), record(discarding, before, names))
        assert_same_schedule_state(warming, discarding, but=("warmup_count",))


# ---------------------------------------------------------------------- blocks


def run_against_reference(
    run: ScheduleRun, *, drawn: bool = True
) -> tuple[FAMOWeighting, ScheduleReference]:
    """Step by step against the reference; ``drawn``: a Hypothesis example (rejected where a
    logit gradient is within rounding noise, which a hand-written run must never be)."""
    names = names_of(run)
    famo = build(run)
    reference = ScheduleReference(
        run.num_tasks,
        lr=run.lr,
        gamma=run.gamma,
        min_losses=run.min_losses,
        warmup_steps=run.warmup_steps,
        update_every=run.update_every,
    )
    for step in run.steps:
        before, after = step.present("before"), step.present("after")
        expected = reference.weights(before)
        torch.testing.assert_close(
            record(famo, before, names),
            torch.tensor([expected[i] for i in sorted(before)], dtype=F64),
            rtol=1e-12,
            atol=1e-15,
        )
        update(famo, step, names)
        if step.call in LEARNING_CALLS:
            reference.learning_step(before, after)
        if drawn:
            assume(not reference.rounding_noise)
        assert not reference.rounding_noise
        torch.testing.assert_close(famo.logits, reference.logits, rtol=1e-12, atol=1e-12)
        assert famo.steps.tolist() == reference.steps
        torch.testing.assert_close(famo.exp_avg, reference.exp_avg, rtol=1e-10, atol=1e-15)
        torch.testing.assert_close(famo.exp_avg_sq, reference.exp_avg_sq, rtol=1e-10, atol=1e-18)
    return famo, reference


def _run(
    k: int, warmup: int, every: int, steps: list[tuple[Any, Any, str]], missing: bool = True
) -> ScheduleRun:
    return ScheduleRun(
        num_tasks=k,
        lr=0.05,
        gamma=1e-3,
        min_losses=(0.0,) * k,
        warmup_steps=warmup,
        update_every=every,
        allow_missing_tasks=missing,
        steps=tuple(ScheduleStep(tuple(b), tuple(a), call) for b, a, call in steps),
    )


@given(run=schedule_runs())
@example(  # task 2 is present in one step of the block: its mean is over that step alone
    run=_run(
        3,
        0,
        2,
        [
            ((1.0, 1.0, 1.0), (0.9, 0.7, 0.4), "learn"),
            ((1.0, 1.0, None), (0.8, 0.7, None), "learn"),
            ((1.0, 1.0, 1.0), (0.9, 0.6, 0.5), "learn"),
            ((1.0, 1.0, 1.0), (0.95, 0.7, 0.2), "learn"),
        ],
    )
)
@example(  # task 2 is absent for a whole block: it takes no step, the others do
    run=_run(
        3,
        1,
        2,
        [
            ((1.0, 1.0, 1.0), (0.9, 0.7, 0.4), "learn"),
            ((1.0, 1.0, None), (0.9, 0.7, None), "learn"),
            ((1.0, 1.0, 1.0), (0.8, 0.6, None), "learn tensor"),
            ((1.0, 1.0, 1.0), (0.9, 0.7, 0.4), "learn"),
        ],
    )
)
@example(  # skipped updates inside a block and in the warm-up count for nothing
    run=_run(
        2,
        1,
        3,
        [
            ((1.0, 2.0), (0.9, 1.0), "skip tensor"),
            ((1.0, 2.0), (0.9, 1.5), "learn"),
            ((1.0, 2.0), (0.9, 1.0), "learn"),
            ((1.0, 2.0), (0.5, 1.9), "skip"),
            ((1.0, 2.0), (0.6, 1.9), "learn tensor"),
            ((1.0, 2.0), (0.7, 1.8), "skip tensor"),
            ((1.0, 2.0), (0.7, 1.9), "learn"),
        ],
        missing=False,
    )
)
def test_blocks_match_the_schedule_reference_to_1e_12(run: ScheduleRun) -> None:
    """Weights, logits, Adam moments and per-task step counts after every call."""
    run_against_reference(run)


@pytest.mark.parametrize("update_every", [1, 2, 3, 5])
def test_the_logits_take_one_step_per_block_of_learning_steps(update_every: int) -> None:
    run = _run(
        3,
        2,
        update_every,
        [((1.0, 2.0, 3.0), (0.9, 1.5, 2.9), "learn")] * 13,
        missing=False,
    )
    famo, reference = run_against_reference(run, drawn=False)
    assert famo.steps.tolist() == [float(11 // update_every)] * 3 == reference.steps
    assert famo.logits.abs().min() > 1e-3


# ---------------------------------------------------------------------- resume


RESUME_STEPS = (  # warm-up of 2, blocks of 3: steps 2-4, 5-7 and 8-9 (with a skip in it)
    ScheduleStep((1.0, 2.0, 3.0), (0.9, 1.5, 2.9), "learn"),
    ScheduleStep((1.1, 2.2, 3.1), (0.7, 1.6, 3.0), "learn"),
    ScheduleStep((0.9, 1.5, 2.9), (0.8, 1.4, 2.8), "learn"),
    ScheduleStep((0.8, 1.4, None), (0.7, 1.3, None), "learn"),
    ScheduleStep((0.7, 1.3, 2.7), (0.6, 1.2, 2.5), "learn"),
    ScheduleStep((0.6, 1.2, 2.5), (0.55, 1.1, 2.4), "learn"),
    ScheduleStep((0.5, None, 2.4), (0.45, 1.1, 2.3), "learn"),
    ScheduleStep((0.5, 1.1, 2.3), (0.4, 1.0, 2.2), "learn"),
    ScheduleStep((0.45, 1.0, 2.2), (0.3, 0.9, 2.1), "skip"),
    ScheduleStep((0.4, 1.0, 2.2), (0.35, 0.95, 2.15), "learn"),
    ScheduleStep((0.35, 0.95, 2.15), (0.3, 0.9, 2.1), "learn"),
)


def resume_steps(missing: bool) -> tuple[ScheduleStep, ...]:
    if missing:
        return RESUME_STEPS
    fill = (1.0, 1.5, 2.5)  # every task present
    return tuple(
        ScheduleStep(
            tuple(f if v is None else v for v, f in zip(s.before, fill, strict=True)),
            tuple(0.9 * f if v is None else v for v, f in zip(s.after, fill, strict=True)),
            s.call,
        )
        for s in RESUME_STEPS
    )


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("missing", [False, True], ids=["all tasks", "missing tasks"])
@pytest.mark.parametrize("pending", [False, True], ids=["between steps", "losses pending"])
@pytest.mark.parametrize("stop", range(len(RESUME_STEPS)))
def test_a_resume_at_any_point_of_the_warm_up_or_a_block_equals_no_stop(
    stop: int, pending: bool, missing: bool, dtype: torch.dtype
) -> None:
    names = ["a", "b", "c"]
    tasks = names if missing else 3
    steps = resume_steps(missing)

    def make() -> FAMOWeighting:
        return FAMOWeighting(
            tasks,
            gamma=0.01,
            warmup_steps=2,
            update_every=3,
            allow_missing_tasks=missing,
            dtype=dtype,
        )

    straight, resumed = make(), make()
    key_names = names if missing else None
    for index, step in enumerate(steps):
        if index == stop and not pending:
            resumed = reload(resumed, make)
        before = step.present("before")
        assert torch.equal(record(straight, before, key_names), record(resumed, before, key_names))
        if index == stop and pending:
            resumed = reload(resumed, make)
        update(straight, step, key_names)
        update(resumed, step, key_names)
        assert_same_schedule_state(resumed, straight)
    assert straight.steps.tolist()[0] == 2.0  # 10 learning steps: 2 of warm-up, 2 blocks + 2


@pytest.mark.parametrize("stop", range(9))
def test_without_extra_forward_a_resume_between_any_two_loss_calls_equals_no_stop(
    stop: int,
) -> None:
    def make() -> FAMOWeighting:
        return FAMOWeighting(
            3, gamma=0.01, warmup_steps=1, update_every=2, extra_forward=False, dtype=F64
        )

    straight, resumed = make(), make()
    for index, step in enumerate(resume_steps(missing=False)[:9]):
        if index == stop:
            resumed = reload(resumed, make)
        before = step.present("before")
        assert torch.equal(record(straight, before, None), record(resumed, before, None))
        assert_same_schedule_state(resumed, straight)
    assert straight.steps.tolist() == [3.0] * 3  # 8 learning steps: 1 of warm-up, 3 blocks + 1


# ---------------------------------------------------------------------- attached, no extra forward


def batches(count: int) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(7)
    scale = torch.tensor([1.0, 6.0, 40.0], dtype=F64)
    return [
        (
            torch.randn(8, 4, generator=generator, dtype=F64),
            torch.randn(8, K, generator=generator, dtype=F64) * scale,
        )
        for _ in range(count)
    ]


# Per optimizer step: how many micro-batches it accumulates, and whether GradScaler finds an
# inf gradient and skips it (the window then runs on into the next step).
PLAN = [(1, False), (2, False), (1, True), (1, False), (3, False), (1, True), (1, True)]
PLAN += [(1, False), (2, False), (1, False), (1, False), (2, True), (1, False), (1, False)]
PLAN += [(1, False), (1, False), (1, False)]


@pytest.mark.parametrize(("warmup_steps", "update_every"), [(0, 1), (2, 1), (0, 3), (2, 3)])
def test_attached_without_extra_forward_the_logits_move_only_at_the_schedules_real_steps(
    warmup_steps: int, update_every: int
) -> None:
    """Only ``loss`` calls: the first after each real optimizer step is a learning step."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    scaler = torch.amp.GradScaler("cpu")
    options = {"gamma": 0.01, "warmup_steps": warmup_steps, "update_every": update_every}
    famo = FAMOWeighting(K, extra_forward=False, dtype=F64, **options)
    reference = ScheduleReference(K, **options)
    famo.attach(optimizer)
    data = iter(batches(sum(micro for micro, _ in PLAN)))
    window: list[list[float]] = []
    stepped = False  # a real optimizer step since the window opened
    moves = 0
    for micro_batches, overflow in PLAN:
        optimizer.zero_grad()
        for _ in range(micro_batches):
            losses = task_losses(model, *next(data))
            logits = famo.logits.clone()
            scaler.scale(famo.loss(losses) / micro_batches).backward()
            values = losses.detach().tolist()
            learns = stepped and bool(window)
            if learns:
                mean = [sum(column) / len(window) for column in zip(*window, strict=True)]
                reference.learning_step(mean, values)
                window, stepped = [], False
            window.append(values)
            past_warm_up = reference.learning_steps - warmup_steps
            expected = learns and past_warm_up > 0 and past_warm_up % update_every == 0
            assert (not torch.equal(famo.logits, logits)) == expected
            moves += expected
            torch.testing.assert_close(famo.logits, reference.logits, rtol=1e-12, atol=1e-12)
            assert famo.steps.tolist() == reference.steps
        if overflow:
            first = next(model.parameters())
            assert first.grad is not None
            first.grad[0, 0] = float("inf")
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        assert (scaler.get_scale() < scale) == overflow
        stepped = stepped or not overflow
    assert reference.learning_steps == 12
    assert moves == (12 - warmup_steps) // update_every


@pytest.mark.parametrize(("warmup_steps", "update_every"), [(1, 2), (0, 3)])
def test_attached_with_extra_forward_an_update_after_no_real_step_is_not_a_learning_step(
    warmup_steps: int, update_every: int
) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    scaler = torch.amp.GradScaler("cpu")
    options = {"gamma": 0.01, "warmup_steps": warmup_steps, "update_every": update_every}
    famo = FAMOWeighting(K, dtype=F64, **options)
    reference = ScheduleReference(K, **options)
    famo.attach(optimizer)
    for step, (x, y) in enumerate(batches(10)):
        overflow = step in (2, 3, 7)
        optimizer.zero_grad()
        losses = task_losses(model, x, y)
        scaler.scale(famo.loss(losses)).backward()
        if overflow:
            first = next(model.parameters())
            assert first.grad is not None
            first.grad[0, 0] = float("inf")
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            after = task_losses(model, x, y)
        famo.update(after)  # no skip: the hook knows whether the step happened
        if not overflow:
            reference.learning_step(losses.detach().tolist(), after.tolist())
        assert not famo.pending
        torch.testing.assert_close(famo.logits, reference.logits, rtol=1e-12, atol=1e-12)
        assert famo.steps.tolist() == reference.steps
    assert reference.learning_steps == 7
    assert famo.steps.tolist() == [float((7 - warmup_steps) // update_every)] * K
