"""FAMO's state inside PyTorch's module contract: every ``state_dict()`` entry is a registered
buffer, so every tool that finds a module's tensors by their ``state_dict`` key finds FAMO's.

With the real APIs, offline: ``torch.distributed.checkpoint.state_dict`` (``get_model_state_dict``,
``set_model_state_dict``, ``get_state_dict(model, optimizer)``), ``save_pretrained`` /
``from_pretrained`` of a small ``PreTrainedModel`` built from a config,
``torch.func.functional_call``, Accelerate's ``load_checkpoint_and_dispatch`` on a CPU-only
device map. What held before still holds: 16-bit conversions keep FAMO's precision, layout 1 and
2 checkpoints load, ``strict`` rules apply, no host sync. Beyond the named cases, the other ways
a module's buffers are reached: ``load_state_dict(assign=True)`` (also onto a meta model),
``to_empty`` + ``reset_parameters``, ``Module.type``, ``copy.deepcopy``, pickling the whole
model, ``safetensors.torch.save_model``/``load_model``, ``share_memory``, ``AveragedModel`` with
``use_buffers=True``.
"""

from __future__ import annotations

import copy
import io
import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from famo import FORMAT_VERSION, FAMOWeighting
from tests.helpers import LAYOUT_3
from tests.test_compile import no_host_sync

F64 = torch.float64
TASKS = ("a", "b", "c")
BOUNDS = (0.0, -0.25, 0.1)


class MultiTask(nn.Module):
    """A model holding its FAMOWeighting; ``forward`` returns FAMO's objective."""

    def __init__(self, seed: int = 0, **famo: Any) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, len(TASKS))).double()
        self.famo = FAMOWeighting(TASKS, min_losses=list(BOUNDS), dtype=F64, **famo)

    def task_losses(self, x: Tensor, y: Tensor) -> Tensor:
        return ((self.net(x) - y) ** 2).mean(dim=0) + 0.5

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.famo.loss(self.task_losses(x, y))


def make_data(count: int) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(1)
    scale = torch.tensor([1.0, 10.0, 100.0], dtype=F64)
    return [
        (
            torch.randn(8, 4, generator=generator, dtype=F64),
            torch.randn(8, len(TASKS), generator=generator, dtype=F64) * scale,
        )
        for _ in range(count)
    ]


DATA = make_data(6)


def sgd(model: nn.Module, momentum: float = 0.0) -> torch.optim.Optimizer:
    """The model's optimizer; an ``extra_forward=False`` FAMO is attached to it."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=momentum)
    famo = model.get_submodule("famo")
    assert isinstance(famo, FAMOWeighting)
    if not famo.extra_forward:
        famo.attach(optimizer)
    return optimizer


def steps(model: MultiTask, optimizer: torch.optim.Optimizer, data: list[Any]) -> None:
    """The README's loop (``update`` after each step with ``extra_forward=True``)."""
    for x, y in data:
        optimizer.zero_grad()
        model(x, y).backward()
        optimizer.step()
        if model.famo.extra_forward:
            with torch.no_grad():
                model.famo.update(model.task_losses(x, y))


def trained(
    seed: int = 0, momentum: float = 0.0, **famo: Any
) -> tuple[MultiTask, torch.optim.Optimizer]:
    """Three steps, then a fourth batch's backward and optimizer step: its losses still pending
    (and, attached, marked as followed by a real step)."""
    model = MultiTask(seed, **famo)
    optimizer = sgd(model, momentum)
    steps(model, optimizer, DATA[:3])
    x, y = DATA[3]
    optimizer.zero_grad()
    model(x, y).backward()
    optimizer.step()
    assert model.famo.pending
    return model, optimizer


def finish(model: MultiTask, optimizer: torch.optim.Optimizer) -> None:
    """Ends the pending step (the fourth batch's after-losses) and takes two more steps."""
    if model.famo.extra_forward:
        with torch.no_grad():
            model.famo.update(model.task_losses(*DATA[3]))
    steps(model, optimizer, DATA[4:6])


