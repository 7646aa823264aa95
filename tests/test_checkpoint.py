"""Checkpoints: tensors only, torch's load rules, bit-identical resume at any step.

The layout is described in ``famo/_layout.py``; ``docs/design.md`` §7 states the resume
property.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from famo import FORMAT_VERSION, FAMOWeighting
from tests.helpers import LAYOUT_3, loss_weights
from tests.strategies import Scenario, scenarios


def round_trip(state: dict[str, object]) -> dict[str, object]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded: dict[str, object] = torch.load(buffer, weights_only=True)
    return loaded


def make(scenario: Scenario, dtype: torch.dtype) -> FAMOWeighting:
    return FAMOWeighting(
        scenario.num_tasks,
        lr=scenario.lr,
        gamma=scenario.gamma,
        min_losses=scenario.min_losses,
        dtype=dtype,
    )


@given(
    scenarios(max_tasks=16, max_steps=8),
    st.data(),
    st.booleans(),
    st.sampled_from([torch.float32, torch.float64]),
)
def test_save_and_load_at_any_step_continues_bit_identically(
    scenario: Scenario, data: st.DataObject, with_pending: bool, dtype: torch.dtype
) -> None:
    stop = data.draw(st.integers(min_value=0, max_value=len(scenario.steps) - 1), label="stop")
    never_stopped, resumed = make(scenario, dtype), make(scenario, dtype)
    for step, (before, after) in enumerate(scenario.steps):
        w_never = loss_weights(never_stopped, before)
        if step == stop and with_pending:
            w_resumed = loss_weights(resumed, before)
            saved = round_trip(resumed.state_dict())
            resumed = make(scenario, dtype)
            resumed.load_state_dict(saved)
        else:
            if step == stop:
                saved = round_trip(resumed.state_dict())
                resumed = make(scenario, dtype)
                resumed.load_state_dict(saved)
            w_resumed = loss_weights(resumed, before)
        assert torch.equal(w_never, w_resumed)
        never_stopped.update(list(after))
        resumed.update(list(after))
        for name, value in never_stopped.state_dict().items():
            assert torch.equal(value, resumed.state_dict()[name]), name


def test_state_dict_holds_tensors_only_and_everything_that_determines_the_future() -> None:
    famo = FAMOWeighting(["a", "b"], lr=0.1, gamma="official", min_losses=[-1.0, 0.5])
    famo.backward(torch.tensor([1.0, 2.0], requires_grad=True))
    state = famo.state_dict()
    assert set(state) == LAYOUT_3
    assert all(isinstance(value, torch.Tensor) for value in state.values())
    assert bytes(state["task_names_utf8"].tolist()) == b"a\x00b"
    assert state["format_version"].item() == FORMAT_VERSION == 3
    assert state["lower_bounds"].dtype == torch.float64
    assert state["lower_bounds"].tolist() == [-1.0, 0.5]
    assert state["window_sum"].tolist() == [1.0, 2.0]
    assert state["window_count"].tolist() == [1.0, 1.0]
    # What every tool does with a state dict works: detach, move, copy_ into another one.
    moved = {key: value.cpu().clone() for key, value in state.items()}
    other = FAMOWeighting(["a", "b"], lr=0.1, gamma="official").state_dict()
    for key, value in other.items():
        value.copy_(moved[key])  # EMA-style loops


def test_safetensors_round_trip_continues_bit_identically(tmp_path: Path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = torch.nn.ModuleDict({"body": torch.nn.Linear(2, 2), "famo": FAMOWeighting(["a", "b"])})
    famo = model["famo"]
    assert isinstance(famo, FAMOWeighting)
    famo.backward(torch.tensor([1.0, 2.0], requires_grad=True))
    famo.update([0.5, 1.9])
    famo.backward(torch.tensor([0.6, 1.7], requires_grad=True))  # pending when saved
    safetensors_torch.save_file(model.state_dict(), tmp_path / "model.safetensors")
    fresh = torch.nn.ModuleDict({"body": torch.nn.Linear(2, 2), "famo": FAMOWeighting(["a", "b"])})
    fresh.load_state_dict(safetensors_torch.load_file(tmp_path / "model.safetensors"))
    restored = fresh["famo"]
    assert isinstance(restored, FAMOWeighting)
    for twin in (famo, restored):
        twin.update([0.5, 1.5])
        twin.backward(torch.tensor([0.4, 1.4], requires_grad=True))
        twin.update([0.3, 1.3])
    for key, value in famo.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key


def test_pending_losses_survive_a_checkpoint() -> None:
    famo = FAMOWeighting(2)
    famo.backward(torch.tensor([1.0, 2.0], requires_grad=True))
    restored = FAMOWeighting(2)
    restored.load_state_dict(round_trip(famo.state_dict()))
    restored.update([0.5, 1.5])  # would raise if the pending losses had been lost
    famo.update([0.5, 1.5])
    assert torch.equal(restored.logits, famo.logits)


def test_a_snapshot_taken_mid_step_restores_later() -> None:
    famo = FAMOWeighting(2)
    famo.backward(torch.tensor([1.0, 2.0], requires_grad=True))
    best = famo.state_dict()  # between backward and update, as "keep the best" code does
    famo.update([0.5, 1.5])
    famo.load_state_dict(best)  # used to fail: a pending flag the live buffers no longer matched
    assert famo.pending


def test_the_constructor_owns_hyper_parameters_and_flags() -> None:
    source = FAMOWeighting(2, lr=0.1, gamma=0.0, extra_forward=True)
    source.backward(torch.tensor([1.0, 2.0], requires_grad=True))
    source.update([0.5, 1.9])
    target = FAMOWeighting(2, lr=0.01, gamma=1e-3, extra_forward=False, allow_missing_tasks=True)
    target.load_state_dict(source.state_dict())
    assert (target.lr, target.gamma, target.extra_forward, target.allow_missing_tasks) == (
        0.01,
        1e-3,
        False,
        True,
    )
    assert torch.equal(target.logits, source.logits)
    # With extra_forward=False it keeps learning from each call (it used to stop).
    before = target.logits.clone()
    target.backward(torch.tensor([1.0, 2.0], requires_grad=True))
    target.backward(torch.tensor([0.5, 1.9], requires_grad=True))
    assert not torch.equal(target.logits, before)


def test_no_parameters_and_every_state_dict_entry_is_a_registered_buffer() -> None:
    model = torch.nn.Module()
    model.body = torch.nn.Linear(2, 2)
    model.famo = FAMOWeighting(3)
    assert list(model.famo.parameters()) == []
    assert len(list(model.parameters())) == 2  # the Linear's weight and bias only
    buffers = dict(model.named_buffers())
    famo_keys = [key for key in model.state_dict() if key.startswith("famo.")]
    assert sorted(famo_keys) == sorted(f"famo.{key}" for key in LAYOUT_3)
    for key in famo_keys:
        assert torch.equal(buffers[key], model.state_dict()[key]), key
        assert model.get_buffer(key) is buffers[key]


def test_what_state_dict_returns_is_a_copy() -> None:
    famo = FAMOWeighting(2)
    famo.backward(torch.tensor([1.0, 2.0], requires_grad=True))
    for value in famo.state_dict().values():
        value.zero_()
    assert famo.pending_sum.tolist() == [1.0, 2.0] and famo.pending


def test_dtype_conversion_moves_all_state_and_never_drops_below_float32() -> None:
    famo = FAMOWeighting(3)
    state = ("logits", "exp_avg", "exp_avg_sq", "min_losses", "steps", "pending_sum")

    def dtypes() -> set[torch.dtype]:
        return {getattr(famo, name).dtype for name in state}

    assert dtypes() == {torch.float32}
    famo.double()
    assert dtypes() == {torch.float64}
    famo.half()  # e.g. model.half() on a model holding FAMO
    assert dtypes() == {torch.float64}
    famo.to(torch.bfloat16)
    assert dtypes() == {torch.float64}
    famo.float()
    assert dtypes() == {torch.float32}


def test_to_meta_device_moves_the_whole_state() -> None:
    famo = FAMOWeighting(3).to("meta")
    assert all(t.device.type == "meta" for t in (famo.logits, famo.exp_avg, famo.min_losses))


def _refused(target: torch.nn.Module, state: dict[str, torch.Tensor], message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        target.load_state_dict(state)


@pytest.mark.parametrize(
    ("saved_tasks", "message"),
    [(3, "tasks 3"), (["a", "c"], "tasks \\['a', 'c'\\]"), (["b", "a"], "tasks \\['b', 'a'\\]")],
)
def test_loading_a_checkpoint_for_other_tasks_fails_and_loads_nothing(
    saved_tasks: object, message: str
) -> None:
    saved = FAMOWeighting(saved_tasks)  # type: ignore[arg-type]
    saved.logits.fill_(1.0)
    target = FAMOWeighting(["a", "b"])
    _refused(target, saved.state_dict(), message)
    assert torch.equal(target.logits, torch.zeros(2))


def test_loading_a_newer_format_fails_clearly() -> None:
    state = FAMOWeighting(2).state_dict()
    state["format_version"] = torch.tensor(99)
    state["logits"] = torch.ones(2)
    target = FAMOWeighting(2)
    _refused(target, state, r"format version 99.*Upgrade famo")
    assert torch.equal(target.logits, torch.zeros(2))


def test_a_damaged_famo_part_is_refused_before_anything_of_it_is_copied() -> None:
    state = FAMOWeighting(2).state_dict()
    state["logits"] = torch.ones(2)
    state["exp_avg_sq"] = torch.tensor([1.0, -1.0])
    target = FAMOWeighting(2)
    _refused(target, state, r"`exp_avg_sq` should be ≥ 0")
    assert torch.equal(target.logits, torch.zeros(2))


def test_a_famo_0_1_checkpoint_still_loads() -> None:
    """Layout 1: the same seven tensors plus a dict of metadata (its hyper-parameters ignored)."""
    famo = FAMOWeighting(["a", "b"])
    famo.backward(torch.tensor([1.0, 2.0], requires_grad=True))
    famo.update([0.5, 1.9])
    new = famo.state_dict()
    state = {key: new[key] for key in ("logits", "exp_avg", "exp_avg_sq")}
    state["steps"] = new["adam_step"].expand(2).clone()
    state["min_losses"] = new["lower_bounds"].float()
    state["pending_sum"], state["pending_count"] = new["window_sum"], new["window_count"]
    state["_extra_state"] = {"format_version": 1, "tasks": ["a", "b"], "lr": 0.5}  # type: ignore[assignment]
    restored = FAMOWeighting(["a", "b"])
    restored.load_state_dict(state)
    assert torch.equal(restored.logits, famo.logits) and restored.lr == 0.025


class Pretrained(torch.nn.Module):
    """A model whose backbone comes from a checkpoint that never held FAMO."""

    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(2, 2)
        self.famo = FAMOWeighting(["a", "b"])
        self.last = torch.nn.Linear(2, 2)


def test_strict_false_reports_missing_famo_keys_and_loads_everything_else() -> None:
    source = Pretrained()
    backbone = {k: v for k, v in source.state_dict().items() if not k.startswith("famo.")}
    target = Pretrained()
    target.famo.logits.fill_(0.5)
    result = target.load_state_dict(backbone, strict=False)
    assert sorted(result.missing_keys) == sorted(f"famo.{key}" for key in LAYOUT_3)
    assert result.unexpected_keys == []
    assert torch.equal(target.last.weight, source.last.weight)  # loaded past FAMO
    assert torch.equal(target.famo.logits, torch.full((2,), 0.5))  # FAMO left as it was


def test_strict_false_reports_an_unexpected_famo_key_and_loads_the_rest() -> None:
    source = Pretrained()
    source.famo.logits.fill_(0.5)
    state = source.state_dict()
    state["famo.bogus"] = torch.zeros(1)
    target = Pretrained()
    result = target.load_state_dict(state, strict=False)
    assert result.unexpected_keys == ["famo.bogus"] and result.missing_keys == []
    assert torch.equal(target.famo.logits, source.famo.logits)


def test_strict_true_names_missing_and_unexpected_keys_as_torch_does() -> None:
    source = Pretrained()
    backbone = {k: v for k, v in source.state_dict().items() if not k.startswith("famo.")}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*famo\.logits"):
        Pretrained().load_state_dict(backbone)
    state = source.state_dict()
    state["famo.bogus"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*famo\.bogus"):
        Pretrained().load_state_dict(state)


def test_a_famo_0_2_checkpoint_still_loads_and_continues() -> None:
    """Layout 2, written by famo 0.2.0 itself (tests/data), losses pending and tasks missing."""
    saved = torch.load(Path(__file__).parent / "data" / "famo_0_2_checkpoint.pt", weights_only=True)
    famo = FAMOWeighting(
        ["seg", "depth", "normal"], min_losses=0.0, dtype=torch.float64
    )  # other bounds on purpose: the checkpoint's win
    famo.load_state_dict(saved["famo"])
    assert torch.equal(famo.logits, saved["logits"])
    assert torch.equal(famo.pending_sum, saved["pending_sum"]) and famo.pending
    assert famo.min_losses.tolist() == [0.0, -0.5, 0.25]
    famo.update(saved["pending_sum"] * 0.9)  # the pending losses were restored
    missing = FAMOWeighting(["a", "b"], allow_missing_tasks=True)
    missing.load_state_dict(saved["missing"])
    assert torch.equal(missing.logits, saved["missing_logits"])
    assert torch.equal(missing.steps, saved["missing_steps"])  # per-task step counts
    assert not missing.pending
