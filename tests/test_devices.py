"""Devices: the state follows the losses, ``update`` takes values from anywhere, ``.to()`` moves
everything, and checkpoints move between devices. No GPU here: the "meta" device stands in for
another device; the CUDA tests run where one is available."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from famo import FAMOWeighting

STATE = ("logits", "exp_avg", "exp_avg_sq", "steps", "min_losses", "pending_sum", "pending_count")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def devices_of(famo: FAMOWeighting) -> set[str]:
    return {getattr(famo, name).device.type for name in STATE}


def trained(steps: int = 3, **options: Any) -> FAMOWeighting:
    options.setdefault("min_losses", [0.0, 0.5, -1.0])
    famo = FAMOWeighting(3, gamma=0.01, **options).double()
    losses = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    for _ in range(steps):
        famo.backward(losses.clone().requires_grad_())
        losses = losses * torch.tensor([0.9, 0.97, 0.8], dtype=torch.float64)
        famo.update(losses)
    famo.backward(losses.clone().requires_grad_())  # leave losses pending, too
    return famo


def continue_training(famo: FAMOWeighting, device: str | torch.device) -> Tensor:
    after = torch.tensor([0.6, 1.7, 1.5], dtype=torch.float64, device=device)
    famo.update(after)
    famo.backward(after.clone().requires_grad_())
    famo.update(after * 0.9)
    return famo.logits


def test_meta_losses_are_traced_without_moving_the_state() -> None:
    famo = FAMOWeighting(2, validate=False)  # created on the CPU: it holds its bounds
    losses = torch.tensor([1.0, 2.0], device="meta", requires_grad=True)
    objective = famo.loss(losses)
    objective.backward()
    assert objective.device.type == "meta" and losses.grad is not None
    assert losses.grad.device.type == "meta"
    assert devices_of(famo) == {"cpu"} and not famo.pending


@pytest.mark.parametrize(
    "after", [[0.5, 0.9], torch.tensor([0.5, 0.9]), {"a": 0.5, "b": torch.tensor(0.9)}]
)
def test_update_moves_after_losses_to_the_state(after: object) -> None:
    # Plain numbers (e.g. from .item()) and CPU tensors join the state's device; the state
    # stays where the losses of `loss` put it.
    famo = FAMOWeighting(["a", "b"], validate=False, device="meta")
    famo.backward(torch.tensor([1.0, 2.0], device="meta", requires_grad=True))
    famo.update(after)  # type: ignore[arg-type]
    assert devices_of(famo) == {"meta"}


def test_validation_of_meta_losses_says_what_to_do() -> None:
    famo = FAMOWeighting(2)
    with pytest.raises(ValueError, match=r"meta device.*validate=False"):
        famo.loss(torch.tensor([1.0, 2.0], device="meta", requires_grad=True))
    assert devices_of(famo) == {"cpu"}  # the rejected call changed nothing
    with pytest.raises(RuntimeError, match="no losses recorded"):
        famo.update([1.0, 2.0])


def test_losses_on_two_devices_at_once_are_an_error_that_names_them() -> None:
    famo = FAMOWeighting(2, validate=False)
    mixed = [
        torch.tensor(1.0, requires_grad=True),
        torch.tensor(2.0, device="meta", requires_grad=True),
    ]
    with pytest.raises(ValueError, match=r"one device.*cpu.*meta"):
        famo.loss(mixed)


def test_to_moves_the_whole_state_and_keeps_its_precision() -> None:
    famo = trained()
    model = nn.ModuleDict({"head": nn.Linear(2, 3), "famo": famo})
    model.to("meta")
    assert devices_of(famo) == {"meta"}
    assert famo.pending and famo.pending_sum.device.type == "meta"  # recorded losses moved too
    model.half()  # the model's 16 bits do not round FAMO's state
    assert {getattr(famo, name).dtype for name in STATE} == {torch.float64}
    assert model["head"].weight.dtype == torch.float16


@pytest.mark.parametrize("min_losses", [None, -1.0, [0.0, 0.5, -1.0]])
def test_a_checkpoint_loads_into_an_object_created_on_the_meta_device(
    min_losses: float | list[float] | None,
) -> None:
    # Deferred initialisation: create on "meta", then load real tensors with assign=True.
    original = trained(min_losses=min_losses)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, map_location="cpu")

    with torch.device("meta"):
        restored = FAMOWeighting(3, gamma=0.01, min_losses=min_losses, dtype=torch.float64)
    assert devices_of(restored) == {"meta"}
    restored.load_state_dict(state, assign=True)
    assert devices_of(restored) == {"cpu"}
    for name in STATE:
        assert torch.equal(getattr(restored, name), getattr(original, name)), name
    assert torch.equal(continue_training(restored, "cpu"), continue_training(original, "cpu"))


@needs_cuda
def test_cuda_losses_bring_a_cpu_object_along() -> None:
    famo = FAMOWeighting(2)
    famo.backward(torch.tensor([1.0, 2.0], device="cuda", requires_grad=True))
    famo.update([0.5, 1.9])  # numbers, as from .item(): the state stays on the GPU
    assert devices_of(famo) == {"cuda"}


@needs_cuda
@pytest.mark.parametrize(("saved_on", "loaded_on"), [("cuda", "cpu"), ("cpu", "cuda")])
def test_checkpoints_move_between_cpu_and_cuda(saved_on: str, loaded_on: str) -> None:
    original = trained().to(saved_on)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = FAMOWeighting(3, gamma=0.01, min_losses=[0.0, 0.5, -1.0]).double().to(loaded_on)
    restored.load_state_dict(torch.load(buffer, map_location=loaded_on))
    assert devices_of(restored) == {loaded_on}
    for name in STATE:
        assert torch.equal(getattr(restored, name).cpu(), getattr(original, name).cpu()), name
    # float64 arithmetic on two devices: equal up to rounding.
    torch.testing.assert_close(
        continue_training(restored, loaded_on).cpu(),
        continue_training(original, saved_on).cpu(),
        rtol=1e-12,
        atol=1e-15,
    )


def test_reset_parameters_after_to_empty_restores_the_constructors_state() -> None:
    """Meta-device initialisation: create without memory, allocate, then initialise."""
    with torch.device("meta"):
        model = nn.ModuleDict(
            {"head": nn.Linear(2, 3), "famo": FAMOWeighting(3, min_losses=[0, -1, 0])}
        )
    model.to_empty(device="cpu")
    famo = model["famo"]
    assert isinstance(famo, FAMOWeighting)
    famo.reset_parameters()
    assert famo.min_losses.tolist() == [0.0, -1.0, 0.0]
    assert famo.logits.tolist() == [0.0] * 3 and famo.steps.tolist() == [0.0] * 3
    assert not famo.pending
    famo.backward(torch.tensor([1.0, -0.5, 2.0], requires_grad=True))  # the bound works
    famo.update([0.5, -0.7, 1.0])
    assert torch.isfinite(famo.logits).all()


def test_meta_losses_never_move_a_state_that_holds_values() -> None:
    famo = trained()
    before = {name: getattr(famo, name).clone() for name in STATE}
    famo.validate = False
    traced = famo.loss(
        torch.tensor([1.0, 2.0, 3.0], device="meta", dtype=torch.float64, requires_grad=True)
    )
    assert traced.device.type == "meta"
    assert devices_of(famo) == {"cpu"}
    for name in STATE:
        assert torch.equal(getattr(famo, name), before[name]), name


def test_bounds_given_in_float64_survive_float_then_double_exactly() -> None:
    bounds = [0.1, -1.0 / 3.0, 1e-9]
    famo = FAMOWeighting(3, min_losses=bounds)
    assert famo.min_losses.dtype == torch.float32
    famo.double()
    assert famo.min_losses.tolist() == bounds
    direct = FAMOWeighting(3, min_losses=bounds, dtype=torch.float64)
    for twin in (famo, direct):
        twin.backward(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True))
        twin.update([0.5, 1.0, 2.0])
    assert torch.equal(famo.logits, direct.logits)