def assert_same_state(a: nn.Module, b: nn.Module, prefix: str = "") -> None:
    """Every entry of the two state dicts (under ``prefix``) equal, bit for bit, same dtype."""
    sa = {k: v for k, v in a.state_dict().items() if k.startswith(prefix)}
    sb = {k: v for k, v in b.state_dict().items() if k.startswith(prefix)}
    assert sa.keys() == sb.keys()
    for key, value in sa.items():
        assert value.dtype == sb[key].dtype, key
        assert torch.equal(value, sb[key]), key


def famo_keys(prefix: str = "famo.") -> set[str]:
    return {prefix + key for key in LAYOUT_3}


# ---------------------------------------------------------------------- every entry is a buffer


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"extra_forward": False},
        {"allow_missing_tasks": True},
        {"warmup_steps": 1, "update_every": 2},
    ],
    ids=["default", "attached", "missing_tasks", "schedule"],
)
def test_every_state_dict_entry_is_a_registered_buffer(options: dict[str, Any]) -> None:
    model, _ = trained(**options)
    famo = model.famo
    state, buffers = famo.state_dict(), dict(famo.named_buffers())
    assert set(state) == LAYOUT_3
    assert set(state) <= set(buffers)
    for key, value in state.items():
        assert value.dtype == buffers[key].dtype and torch.equal(value, buffers[key]), key
    # The same for the model that holds it: every key names a parameter or a buffer.
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert set(model.state_dict()) <= set(tensors)
    assert list(famo.parameters()) == []  # no optimizer of the model steps FAMO
    assert state["format_version"].item() == FORMAT_VERSION == 3
    assert state["format_version"].dtype == torch.int64
    assert state["task_names_utf8"].dtype == torch.uint8
    assert bytes(state["task_names_utf8"].tolist()) == b"a\x00b\x00c"
    assert state["lower_bounds"].dtype == F64 and state["lower_bounds"].tolist() == list(BOUNDS)
    assert state["adam_step"].dtype == torch.float32
    assert state["adam_step"].shape == ((3,) if options.get("allow_missing_tasks") else ())
    # state_dict() holds copies: editing it in place never reaches the live object.
    before = {key: value.clone() for key, value in buffers.items()}
    for value in state.values():
        value.zero_()
    for key, value in famo.named_buffers():
        assert torch.equal(value, before[key]), key


# ---------------------------------------------------------------------- distributed checkpoint


@pytest.mark.parametrize("extra_forward", [True, False])
def test_get_and_set_model_state_dict_round_trip_exactly(extra_forward: bool) -> None:
    # DCP resolves every key to a module attribute (and loads through load_state_dict): it used
    # to fail with AttributeError on a key that named no attribute.
    model, optimizer = trained(extra_forward=extra_forward)
    saved = get_model_state_dict(model)
    assert set(saved) == set(model.state_dict()) and famo_keys() <= set(saved)
    restored = MultiTask(seed=5, extra_forward=extra_forward)
    assert not torch.equal(restored.net[0].weight, model.net[0].weight)
    set_model_state_dict(restored, saved)
    assert_same_state(restored, model)
    assert restored.famo.pending
    restored_optimizer = sgd(restored)
    finish(model, optimizer)
    finish(restored, restored_optimizer)
    assert_same_state(restored, model)
    assert model.famo.logits.abs().min() > 1e-4  # it did learn


