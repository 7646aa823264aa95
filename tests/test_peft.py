"""famo.transformers.FAMOTrainer with a PEFT (LoRA) model: FAMO's state survives adapter-only saves.

A PEFT model's checkpoint holds only its adapter; FAMOTrainer writes FAMO's ``state_dict`` as
``famo_state.safetensors`` beside it and loads it on ``resume_from_checkpoint``, so a resumed
run equals one that never stopped, bit for bit, with both ``extra_forward`` settings. With
``modules_to_save=["famo"]`` the trainer drives the copy that PEFT trains and saves. The page
docs/recipes/peft.md is ``tests/_scripts/docs_peft.py``, run here.
"""

from __future__ import annotations

import runpy
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
peft = pytest.importorskip("peft", reason="the PEFT tests need `pip install peft`")
safetensors_torch = pytest.importorskip("safetensors.torch")
from famo import FAMOWeighting  # noqa: E402
from famo.transformers import FAMOTrainer  # noqa: E402
from tests.test_transformers import BATCH, MultiTask, arguments, dataset, trainer  # noqa: E402

SCRIPTS = Path(__file__).resolve().parent / "_scripts"
STEPS, ACCUMULATE = 4, 2
OPTIONS = {"gradient_accumulation_steps": ACCUMULATE, "save_strategy": "steps"}


def lora(extra_forward: bool, seed: int = 0, **config: Any) -> Any:
    """The same base model every time (the pretrained weights), LoRA on both layers."""
    model = MultiTask(extra_forward=extra_forward)  # seeds the base weights itself
    torch.manual_seed(seed)  # LoRA's initial A matrices
    return peft.get_peft_model(
        model, peft.LoraConfig(r=4, target_modules=["net.0", "net.2"], **config)
    )


def famo_of(model: Any) -> FAMOWeighting:
    found = model.famo.loss.__self__  # what the model's forward calls, through PEFT's wrappers
    assert isinstance(found, FAMOWeighting)
    return found


def straight_and_resumed(tmp_path: Path, extra_forward: bool, **config: Any) -> tuple[Any, Any]:
    """A run of STEPS optimizer steps that never stopped, and one resumed from its step 2."""
    data = dataset(STEPS * ACCUMULATE * BATCH)
    straight = lora(extra_forward, **config)
    trainer(
        straight, arguments(tmp_path / "straight", STEPS, save_steps=2, **OPTIONS), data
    ).train()
    resumed = lora(extra_forward, seed=7, **config)
    assert famo_of(resumed).steps.tolist() == [0.0] * 3  # FAMO from scratch until resumed
    args = arguments(tmp_path / "resumed", STEPS, save_steps=10, **OPTIONS)
    trainer(resumed, args, data).train(resume_from_checkpoint=str(checkpoint(tmp_path)))
    return straight, resumed


def checkpoint(tmp_path: Path) -> Path:
    return tmp_path / "straight" / "checkpoint-2"


def assert_bit_identical(a: nn.Module, b: nn.Module) -> None:
    first, second = a.state_dict(), b.state_dict()
    assert first.keys() == second.keys()
    for name, value in first.items():
        assert torch.equal(value, second[name]), name


@pytest.mark.parametrize("extra_forward", [False, True])
def test_resuming_a_lora_model_equals_a_run_that_never_stopped(
    extra_forward: bool, tmp_path: Path
) -> None:
    straight, resumed = straight_and_resumed(tmp_path, extra_forward)
    adapter = safetensors_torch.load_file(str(checkpoint(tmp_path) / "adapter_model.safetensors"))
    assert not any("famo" in key for key in adapter)  # the adapter alone: no FAMO in it
    saved = safetensors_torch.load_file(str(checkpoint(tmp_path) / "famo_state.safetensors"))
    assert saved["adam_step"].item() == (2.0 if extra_forward else 1.0)
    learned = STEPS if extra_forward else STEPS - 1  # without: the last step awaits a batch
    assert famo_of(resumed).steps.tolist() == [float(learned)] * 3
    assert_bit_identical(resumed, straight)  # base, adapter and FAMO


@pytest.mark.parametrize("extra_forward", [False, True])
def test_with_famo_in_modules_to_save_the_trainer_drives_the_copy_peft_saves(
    extra_forward: bool, tmp_path: Path
) -> None:
    straight, resumed = straight_and_resumed(tmp_path, extra_forward, modules_to_save=["famo"])
    wrapper = straight.base_model.model.famo
    assert wrapper.original_module.steps.tolist() == [0.0] * 3  # PEFT's frozen original
    learned = STEPS if extra_forward else STEPS - 1
    assert famo_of(straight).steps.tolist() == [float(learned)] * 3
    adapter = safetensors_torch.load_file(str(checkpoint(tmp_path) / "adapter_model.safetensors"))
    assert torch.equal(adapter["base_model.model.famo.logits"], saved_logits(tmp_path))
    assert_bit_identical(resumed, straight)
    named = FAMOTrainer(model=straight, args=arguments(tmp_path, 1), weighting="famo")
    assert named.famo is famo_of(straight)


