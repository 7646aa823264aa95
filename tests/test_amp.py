"""Mixed precision: FAMO's math in fp32 for fp16/bf16 losses; a skipped GradScaler step is unseen.

Every test uses the real ``torch.autocast`` and ``torch.amp.GradScaler`` (both run on CPU); the
CUDA variants run where a GPU is available.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from famo import FAMOWeighting
from famo.amp import step_and_update

LOW_PRECISION = [torch.float16, torch.bfloat16]
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ),
]


def make_problem(
    device: str = "cpu", seed: int = 0
) -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    """A two-head regression model and four batches, all in float32."""
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    batches = [
        (torch.randn(16, 5, generator=generator), torch.randn(16, 2, generator=generator) * 3)
        for _ in range(4)
    ]
    return model.to(device), [(x.to(device), y.to(device)) for x, y in batches]


def task_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return ((model(x) - y) ** 2).mean(dim=0)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_losses_use_fp32_math(dtype: torch.dtype) -> None:
    famo_low, famo_fp32 = FAMOWeighting(2, gamma=0.0), FAMOWeighting(2, gamma=0.0)
    before = torch.tensor([1.3, 0.4], dtype=dtype, requires_grad=True)
    after = torch.tensor([1.1, 0.39], dtype=dtype)
    before_fp32 = before.detach().float().requires_grad_()

    objective = famo_low.loss(before)
    expected = famo_fp32.loss(before_fp32)
    assert objective.dtype == torch.float32
    assert torch.equal(objective.detach(), expected.detach())
    objective.backward()
    expected.backward()
    assert before.grad is not None and before_fp32.grad is not None
    assert before.grad.dtype == dtype  # the gradient flows back in the losses' own dtype
    assert torch.equal(before.grad, before_fp32.grad.to(dtype))

    famo_low.update(after)
    famo_fp32.update(after.float())
    for name in ("logits", "exp_avg", "exp_avg_sq"):
        assert getattr(famo_low, name).dtype == torch.float32
        assert torch.equal(getattr(famo_low, name), getattr(famo_fp32, name)), name
    assert not torch.equal(famo_low.logits, torch.zeros(2))


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_losses_match_the_same_values_outside_autocast(device: str) -> None:
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    model, batches = make_problem(device)
    famo, plain = FAMOWeighting(2, device=device), FAMOWeighting(2, device=device)
    for x, y in batches:
        with torch.autocast(device, dtype=dtype):
            # Linear runs in low precision under autocast; keep the losses in it too.
            losses = ((model(x) - y.to(dtype)) ** 2).mean(dim=0).to(dtype)
            assert losses.dtype == dtype
            objective = famo.loss(losses)
        assert objective.dtype == torch.float32
        reference = plain.loss(losses.detach().float().requires_grad_())
        assert torch.equal(objective.detach(), reference.detach())
        with torch.no_grad(), torch.autocast(device, dtype=dtype):
            new_losses = ((model(x) * 0.9 - y.to(dtype)) ** 2).mean(dim=0).to(dtype)
            famo.update(new_losses)
        plain.update(new_losses.float())
        assert famo.logits.dtype == torch.float32
        assert torch.equal(famo.logits, plain.logits)


def train(
    batches: list[tuple[Tensor, Tensor]],
    model: nn.Module,
    famo: FAMOWeighting,
    *,
    scaler: torch.amp.GradScaler | None,
    before_step: Callable[[int], None] = lambda step: None,
) -> list[bool]:
    """The README's AMP loop (without autocast, so that the runs compare exactly)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    skips = []
    for step, (x, y) in enumerate(batches):
        optimizer.zero_grad()
        objective = famo.loss(task_losses(model, x, y))
        before_step(step)
        if scaler is None:
            objective.backward()
            optimizer.step()
            skipped = False
        else:
            scaler.scale(objective).backward()
            skipped = step_and_update(scaler, optimizer)
        with torch.no_grad():
            famo.update(task_losses(model, x, y), skip=skipped)
        skips.append(skipped)
    return skips


def assert_same_training(
    a: tuple[nn.Module, FAMOWeighting], b: tuple[nn.Module, FAMOWeighting]
) -> None:
    for (name, pa), pb in zip(a[0].named_parameters(), b[0].parameters(), strict=True):
        assert torch.equal(pa, pb), name
    for name in ("logits", "exp_avg", "exp_avg_sq", "steps"):
        assert torch.equal(getattr(a[1], name), getattr(b[1], name)), name


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scaler_training_equals_unscaled_training(device: str) -> None:
    # GradScaler's scales are powers of two, so scaling and unscaling are exact: bit-identical.
    model, batches = make_problem(device)
    scaled = (model, FAMOWeighting(2, device=device))
    unscaled = (make_problem(device)[0], FAMOWeighting(2, device=device))
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=2)
    assert train(batches, *scaled, scaler=scaler) == [False] * 4
    assert scaler.get_scale() > 2.0**10  # it grew: growing is not mistaken for a skip
    train(batches, *unscaled, scaler=None)
    assert_same_training(scaled, unscaled)
    assert not torch.equal(scaled[1].logits, torch.zeros(2, device=device))