@pytest.mark.parametrize("extra_forward", [True, False])
def test_get_state_dict_with_the_optimizer_round_trips_exactly(extra_forward: bool) -> None:
    model, optimizer = trained(momentum=0.9, extra_forward=extra_forward)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    buffer = io.BytesIO()
    torch.save({"model": model_state, "optimizer": optimizer_state}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    restored = MultiTask(seed=5, extra_forward=extra_forward)
    restored_optimizer = sgd(restored, momentum=0.9)
    set_state_dict(
        restored,
        restored_optimizer,
        model_state_dict=saved["model"],
        optim_state_dict=saved["optimizer"],
    )
    assert_same_state(restored, model)
    finish(model, optimizer)
    finish(restored, restored_optimizer)
    assert_same_state(restored, model)


# ---------------------------------------------------------------------- Hugging Face transformers

VOCAB = 12


def gpt2_with_famo() -> Any:
    """A real ``PreTrainedModel`` class holding FAMO: three tasks, the next-token loss on each
    third of the positions."""
    transformers = pytest.importorskip("transformers")

    class GPT2WithFAMO(transformers.GPT2LMHeadModel):  # type: ignore[misc]
        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self.famo = FAMOWeighting(TASKS, min_losses=list(BOUNDS))

        def task_losses(self, ids: Tensor) -> Tensor:
            logits = self(input_ids=ids).logits[:, :-1]
            tokens = nn.functional.cross_entropy(
                logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none"
            ).view(ids.shape[0], -1)
            return torch.stack([part.mean() for part in tokens.chunk(3, dim=1)])

    return GPT2WithFAMO


def tiny_gpt2(cls: Any) -> Any:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return cls(config)


def token_batch(seed: int) -> Tensor:
    return torch.randint(VOCAB, (4, 10), generator=torch.Generator().manual_seed(seed))


def lm_steps(model: Any, optimizer: torch.optim.Optimizer, seeds: range) -> None:
    for seed in seeds:
        ids = token_batch(seed)
        optimizer.zero_grad()
        model.famo.loss(model.task_losses(ids)).backward()
        optimizer.step()
        if seed != 2:  # the third step's losses stay pending until after the save
            with torch.no_grad():
                model.famo.update(model.task_losses(ids))


@pytest.mark.parametrize("options", [{}, {"dtype": torch.bfloat16}], ids=["auto", "bfloat16"])
def test_save_pretrained_and_from_pretrained_restore_famo_exactly(
    options: dict[str, Any], tmp_path: Path
) -> None:
    # from_pretrained builds the model on the meta device and sets each checkpoint tensor on the
    # module that its key names (as a buffer, or else as a new Parameter): it used to fail with
    # KeyError "attribute 'exp_avg' already exists".
    safetensors_torch = pytest.importorskip("safetensors.torch")
    cls = gpt2_with_famo()
    model = tiny_gpt2(cls)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    lm_steps(model, optimizer, range(3))
    assert model.famo.pending
    model.save_pretrained(tmp_path)
    assert famo_keys() <= set(safetensors_torch.load_file(tmp_path / "model.safetensors"))

    loaded = cls.from_pretrained(tmp_path, **options)
    assert_same_state(loaded, model, prefix="famo.")  # bit for bit, float32 (bounds float64)
    assert loaded.famo.pending and loaded.famo.logits.device.type == "cpu"
    if options:
        assert loaded.transformer.wte.weight.dtype == torch.bfloat16  # only the model's weights
        return
    assert_same_state(loaded, model)
    loaded.train()  # from_pretrained returns the model in eval mode
    loaded_optimizer = torch.optim.SGD(loaded.parameters(), lr=0.1)
    for twin, twin_optimizer in ((model, optimizer), (loaded, loaded_optimizer)):
        with torch.no_grad():
            twin.famo.update(twin.task_losses(token_batch(2)))
        lm_steps(twin, twin_optimizer, range(3, 5))
    assert_same_state(loaded, model)
    assert model.famo.steps.tolist() == [5.0] * len(TASKS)


# ---------------------------------------------------------------------- torch.func.functional_call


def test_functional_call_with_the_state_dict_works_and_leaves_the_module_alone() -> None:
    model, _ = trained()
    twin = copy.deepcopy(model)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    x, y = DATA[4]
    with torch.no_grad():  # evaluating a state dict (an EMA's, say) without loading it
        value = torch.func.functional_call(model, model.state_dict(), (x, y))
        assert torch.equal(value, twin(x, y))  # what the module itself computes
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[key]), key  # swapped back, nothing written through

    # strict=True: the dict must name every parameter and buffer, FAMO's included.
    tensors = {
        **dict(model.named_parameters()),
        **{key: value.clone() for key, value in model.named_buffers()},
    }
    value = torch.func.functional_call(model, tensors, (x, y), strict=True)
    value.backward()
    assert model.net[0].weight.grad is not None
    for key, tensor in model.state_dict().items():
        if key.startswith("famo."):
            assert torch.equal(tensor, before[key]), key
    without_famo = {k: v for k, v in tensors.items() if not k.startswith("famo.")}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*'famo\.logits'"):
        torch.func.functional_call(model, without_famo, (x, y), strict=True)


# ---------------------------------------------------------------------- Accelerate's big models


