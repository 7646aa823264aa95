"""State: buffers only, moved by .to(), saved and restored bit-identically at any step."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from famo import FAMOWeighting
from tests.helpers import loss_weights
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
            resumed = FAMOWeighting(scenario.num_tasks, dtype=dtype)  # defaults: all restored
            resumed.load_state_dict(saved)
        else:
            if step == stop:
                saved = round_trip(resumed.state_dict())
                resumed = FAMOWeighting(scenario.num_tasks, dtype=dtype)
                resumed.load_state_dict(saved)
            w_resumed = loss_weights(resumed, before)
        assert torch.equal(w_never, w_resumed)
        never_stopped.update(list(after))
        resumed.update(list(after))
        for name, value in never_stopped.state_dict().items():
            other = resumed.state_dict()[name]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


def test_state_dict_holds_everything_that_determines_the_future() -> None:
    famo = FAMOWeighting(["a", "b"], lr=0.1, gamma="official", min_losses=[-1.0, 0.5])
    famo.backward(torch.tensor([1.0, 2.0], requires_grad=True))
    state = famo.state_dict()
    assert set(state) == {
        "logits",
        "exp_avg",
        "exp_avg_sq",
        "steps",
        "min_losses",
        "pending_sum",
        "pending_count",
        "_extra_state",
    }
    extra = state["_extra_state"]
    assert extra["tasks"] == ["a", "b"]
    assert (extra["lr"], extra["gamma"], extra["pending"]) == (0.1, 1e-5, True)
    assert state["min_losses"].tolist() == [-1.0, 0.5]
    assert state["pending_sum"].tolist() == [1.0, 2.0]


def test_pending_losses_survive_a_checkpoint() -> None:
    famo = FAMOWeighting(2)
    famo.backward(torch.tensor([1.0, 2.0], requires_grad=True))
    restored = FAMOWeighting(2)
    restored.load_state_dict(round_trip(famo.state_dict()))
    restored.update([0.5, 1.5])  # would raise if the pending losses had been lost
    famo.update([0.5, 1.5])
    assert torch.equal(restored.logits, famo.logits)


def test_no_parameters_so_a_model_optimizer_never_steps_the_logits() -> None:
    model = torch.nn.Module()
    model.body = torch.nn.Linear(2, 2)
    model.famo = FAMOWeighting(3)
    assert list(model.famo.parameters()) == []
    assert len(list(model.parameters())) == 2  # the Linear's weight and bias only
    assert "famo.logits" in model.state_dict()


def test_dtype_conversion_moves_all_state_and_never_drops_below_float32() -> None:
    famo = FAMOWeighting(3)
    assert all(t.dtype == torch.float32 for t in famo.buffers())
    famo.double()
    assert all(t.dtype == torch.float64 for t in famo.buffers())
    famo.half()  # e.g. model.half() on a model holding FAMO
    assert all(t.dtype == torch.float64 for t in famo.buffers())
    famo.to(torch.bfloat16)
    assert all(t.dtype == torch.float64 for t in famo.buffers())
    famo.float()
    assert all(t.dtype == torch.float32 for t in famo.buffers())


def test_to_meta_device_moves_every_buffer() -> None:
    famo = FAMOWeighting(3).to("meta")
    assert all(t.device.type == "meta" for t in famo.buffers())


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
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(saved.state_dict())
    assert torch.equal(target.logits, torch.zeros(2))


def test_loading_a_newer_format_fails_clearly() -> None:
    state = FAMOWeighting(2).state_dict()
    state["_extra_state"] = {**state["_extra_state"], "format_version": 99}
    state["logits"] = torch.ones(2)
    target = FAMOWeighting(2)
    with pytest.raises(ValueError, match=r"format version 99.*Upgrade famo"):
        target.load_state_dict(state)
    assert torch.equal(target.logits, torch.zeros(2))


def test_loading_a_checkpoint_without_famo_metadata_fails_clearly() -> None:
    state = FAMOWeighting(2).state_dict()
    del state["_extra_state"]
    with pytest.raises(ValueError, match="_extra_state"):
        FAMOWeighting(2).load_state_dict(state)