def saved_logits(tmp_path: Path) -> torch.Tensor:
    saved = safetensors_torch.load_file(str(checkpoint(tmp_path) / "famo_state.safetensors"))
    return saved["logits"]


def test_resume_from_checkpoint_true_loads_famos_state_from_the_last_checkpoint(
    tmp_path: Path,
) -> None:
    data = dataset(STEPS * ACCUMULATE * BATCH)
    straight = lora(False)
    trainer(
        straight, arguments(tmp_path / "straight", STEPS, save_steps=2, **OPTIONS), data
    ).train()
    shutil.copytree(checkpoint(tmp_path), tmp_path / "stopped" / "checkpoint-2")  # a stopped run
    resumed = lora(False, seed=7)
    args = arguments(tmp_path / "stopped", STEPS, save_steps=10, **OPTIONS)
    trainer(resumed, args, data).train(resume_from_checkpoint=True)
    assert famo_of(resumed).steps.tolist() == [float(STEPS - 1)] * 3
    assert_bit_identical(resumed, straight)


def test_save_model_writes_famos_state_beside_the_adapter(tmp_path: Path) -> None:
    model = lora(extra_forward=False)
    run = trainer(model, arguments(tmp_path / "run", 3), dataset(3 * BATCH))
    run.train()
    run.save_model(str(tmp_path / "final"))
    saved = safetensors_torch.load_file(str(tmp_path / "final" / "famo_state.safetensors"))
    assert saved.keys() == famo_of(model).state_dict().keys()
    for name, value in famo_of(model).state_dict().items():
        assert torch.equal(saved[name], value), name
    fresh = MultiTask()
    fresh.famo.load_state_dict(saved)  # what a later run loads
    assert torch.equal(fresh.famo.logits, famo_of(model).logits)


def test_a_peft_checkpoint_without_famos_state_warns(tmp_path: Path) -> None:
    data = dataset(STEPS * ACCUMULATE * BATCH)
    run = trainer(
        lora(False), arguments(tmp_path / "straight", STEPS, save_steps=2, **OPTIONS), data
    )
    run.train()
    (checkpoint(tmp_path) / "famo_state.safetensors").unlink()  # as another trainer would save
    resumed = trainer(lora(False), arguments(tmp_path / "resumed", STEPS, **OPTIONS), data)
    with pytest.warns(UserWarning, match="holds only its adapter: FAMO goes on from its current"):
        resumed.train(resume_from_checkpoint=str(checkpoint(tmp_path)))


def test_with_famo_in_modules_to_save_peft_alone_restores_it(tmp_path: Path) -> None:
    data = dataset(STEPS * ACCUMULATE * BATCH)
    config = {"modules_to_save": ["famo"]}
    straight = lora(False, **config)
    trainer(
        straight, arguments(tmp_path / "straight", STEPS, save_steps=2, **OPTIONS), data
    ).train()
    (checkpoint(tmp_path) / "famo_state.safetensors").unlink()  # the adapter holds FAMO's copy
    resumed = lora(False, seed=7, **config)
    args = arguments(tmp_path / "resumed", STEPS, **OPTIONS)
    trainer(resumed, args, data).train(
        resume_from_checkpoint=str(checkpoint(tmp_path))
    )  # no warning
    assert_bit_identical(resumed, straight)


def test_the_peft_recipe_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # docs/recipes/peft.md: the run resumed from checkpoint-5 ends where the one that never
    # stopped ends, FAMO included, though the checkpoint's model file is the adapter alone.
    monkeypatch.chdir(tmp_path)
    namespace = runpy.run_path(str(SCRIPTS / "docs_peft.py"), run_name="docs_peft")
    straight, resumed = namespace["straight"].model, namespace["resumed"].model
    assert famo_of(straight).steps.tolist() == [9.0, 9.0]  # 10 steps; the 10th awaits a batch
    assert_bit_identical(resumed, straight)
    adapter = safetensors_torch.load_file("run/checkpoint-5/adapter_model.safetensors")
    assert not any("famo" in key for key in adapter)
    assert (tmp_path / "run" / "checkpoint-5" / "famo_state.safetensors").is_file()
