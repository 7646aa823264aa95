"""FAMO with Hugging Face Accelerate on CPU: an attached ``FAMOWeighting`` under
``accelerator.accumulate``, ``mixed_precision="bf16"``, ``save_state()``/``load_state()`` with
their defaults, and 2 processes started by ``accelerate launch``.

The lockstep of the hook with the explicit calls under ``accumulate`` is in test_attach.py.
"""

from __future__ import annotations

import runpy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from famo import FAMOWeighting
from tests._scripts.launch import run_script

accelerate = pytest.importorskip("accelerate")
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

SCRIPTS = Path(__file__).resolve().parent / "_scripts"
TASKS = 3


@pytest.fixture(autouse=True)
def fresh_accelerate() -> Iterator[None]:
    """Accelerate keeps its state in process-wide singletons: start and leave them empty."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def batches(count: int, dtype: torch.dtype = torch.float64) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(2)
    scale = torch.tensor([1.0, 10.0, 100.0])
    return [
        (
            torch.randn(8, 4, generator=generator).to(dtype),
            (torch.randn(8, TASKS, generator=generator) * scale).to(dtype),
        )
        for _ in range(count)
    ]


class MultiTask(nn.Module):
    """A model that holds its FAMOWeighting: FAMO's state is in the model's state_dict."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, TASKS)).to(dtype)
        self.famo = FAMOWeighting(TASKS, gamma=0.01, extra_forward=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def task_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return ((model(x) - y) ** 2).mean(dim=0)


def accelerated_steps(
    accelerator: Any, model: nn.Module, optimizer: Any, famo: FAMOWeighting, data: list[Any]
) -> None:
    """The docs' loop: the only FAMO call is ``famo.loss``."""
    for x, y in data:
        with accelerator.accumulate(model):
            accelerator.backward(famo.loss(task_losses(model, x, y)))
            optimizer.step()
            optimizer.zero_grad()


def test_bf16_mixed_precision_with_accumulation_equals_the_autocast_loop() -> None:
    accelerator = accelerate.Accelerator(
        cpu=True, mixed_precision="bf16", gradient_accumulation_steps=2
    )
    model = MultiTask(dtype=torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    model, optimizer = accelerator.prepare(model, optimizer)
    famo = accelerator.unwrap_model(model).famo
    famo.attach(optimizer)
    data = batches(8, torch.float32)
    accelerated_steps(accelerator, model, optimizer, famo, data)

    # The same with torch.autocast by hand (Accelerate's bf16 on CPU) and an attached FAMO.
    expected = MultiTask(dtype=torch.float32)
    expected_optimizer = torch.optim.SGD(expected.parameters(), lr=0.02)
    expected.famo.attach(expected_optimizer)
    for start in range(0, len(data), 2):
        expected_optimizer.zero_grad()
        for x, y in data[start : start + 2]:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outputs = expected(x)
            assert outputs.dtype == torch.bfloat16
            losses = ((outputs.float() - y) ** 2).mean(dim=0)
            (expected.famo.loss(losses) / 2).backward()
        expected_optimizer.step()

    unwrapped = accelerator.unwrap_model(model)
    for a, b in zip(unwrapped.net.parameters(), expected.net.parameters(), strict=True):
        assert torch.equal(a, b)
    assert famo.logits.dtype == torch.float32  # FAMO's own math is not in bf16
    assert famo.steps.tolist() == [3.0] * TASKS  # 4 real steps; the 4th awaits a 5th window
    assert torch.equal(famo.logits, expected.famo.logits)
    assert famo.logits.abs().min() > 1e-3


@pytest.mark.parametrize("holder", ["model", "register_for_checkpointing"])
def test_save_state_and_load_state_with_their_defaults_resume_exactly(
    holder: str, tmp_path: Path
) -> None:
    # FAMO's state goes either into the model's model.safetensors (a submodule) or into
    # custom_checkpoint_0.pkl (accelerator.register_for_checkpointing). Stopped after 2 of 4
    # windows (losses pending, a real step just happened), resumed in a fresh setup.
    data = batches(8)

    def setup(seed: int) -> tuple[Any, nn.Module, Any, FAMOWeighting]:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
        model = MultiTask(seed)
        famo = model.famo
        if holder == "register_for_checkpointing":
            del model.famo
            famo = FAMOWeighting(TASKS, gamma=0.01, extra_forward=False)
            accelerator.register_for_checkpointing(famo)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
        model, optimizer = accelerator.prepare(model, optimizer)
        famo.attach(optimizer)
        return accelerator, model, optimizer, famo

    accelerator, model, optimizer, famo = setup(seed=0)
    accelerated_steps(accelerator, model, optimizer, famo, data[:4])
    accelerator.save_state(str(tmp_path / "state"))
    files = {path.name for path in (tmp_path / "state").iterdir()}
    assert "model.safetensors" in files
    assert ("custom_checkpoint_0.pkl" in files) == (holder == "register_for_checkpointing")
    accelerated_steps(accelerator, model, optimizer, famo, data[4:])
    straight = {**model.state_dict(), **{f"famo.{k}": v for k, v in famo.state_dict().items()}}

    accelerator, model, optimizer, famo = setup(seed=3)
    accelerator.load_state(str(tmp_path / "state"))
    assert famo.pending and famo.steps.tolist() == [1.0] * TASKS
    accelerated_steps(accelerator, model, optimizer, famo, data[4:])
    resumed = {**model.state_dict(), **{f"famo.{k}": v for k, v in famo.state_dict().items()}}
    assert resumed.keys() == straight.keys()
    for key, value in straight.items():
        assert torch.equal(resumed[key], value), key
    assert famo.steps.tolist() == [3.0] * TASKS


def test_two_processes_under_accelerate_launch_equal_one_process(tmp_path: Path) -> None:
    # `accelerate launch --cpu` starts one process (several CPU processes need mpirun);
    # `--multi_gpu` starts them with torch.distributed.run, and Accelerator(cpu=True) in the
    # script makes them CPU processes on gloo. FAMO all-reduces its losses by itself.
    from tests._scripts import accelerate_train

    out = tmp_path / "rank0.pt"
    run_script(
        SCRIPTS / "accelerate_cli.py",
        "launch",
        "--multi_gpu",
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        "--main_process_port=0",
        str(SCRIPTS / "accelerate_train.py"),
        str(out),
    )
    two = torch.load(out)
    accelerator = accelerate.Accelerator(
        cpu=True, gradient_accumulation_steps=accelerate_train.ACCUMULATE
    )
    model, famo = accelerate_train.train(accelerator)
    assert torch.equal(two["logits_of_every_rank"][0], two["logits_of_every_rank"][1])
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(two["parameters"][name], parameter, rtol=1e-12, atol=1e-14)
    for name, value in famo.state_dict().items():
        torch.testing.assert_close(two["famo"][name], value, rtol=1e-10, atol=1e-14)
    assert famo.steps.tolist() == [2.0] * TASKS  # 3 windows: the 3rd awaits a 4th


def test_the_readme_accelerate_example_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # it saves a checkpoint folder
    torch.manual_seed(0)
    namespace = runpy.run_path(str(SCRIPTS / "readme_accelerate.py"), run_name="readme")
    famo = namespace["famo"]
    assert famo.steps.tolist() == [3.0, 3.0]  # 16 micro-batches, 4 real steps
    assert famo.pending  # the 4th step's losses await the next batch (and are in the checkpoint)
    assert "custom_checkpoint_0.pkl" in {p.name for p in (tmp_path / "checkpoint").iterdir()}
    assert "weights: {'famo/small'" in capsys.readouterr().out