@pytest.mark.parametrize("device_map", [{"": "cpu"}, "auto"], ids=["cpu", "auto"])
@pytest.mark.parametrize("include_buffers", [False, True])
def test_load_checkpoint_and_dispatch_restores_famo_exactly(
    include_buffers: bool, device_map: Any, tmp_path: Path
) -> None:
    # Accelerate sets each checkpoint tensor with set_module_tensor_to_device, which accepts only
    # a parameter or a buffer of the module that the key names.
    accelerate = pytest.importorskip("accelerate")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model, optimizer = trained()
    safetensors_torch.save_file(model.state_dict(), tmp_path / "model.safetensors")
    with accelerate.init_empty_weights(include_buffers=include_buffers):
        empty = MultiTask(seed=5)
    assert empty.net[0].weight.device.type == "meta"
    restored = accelerate.load_checkpoint_and_dispatch(
        empty, str(tmp_path / "model.safetensors"), device_map=device_map
    )
    assert_same_state(restored, model)
    restored_optimizer = sgd(restored)
    finish(model, optimizer)
    finish(restored, restored_optimizer)
    assert_same_state(restored, model)


# ---------------------------------------------------------------------- dtypes

EXACT_BOUNDS = (0.1, -1.0 / 3.0, 1e-3)  # not representable in float32


@pytest.mark.parametrize(
    "convert",
    [
        lambda m: m.half(),
        lambda m: m.bfloat16(),
        lambda m: m.to(torch.float16),
        lambda m: m.type(torch.float16),  # Module.type converts every buffer, integers too
    ],
    ids=["half", "bfloat16", "to_float16", "type_float16"],
)
def test_16_bit_conversions_keep_famo_float32_and_the_bounds_exact(convert: Any) -> None:
    model = nn.Module()
    model.net = nn.Linear(4, 3)
    model.famo = FAMOWeighting(TASKS, min_losses=list(EXACT_BOUNDS))
    famo = model.famo
    famo.backward(torch.tensor([1.0, 2.0, 3.0], requires_grad=True))  # something pending
    before = {key: value.clone() for key, value in famo.state_dict().items()}
    convert(model)
    assert model.net.weight.dtype in (torch.float16, torch.bfloat16)
    for key, value in famo.state_dict().items():
        assert value.dtype == before[key].dtype, key  # float32 state, float64 bounds, integers
        assert torch.equal(value, before[key]), key
    assert famo.state_dict()["lower_bounds"].tolist() == list(EXACT_BOUNDS)
    famo.update(torch.tensor([0.9, 1.9, 2.9], dtype=torch.float16))  # 16-bit losses: promoted
    assert famo.steps.tolist() == [1.0] * len(TASKS)
    model.double()
    assert famo.logits.dtype == F64 and famo.min_losses.tolist() == list(EXACT_BOUNDS)
    model.float()
    assert famo.logits.dtype == torch.float32
    assert famo.state_dict()["lower_bounds"].tolist() == list(EXACT_BOUNDS)


# ---------------------------------------------------------------------- layouts 1 and 2

#: Written by famo 0.2 (layout 2): FAMOWeighting(["a", "b", "c"], min_losses=[0, -0.25, 0.1],
#: dtype=torch.float64) after backward(SEQUENCE[0]), update(SEQUENCE[1]), backward(SEQUENCE[1]),
#: update(SEQUENCE[2]), backward(SEQUENCE[2]): two logit steps, SEQUENCE[2] pending. Attached
#: with extra_forward=False, three loss calls each followed by an optimizer step, it wrote the
#: same numbers with pending_stepped True.
SEQUENCE = [
    (1.0, 2.0, 30.0),
    (0.9, 1.9, 25.0),
    (0.8, 1.85, 24.0),
    (0.7, 1.6, 20.0),
    (0.65, 1.5, 18.0),
]
LAYOUT_2_FLOATS = {
    "logits": [0.008199411184364156, 0.048820653283657506, -0.036276297604667856],
    "exp_avg": [0.001746025363721268, -0.003244589003744926, 0.0015010636272408898],
    "exp_avg_sq": [3.7380372533206686e-07, 6.420912586954741e-07, 6.132667978477661e-07],
    "steps": [2.0, 2.0, 2.0],
    "min_losses": [0.0, -0.25, 0.1],
    "pending_sum": [0.8, 1.85, 24.0],
    "pending_count": [1.0, 1.0, 1.0],
}