def poison_gradients_at(model: nn.Module, bad_step: int) -> Callable[[int], None]:
    """Make the gradient of the first weight inf at ``bad_step`` (as an fp16 overflow would)."""
    weight = next(model.parameters())

    def overflow_once(grad: Tensor) -> Tensor:
        handle.remove()
        return grad * float("inf")

    def before_step(step: int) -> None:
        nonlocal handle
        if step == bad_step:
            handle = weight.register_hook(overflow_once)

    handle: torch.utils.hooks.RemovableHandle

    return before_step


@pytest.mark.parametrize("device", DEVICES)
def test_a_skipped_step_is_as_if_it_never_happened(device: str) -> None:
    model, batches = make_problem(device)
    famo = FAMOWeighting(2, device=device)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**8)
    skips = train(batches, model, famo, scaler=scaler, before_step=poison_gradients_at(model, 1))
    assert skips == [False, True, False, False]
    assert scaler.get_scale() == 2.0**7  # backed off once

    # The same run without the bad batch: the model and the logits saw three steps.
    reference = (make_problem(device)[0], FAMOWeighting(2, device=device))
    train([batches[0], *batches[2:]], *reference, scaler=None)
    assert_same_training((model, famo), reference)
    assert famo.steps.tolist() == [3.0, 3.0]


def test_skip_as_a_tensor_needs_no_host_sync_and_freezes_the_state() -> None:
    famo = FAMOWeighting(2, validate=False)
    famo.backward(torch.tensor([1.0, 2.0], requires_grad=True))
    famo.update([0.8, 1.9])
    state = {name: value.clone() for name, value in famo.state_dict().items()}
    famo.backward(torch.tensor([0.8, 1.9], requires_grad=True))
    # With a fused optimizer GradScaler never syncs; its found-inf flag can feed `skip` as is.
    famo.update([0.1, 0.1], skip=torch.tensor(True))
    for name, value in famo.state_dict().items():
        assert torch.equal(value, state[name]), name
    with pytest.raises(RuntimeError, match="no losses recorded"):
        famo.update([0.5, 0.5])


def test_non_finite_losses_without_validation_become_a_skipped_step() -> None:
    # validate=False (the no-sync path): an overflowed loss gives NaN gradients instead of an
    # error; GradScaler skips that step and `update(skip=True)` drops it.
    model, batches = make_problem()
    famo = FAMOWeighting(2, validate=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu")
    x, y = batches[0]
    scaler.scale(famo.loss(task_losses(model, x, y) * torch.tensor([1.0, float("inf")]))).backward()
    assert step_and_update(scaler, optimizer)
    with torch.no_grad():
        famo.update(task_losses(model, x, y), skip=True)
    assert torch.equal(famo.logits, torch.zeros(2))
    assert torch.equal(famo.steps, torch.zeros(2))
    assert torch.isfinite(next(model.parameters())).all()


def test_non_finite_losses_with_validation_raise_before_anything_changes() -> None:
    famo = FAMOWeighting(2)
    with pytest.raises(ValueError, match="should be finite"):
        famo.loss(torch.tensor([1.0, float("inf")], dtype=torch.float16, requires_grad=True))
    with pytest.raises(RuntimeError, match="no losses recorded"):
        famo.update([1.0, 1.0])


def test_without_extra_forward_a_skipped_step_is_discarded() -> None:
    model, batches = make_problem()
    famo = FAMOWeighting(2, extra_forward=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu")
    poison = poison_gradients_at(model, 1)
    for step, (x, y) in enumerate(batches):
        optimizer.zero_grad()
        objective = famo.loss(task_losses(model, x, y))
        poison(step)
        scaler.scale(objective).backward()
        if step_and_update(scaler, optimizer):
            famo.discard()  # the next `loss` must not learn from the step that did not happen
    # Updates happen inside `loss` at steps 1 (from step 0) and 3 (from step 2): step 1's
    # losses were discarded, so the loss call at step 2 learned nothing.
    assert famo.steps.tolist() == [2.0, 2.0]


def test_step_and_update_with_a_disabled_scaler_never_skips() -> None:
    model, batches = make_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x, y = batches[0]
    scaler.scale(task_losses(model, x, y).sum()).backward()
    before = next(model.parameters()).clone()
    assert step_and_update(scaler, optimizer) is False
    assert not torch.equal(before, next(model.parameters()))
