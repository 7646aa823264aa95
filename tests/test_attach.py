"""``famo.attach(optimizer)``: the logits learn on the optimizer's real steps.

Each test drives two copies of one float64 model: one with a hooked ``FAMOWeighting``, written
as a user would (no ``update``, ``skip`` or ``discard`` with ``extra_forward=False``), and one with
an unhooked object driven by today's explicit calls. They must stay in lockstep: the same model
parameters and the same FAMO state after every step.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from famo import FAMOWeighting
from tests.helpers import K, make_model, task_losses

STATE = ("logits", "exp_avg", "exp_avg_sq", "steps")


def batches(count: int, seed: int = 4) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    scale = torch.tensor([1.0, 6.0, 40.0], dtype=torch.float64)
    return [
        (
            torch.randn(8, 4, generator=generator, dtype=torch.float64),
            torch.randn(8, K, generator=generator, dtype=torch.float64) * scale,
        )
        for _ in range(count)
    ]


def famo(**options: Any) -> FAMOWeighting:
    return FAMOWeighting(K, gamma=0.01, dtype=torch.float64, **options)


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)


def assert_lockstep(
    hooked_model: nn.Module, hooked: FAMOWeighting, model: nn.Module, explicit: FAMOWeighting
) -> None:
    for a, b in zip(hooked_model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0.0, atol=1e-12)
    for name in STATE:
        torch.testing.assert_close(
            getattr(hooked, name), getattr(explicit, name), rtol=0.0, atol=1e-12, msg=name
        )


def windows(data: list[tuple[Tensor, Tensor]], size: int) -> Iterator[list[tuple[Tensor, Tensor]]]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


# ---------------------------------------------------------------------- a plain loop


def test_plain_loop_without_extra_forward_is_one_loss_call_per_step() -> None:
    hooked_model, model = make_model(), make_model()
    hooked, explicit = famo(extra_forward=False), famo()
    hooked_optimizer, optimizer = sgd(hooked_model), sgd(model)
    handle = hooked.attach(hooked_optimizer)
    for step, (x, y) in enumerate(batches(8)):
        hooked_optimizer.zero_grad()
        hooked.loss(task_losses(hooked_model, x, y)).backward()  # the whole integration
        hooked_optimizer.step()

        optimizer.zero_grad()
        losses = task_losses(model, x, y)
        if step > 0:
            explicit.update(losses.detach())  # this batch's losses close the previous step
        explicit.loss(losses).backward()
        optimizer.step()
        assert_lockstep(hooked_model, hooked, model, explicit)
    assert hooked.steps.tolist() == [7.0] * K and hooked.pending
    assert hooked.logits.abs().min() > 1e-3  # the weights did move
    handle.remove()


def test_plain_loop_with_extra_forward_equals_the_readme_loop() -> None:
    hooked_model, model = make_model(), make_model()
    hooked, explicit = famo(), famo()
    hooked_optimizer, optimizer = sgd(hooked_model), sgd(model)
    hooked.attach(hooked_optimizer)
    for x, y in batches(6):
        for m, f, o in ((hooked_model, hooked, hooked_optimizer), (model, explicit, optimizer)):
            o.zero_grad()
            f.backward(task_losses(m, x, y))
            o.step()
            with torch.no_grad():
                f.update(task_losses(m, x, y))
        assert_lockstep(hooked_model, hooked, model, explicit)
    assert hooked.steps.tolist() == [6.0] * K and not hooked.pending


# ---------------------------------------------------------------------- gradient accumulation


@pytest.mark.parametrize("size", [2, 3])
def test_accumulation_without_extra_forward_learns_once_per_window(size: int) -> None:
    hooked_model, model = make_model(), make_model()
    hooked, explicit = famo(extra_forward=False), famo()
    hooked_optimizer, optimizer = sgd(hooked_model), sgd(model)
    hooked.attach(hooked_optimizer)
    for step, window in enumerate(windows(batches(4 * size), size)):
        hooked_optimizer.zero_grad()
        for x, y in window:
            (hooked.loss(task_losses(hooked_model, x, y)) / size).backward()
        hooked_optimizer.step()

        optimizer.zero_grad()
        for i, (x, y) in enumerate(window):
            losses = task_losses(model, x, y)
            if step > 0 and i == 0:  # the first loss after a real step closes the last window
                explicit.update(losses.detach())
            (explicit.loss(losses) / size).backward()  # records the window's mean
        optimizer.step()
        assert_lockstep(hooked_model, hooked, model, explicit)
    assert hooked.steps.tolist() == [3.0] * K


def test_accumulation_with_extra_forward_equals_the_readme_recipe() -> None:
    hooked_model, model = make_model(), make_model()
    hooked, explicit = famo(), famo()
    hooked_optimizer, optimizer = sgd(hooked_model), sgd(model)
    hooked.attach(hooked_optimizer)
    for window in windows(batches(9), 3):
        for m, f, o in ((hooked_model, hooked, hooked_optimizer), (model, explicit, optimizer)):
            o.zero_grad()
            for x, y in window:
                (f.loss(task_losses(m, x, y)) / len(window)).backward()
            o.step()
            with torch.no_grad():
                f.update(torch.stack([task_losses(m, x, y) for x, y in window]))
        assert_lockstep(hooked_model, hooked, model, explicit)
    assert hooked.steps.tolist() == [3.0] * K


# ---------------------------------------------------------------------- a skipped GradScaler step


def scaled_step(
    model: nn.Module,
    f: FAMOWeighting,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    x: Tensor,
    y: Tensor,
    overflow: bool,
    before: Tensor | None = None,
) -> bool:
    """One GradScaler step; ``overflow`` injects an inf into a gradient. Returns skipped."""
    optimizer.zero_grad()
    losses = task_losses(model, x, y)
    if before is not None:
        f.update(before)
    scaler.scale(f.loss(losses)).backward()
    if overflow:
        next(model.parameters()).grad[0, 0] = float("inf")
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() < scale


OVERFLOW_AT = (2, 3, 6)  # two skips in a row, then one alone


def test_a_skipped_step_extends_the_window_without_extra_forward() -> None:
    hooked_model, model = make_model(), make_model()
    hooked, explicit = famo(extra_forward=False), famo()
    hooked_optimizer, optimizer = sgd(hooked_model), sgd(model)
    hooked_scaler, scaler = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    hooked.attach(hooked_optimizer)
    stepped = False  # the explicit loop's own bookkeeping, which the hook makes unnecessary
    for step, (x, y) in enumerate(batches(9)):
        overflow = step in OVERFLOW_AT
        skipped = scaled_step(hooked_model, hooked, hooked_optimizer, hooked_scaler, x, y, overflow)
        assert skipped == overflow
        with torch.no_grad():
            before = task_losses(model, x, y) if stepped else None
        scaled_step(model, explicit, optimizer, scaler, x, y, overflow, before)
        stepped = not overflow
        assert_lockstep(hooked_model, hooked, model, explicit)
    assert hooked.steps.tolist() == [8.0 - len(OVERFLOW_AT)] * K


def test_a_skipped_step_is_dropped_by_update_with_extra_forward() -> None:
    hooked_model, model = make_model(), make_model()
    hooked, explicit = famo(), famo()
    hooked_optimizer, optimizer = sgd(hooked_model), sgd(model)
    hooked_scaler, scaler = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    hooked.attach(hooked_optimizer)
    for step, (x, y) in enumerate(batches(9)):
        overflow = step in OVERFLOW_AT
        scaled_step(hooked_model, hooked, hooked_optimizer, hooked_scaler, x, y, overflow)
        with torch.no_grad():
            hooked.update(task_losses(hooked_model, x, y))  # no `skip`: the hook knows
        skipped = scaled_step(model, explicit, optimizer, scaler, x, y, overflow)
        with torch.no_grad():
            explicit.update(task_losses(model, x, y), skip=skipped)
        assert not hooked.pending
        assert_lockstep(hooked_model, hooked, model, explicit)
    assert hooked.steps.tolist() == [9.0 - len(OVERFLOW_AT)] * K


# ---------------------------------------------------------------------- Accelerate's accumulate


@pytest.fixture
def fresh_accelerate() -> Iterator[None]:
    """Accelerate keeps its state in process-wide singletons: start and leave them empty."""
    state = pytest.importorskip("accelerate.state")
    state.AcceleratorState._reset_state(reset_partial_state=True)
    state.GradientState._reset_state()
    yield
    state.AcceleratorState._reset_state(reset_partial_state=True)
    state.GradientState._reset_state()


def accelerator(steps: int) -> Any:
    accelerate = pytest.importorskip("accelerate")
    state = pytest.importorskip("accelerate.state")
    state.AcceleratorState._reset_state(reset_partial_state=True)
    state.GradientState._reset_state()
    return accelerate.Accelerator(cpu=True, gradient_accumulation_steps=steps)


@pytest.mark.usefixtures("fresh_accelerate")
def test_accelerate_accumulate_without_extra_forward_equals_the_plain_window() -> None:
    # The line-by-line translation of the plain loop: optimizer.step() on every micro-batch,
    # a no-op for Accelerate except at the window's end. The hook sees only the real steps.
    acc = accelerator(3)
    hooked_model, model = make_model(), make_model()
    hooked, explicit = famo(extra_forward=False), famo()
    hooked_model, hooked_optimizer = acc.prepare(hooked_model, sgd(hooked_model))
    optimizer = sgd(model)
    handle = hooked.attach(hooked_optimizer)
    data = batches(12)
    for x, y in data:
        with acc.accumulate(hooked_model):
            acc.backward(hooked.loss(task_losses(hooked_model, x, y)))
            hooked_optimizer.step()
            hooked_optimizer.zero_grad()
    for step, window in enumerate(windows(data, 3)):
        optimizer.zero_grad()
        for i, (x, y) in enumerate(window):
            losses = task_losses(model, x, y)
            if step > 0 and i == 0:
                explicit.update(losses.detach())
            (explicit.loss(losses) / 3).backward()
        optimizer.step()
    assert_lockstep(hooked_model, hooked, model, explicit)
    assert hooked.steps.tolist() == [3.0] * K  # 4 windows; the 4th is learned from by a 5th
    handle.remove()


@pytest.mark.usefixtures("fresh_accelerate")
def test_accelerate_accumulate_with_extra_forward() -> None:
    # update() after every optimizer.step(), as the plain loop does: on a micro-step without
    # sync it drops the recorded losses (what update(skip=True) does by hand), so each window
    # learns from its last micro-batch; update only when accelerator.sync_gradients, with the
    # window's rows, gives the plain accumulation loop.
    acc = accelerator(2)
    naive_model, windowed_model = make_model(), make_model()
    naive_model, naive_optimizer = acc.prepare(naive_model, sgd(naive_model))
    naive, by_hand = famo(), famo()
    naive.attach(naive_optimizer)
    by_hand_model = make_model()
    by_hand_optimizer = sgd(by_hand_model)
    data = batches(8)
    for i, (x, y) in enumerate(data):
        with acc.accumulate(naive_model):
            acc.backward(naive.loss(task_losses(naive_model, x, y)))
            naive_optimizer.step()
            naive_optimizer.zero_grad()
            with torch.no_grad():
                naive.update(task_losses(naive_model, x, y))
        if i % 2 == 0:
            by_hand_optimizer.zero_grad()
        (by_hand.loss(task_losses(by_hand_model, x, y)) / 2).backward()
        synced = i % 2 == 1
        if synced:
            by_hand_optimizer.step()
        with torch.no_grad():
            by_hand.update(task_losses(by_hand_model, x, y), skip=not synced)
    assert_lockstep(naive_model, naive, by_hand_model, by_hand)
    assert naive.steps.tolist() == [4.0] * K

    acc = accelerator(2)
    windowed_model, windowed_optimizer = acc.prepare(windowed_model, sgd(windowed_model))
    windowed, plain = famo(), famo()
    windowed.attach(windowed_optimizer)
    plain_model = make_model()
    plain_optimizer = sgd(plain_model)
    window: list[tuple[Tensor, Tensor]] = []
    for x, y in data:
        window.append((x, y))
        with acc.accumulate(windowed_model):
            acc.backward(windowed.loss(task_losses(windowed_model, x, y)))
            windowed_optimizer.step()
            windowed_optimizer.zero_grad()
            if acc.sync_gradients:
                with torch.no_grad():
                    rows = [task_losses(windowed_model, *batch) for batch in window]
                    windowed.update(torch.stack(rows))
                window = []
    for pair in windows(data, 2):
        plain_optimizer.zero_grad()
        for x, y in pair:
            (plain.loss(task_losses(plain_model, x, y)) / 2).backward()
        plain_optimizer.step()
        with torch.no_grad():
            plain.update(torch.stack([task_losses(plain_model, x, y) for x, y in pair]))
    assert_lockstep(windowed_model, windowed, plain_model, plain)


# ---------------------------------------------------------------------- detaching


def test_update_drops_the_losses_of_a_step_that_did_not_happen_until_the_hook_is_removed() -> None:
    model = make_model()
    optimizer = sgd(model)
    hooked = famo()
    handle = hooked.attach(optimizer)
    x, y = batches(1)[0]
    hooked.backward(task_losses(model, x, y))
    with torch.no_grad():
        hooked.update(task_losses(model, x, y))  # no optimizer step since: nothing learned
    assert hooked.steps.tolist() == [0.0] * K and not hooked.pending
    handle.remove()
    hooked.backward(task_losses(model, x, y))
    with torch.no_grad():
        hooked.update(task_losses(model, x, y) * 0.5)  # unhooked: update learns, as always
    assert hooked.steps.tolist() == [1.0] * K


def test_removing_the_hook_restores_the_unhooked_behaviour() -> None:
    # Unhooked, extra_forward=False learns in every loss call (one call per step); hooked, once
    # per real optimizer step. After handle.remove(), the object behaves as never hooked.
    was_hooked_model, never_model = make_model(), make_model()
    was_hooked, never = famo(extra_forward=False), famo(extra_forward=False)
    was_hooked_optimizer, never_optimizer = sgd(was_hooked_model), sgd(never_model)
    was_hooked.attach(was_hooked_optimizer).remove()
    for window in windows(batches(6), 2):
        for m, f, o in (
            (was_hooked_model, was_hooked, was_hooked_optimizer),
            (never_model, never, never_optimizer),
        ):
            o.zero_grad()
            for x, y in window:
                (f.loss(task_losses(m, x, y)) / 2).backward()
            o.step()
        assert_lockstep(was_hooked_model, was_hooked, never_model, never)
    assert never.steps.tolist() == [5.0] * K  # learned in every call but the first


# ---------------------------------------------------------------------- checkpoints


def save_and_load(source: FAMOWeighting, target: FAMOWeighting) -> None:
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer, weights_only=True))


@pytest.mark.parametrize("stop_at", [2, 3])  # after a real step, and inside a window
def test_a_checkpoint_resumes_a_hooked_run_whatever_the_hook(stop_at: int) -> None:
    # Windows of 2 micro-batches: stopping after micro-batch 2 (a real step just happened, so
    # the next loss learns) or after micro-batch 3 (in a window). The resumed object is hooked
    # to a new optimizer; the checkpoint went through an unhooked object on the way.
    data = batches(8)
    straight_model = make_model()
    straight, straight_optimizer = famo(extra_forward=False), sgd(straight_model)
    straight.attach(straight_optimizer)

    def micro_batch(
        m: nn.Module, f: FAMOWeighting, o: torch.optim.Optimizer, i: int, x: Tensor, y: Tensor
    ) -> None:
        if i % 2 == 0:
            o.zero_grad()
        (f.loss(task_losses(m, x, y)) / 2).backward()
        if i % 2 == 1:
            o.step()

    for i, (x, y) in enumerate(data):
        micro_batch(straight_model, straight, straight_optimizer, i, x, y)
        if i == stop_at - 1:
            saved_model = {k: v.clone() for k, v in straight_model.state_dict().items()}
            saved_grads = [p.grad.clone() for p in straight_model.parameters()]  # mid-window
            saved_optimizer = io.BytesIO()
            torch.save(straight_optimizer.state_dict(), saved_optimizer)
            unhooked = famo(extra_forward=False)
            save_and_load(straight, unhooked)  # hooked -> unhooked
            assert unhooked.pending

    resumed_model = make_model()
    resumed_model.load_state_dict(saved_model)
    for parameter, grad in zip(resumed_model.parameters(), saved_grads, strict=True):
        parameter.grad = grad
    resumed_optimizer = sgd(resumed_model)
    saved_optimizer.seek(0)
    resumed_optimizer.load_state_dict(torch.load(saved_optimizer, weights_only=True))
    resumed = famo(extra_forward=False)
    resumed.attach(resumed_optimizer)
    save_and_load(unhooked, resumed)  # unhooked -> hooked
    for i, (x, y) in enumerate(data):
        if i >= stop_at:
            micro_batch(resumed_model, resumed, resumed_optimizer, i, x, y)
    assert_lockstep(resumed_model, resumed, straight_model, straight)
    assert resumed.pending and torch.equal(resumed.pending_sum, straight.pending_sum)


@pytest.mark.parametrize("stepped", [True, False])
def test_the_state_dict_is_tensors_only_and_does_not_depend_on_the_hook(
    stepped: bool, tmp_path: Path
) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = make_model()
    hooked, unhooked = famo(extra_forward=False), famo(extra_forward=False)
    optimizer = sgd(model)
    handle = hooked.attach(optimizer)
    x, y = batches(1)[0]
    for f in (hooked, unhooked):
        f.backward(task_losses(model, x, y))
    if stepped:
        optimizer.step()  # only the hooked object sees it
    assert hooked.state_dict().keys() == unhooked.state_dict().keys()
    assert all(isinstance(value, Tensor) for value in hooked.state_dict().values())
    path = tmp_path / "famo.safetensors"
    safetensors_torch.save_file(hooked.state_dict(), str(path))
    handle.remove()  # whether the optimizer stepped is state, not the hook's
    loaded = famo(extra_forward=False)
    loaded.load_state_dict(safetensors_torch.load_file(str(path)))
    loaded.attach(sgd(make_model()))
    hooked.attach(optimizer)
    with torch.no_grad():
        after = task_losses(model, x, y) * 0.9
    for f in (hooked, loaded):
        f.backward(after.clone().requires_grad_())
    assert hooked.steps.tolist() == loaded.steps.tolist() == [float(stepped)] * K
    for name in (*STATE, "pending_sum", "pending_count"):
        assert torch.equal(getattr(hooked, name), getattr(loaded, name)), name