def old_checkpoint(layout: int, stepped: bool) -> dict[str, Any]:
    state: dict[str, Any] = {
        key: torch.tensor(values, dtype=F64) for key, values in LAYOUT_2_FLOATS.items()
    }
    if layout == 1:  # famo 0.1: the same float tensors and a dict of metadata
        state["_extra_state"] = {"format_version": 1, "tasks": list(TASKS), "lr": 0.5}
    else:
        state["pending_stepped"] = torch.tensor(stepped)
        state["task_names"] = torch.tensor(list(b"a\x00b\x00c"), dtype=torch.uint8)
        state["format_version"] = torch.tensor(2)
    return state


def leaf(row: tuple[float, ...]) -> Tensor:
    return torch.tensor(row, dtype=F64, requires_grad=True)


@pytest.mark.parametrize(
    ("layout", "attached"), [(1, False), (2, False), (2, True)], ids=["v1", "v2", "v2_attached"]
)
def test_layout_1_and_2_checkpoints_still_load(layout: int, attached: bool) -> None:
    holder = nn.Module()
    holder.famo = FAMOWeighting(
        TASKS, min_losses=list(BOUNDS), dtype=F64, extra_forward=not attached
    )
    old = {f"famo.{key}": value for key, value in old_checkpoint(layout, attached).items()}
    holder.load_state_dict(old)  # strict: a whole old layout reports no missing key
    loaded = holder.famo
    assert loaded.logits.tolist() == LAYOUT_2_FLOATS["logits"]  # taken exactly
    assert loaded.pending and set(loaded.state_dict()) == LAYOUT_3
    assert loaded.state_dict()["format_version"].item() == 3

    # The same history run by this famo: the same state, and the same steps from there on.
    reference = FAMOWeighting(TASKS, min_losses=list(BOUNDS), dtype=F64)
    for before, after in itertools.pairwise(SEQUENCE[:3]):
        reference.backward(leaf(before))
        reference.update(list(after))
    reference.backward(leaf(SEQUENCE[2]))
    for key, value in reference.state_dict().items():
        if key != "window_stepped":
            torch.testing.assert_close(loaded.state_dict()[key], value, rtol=1e-12, atol=1e-18)
    if attached:  # the pending losses were followed by a real step: the next call learns
        parameter = nn.Parameter(torch.zeros(1, dtype=F64))
        optimizer = torch.optim.SGD([parameter], lr=0.1)
        loaded.attach(optimizer)
        for row in SEQUENCE[3:]:
            optimizer.zero_grad()
            loaded.backward(leaf(row))
            optimizer.step()
    else:
        loaded.update(list(SEQUENCE[3]))
        loaded.backward(leaf(SEQUENCE[3]))
        loaded.update(list(SEQUENCE[4]))
    reference.update(list(SEQUENCE[3]))
    reference.backward(leaf(SEQUENCE[3]))
    reference.update(list(SEQUENCE[4]))
    assert loaded.steps.tolist() == reference.steps.tolist() == [4.0] * len(TASKS)
    torch.testing.assert_close(loaded.logits, reference.logits, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------- strict rules


class Pretrained(nn.Module):
    """A model whose backbone comes from a checkpoint that never held FAMO."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(2, 2)
        self.famo = FAMOWeighting(TASKS)
        self.last = nn.Linear(2, 2)


def test_strict_rules_apply_to_famo_keys_as_to_any_buffer() -> None:
    source = Pretrained()
    backbone = {k: v for k, v in source.state_dict().items() if not k.startswith("famo.")}
    target = Pretrained()
    target.famo.logits.fill_(0.5)
    result = target.load_state_dict(backbone, strict=False)
    assert set(result.missing_keys) == famo_keys() and result.unexpected_keys == []
    assert torch.equal(target.last.weight, source.last.weight)  # loaded past FAMO
    assert torch.equal(target.famo.logits, torch.full((3,), 0.5))  # FAMO left as it was

    source.famo.logits.fill_(0.25)
    state = {**source.state_dict(), "famo.bogus": torch.zeros(1)}
    result = target.load_state_dict(state, strict=False)
    assert result.unexpected_keys == ["famo.bogus"] and result.missing_keys == []
    assert torch.equal(target.famo.logits, source.famo.logits)

    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*famo\.logits"):
        Pretrained().load_state_dict(backbone)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*famo\.bogus"):
        Pretrained().load_state_dict(state)


# ---------------------------------------------------------------------- no host sync


@pytest.mark.parametrize("extra_forward", [True, False])
def test_a_restored_model_trains_without_host_sync(extra_forward: bool) -> None:
    # validate=False: loss, backward, update, state_dict() and the weights make no host sync,
    # also on an object whose buffers were just replaced by a checkpoint loader.
    model, _ = trained(extra_forward=extra_forward)
    restored = MultiTask(seed=5, extra_forward=extra_forward, validate=False)
    set_model_state_dict(restored, get_model_state_dict(model))
    optimizer = sgd(restored)
    famo = restored.famo
    with no_host_sync():
        if extra_forward:
            famo.update(restored.task_losses(*DATA[3]).detach())
        for x, y in DATA[4:6]:
            optimizer.zero_grad()
            famo.backward(restored.task_losses(x, y))
            optimizer.step()
            if extra_forward:
                with torch.no_grad():
                    famo.update(restored.task_losses(x, y))
            restored.state_dict()
            famo.weights_dict()
    assert famo.steps.tolist() == [6.0 if extra_forward else 5.0] * len(TASKS)


# ---------------------------------------------------------------------- beyond the named cases


def test_load_state_dict_with_assign_trains_on_copies_of_the_assigned_tensors() -> None:
    # assign=True (also the way to load onto a model built on the meta device): FAMO's buffers
    # take the checkpoint tensors' device and dtype, as copies: nothing FAMO keeps aliases a
    # tensor the caller holds, so editing the checkpoint afterwards changes nothing.
    model, optimizer = trained()
    saved = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.device("meta"):
        restored = MultiTask(seed=5)
    restored.load_state_dict(saved, assign=True)
    assert restored.famo.logits.device == saved["famo.logits"].device
    saved["famo.logits"].add_(1.0)
    saved["famo.window_sum"].add_(1.0)
    assert_same_state(restored, model)
    restored_optimizer = sgd(restored)
    finish(model, optimizer)
    finish(restored, restored_optimizer)
    assert_same_state(restored, model)


def test_to_empty_and_reset_parameters_give_a_fresh_famo() -> None:
    with torch.device("meta"):
        deferred = MultiTask()
    deferred.to_empty(device="cpu")
    deferred.famo.reset_parameters()
    fresh = MultiTask()
    assert_same_state(deferred, fresh, prefix="famo.")  # names, version, exact bounds included
    deferred.net.load_state_dict(fresh.net.state_dict())
    for twin in (deferred, fresh):
        twin_optimizer = sgd(twin)
        steps(twin, twin_optimizer, DATA[:2])
    assert_same_state(deferred, fresh)


def _deepcopy(model: nn.Module, tmp_path: Path) -> nn.Module:
    return copy.deepcopy(model)


def _pickled(model: nn.Module, tmp_path: Path) -> nn.Module:
    torch.save(model, tmp_path / "model.pt")
    loaded: nn.Module = torch.load(tmp_path / "model.pt", weights_only=False)
    return loaded


def _safetensors_model(model: nn.Module, tmp_path: Path) -> nn.Module:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    safetensors_torch.save_model(model, str(tmp_path / "model.safetensors"))
    restored = MultiTask(seed=5)
    missing, unexpected = safetensors_torch.load_model(
        restored, str(tmp_path / "model.safetensors")
    )
    assert not missing and not unexpected
    return restored


def _shared_memory(model: nn.Module, tmp_path: Path) -> nn.Module:
    model.share_memory()  # in place: the same object, its buffers moved to shared memory
    assert all(buffer.is_shared() for buffer in model.get_submodule("famo").buffers())
    return model


@pytest.mark.parametrize(
    "copy_of", [_deepcopy, _pickled, _safetensors_model, _shared_memory], ids=lambda f: f.__name__
)
def test_other_ways_to_copy_a_model_continue_identically(copy_of: Any, tmp_path: Path) -> None:
    model, optimizer = trained()
    expected, expected_optimizer = trained()
    other = copy_of(model, tmp_path)
    assert_same_state(other, expected)
    if other is not model:
        other_optimizer = sgd(other)
        finish(other, other_optimizer)
        assert_same_state(model, trained()[0])  # training the copy left the original alone
    else:
        finish(other, optimizer)
    finish(expected, expected_optimizer)
    assert_same_state(other, expected)


@pytest.mark.parametrize("averaging", ["swa", "ema"])
def test_averaged_model_with_buffers_runs_over_a_model_holding_famo(averaging: str) -> None:
    # AveragedModel(use_buffers=True) (also Lightning's WeightAveraging default) averages every
    # buffer; its default SWA rule cannot subtract bool tensors. The averaged copy evaluates,
    # keeps FAMO's constants, and the live model trains as without it.
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    options = {"multi_avg_fn": get_ema_multi_avg_fn(0.999)} if averaging == "ema" else {}
    model, optimizer = trained()
    averaged = AveragedModel(model, use_buffers=True, **options)
    with torch.no_grad():
        model.famo.update(model.task_losses(*DATA[3]))
    for x, y in DATA[4:6]:
        steps(model, optimizer, [(x, y)])
        averaged.update_parameters(model)
    twin, twin_optimizer = trained()
    finish(twin, twin_optimizer)
    assert_same_state(model, twin)
    constants = averaged.module.famo.state_dict()
    assert constants["format_version"].item() == 3
    assert bytes(constants["task_names_utf8"].tolist()) == b"a\x00b\x00c"
    with torch.no_grad():
        value = averaged.module(*DATA[0])
    assert torch.isfinite(value)


def test_from_pretrained_of_a_backbone_without_famo_asks_for_reset_parameters(
    tmp_path: Path,
) -> None:
    # A backbone checkpoint (no FAMO keys) loaded into a model class that adds FAMO: the loader
    # fills the missing buffers with uninitialised memory. famo refuses to compute with it and
    # says what to do; after reset_parameters() the object is a fresh FAMO.
    transformers = pytest.importorskip("transformers")
    backbone = tiny_gpt2(transformers.GPT2LMHeadModel)
    backbone.save_pretrained(tmp_path)
    loaded = gpt2_with_famo().from_pretrained(tmp_path)
    assert torch.equal(
        loaded.transformer.wte.weight, backbone.transformer.wte.weight
    )  # the backbone came through
    # (Uninitialised memory that passed every check of a checkpoint would be a valid state.)
    with pytest.raises(RuntimeError, match=r"not a FAMO state.*reset_parameters\(\)"):
        loaded.famo.loss(loaded.task_losses(token_batch(0)))
    loaded.famo.reset_parameters()
    fresh = FAMOWeighting(TASKS, min_losses=list(BOUNDS))
    assert_same_state(loaded.famo, fresh)
    loaded.train()
    lm_steps(loaded, torch.optim.SGD(loaded.parameters(), lr=0.1), range(2))
    assert loaded.famo.steps.tolist() == [2.0] * len(TASKS)


def test_a_step_with_every_learning_rate_zero_is_not_a_step_to_learn_from() -> None:
    # torch.distributed.checkpoint creates an optimizer's state by a step with lr 0 (and warm-up
    # schedules may start at 0): the model does not change, so an attached FAMO must not count
    # it as the step its recorded losses were waiting for.
    model = MultiTask(extra_forward=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)  # no state yet
    model.famo.attach(optimizer)
    (x, y), (x2, y2) = DATA[0], DATA[1]
    model(x, y).backward()  # recorded, waiting for a real step
    get_state_dict(model, optimizer)  # runs optimizer.step() with every lr 0
    assert optimizer.param_groups[0]["lr"] == 0.01
    model(x2, y2)  # learns only where a real step followed the recorded losses
    assert model.famo.steps.tolist() == [0.0] * len(TASKS)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()  # a warm-up step at lr 0, by hand
    model(x2, y2)
    assert model.famo.steps.tolist() == [0.0] * len(TASKS)
    for group in optimizer.param_groups:
        group["lr"] = 0.01
    optimizer.step()  # a real one
    model(x2, y2)
    assert model.famo.steps.tolist() == [1.0] * len(TASKS)
