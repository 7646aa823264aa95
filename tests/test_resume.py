"""Crash-safe resume: a real training script, SIGKILLed part-way, resumes bit-identically.

And a checkpoint made for other tasks, or by a newer famo, is refused with a clear error
before anything is copied.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from famo import FORMAT_VERSION, FAMOWeighting
from tests._scripts import train_for_resume as script
from tests.helpers import assert_same_state, snapshot

ROOT = Path(__file__).resolve().parents[1]
MODULE = "tests._scripts.train_for_resume"
STEPS = 60
KILL_AFTER = 20  # first checkpoint at or past this step; the run then slows down to be killed
TIMEOUT_S = 120  # per subprocess: a hang fails the test instead of stalling CI


def _command(directory: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", MODULE, "--dir", str(directory), "--steps", str(STEPS), *args]


def _environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _run(directory: Path, *args: str) -> str:
    directory.mkdir(exist_ok=True)
    done = subprocess.run(
        _command(directory, *args),
        cwd=ROOT,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _run_and_kill(directory: Path) -> int:
    """Start a run, SIGKILL it right after a checkpoint at or past KILL_AFTER; return its step."""
    directory.mkdir(exist_ok=True)
    with (
        (directory / "stderr.txt").open("w") as stderr,
        subprocess.Popen(
            _command(directory, "--slow-after", str(KILL_AFTER)),
            cwd=ROOT,
            env=_environment(),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        ) as process,
    ):
        watchdog = threading.Timer(TIMEOUT_S, process.kill)
        watchdog.start()
        try:
            assert process.stdout is not None
            for line in process.stdout:
                if line.startswith("saved") and int(line.split()[1]) >= KILL_AFTER:
                    process.send_signal(signal.SIGKILL)
                    break
            process.wait(timeout=TIMEOUT_S)
        finally:
            watchdog.cancel()
            if process.poll() is None:
                process.kill()
                process.wait()
    errors = (directory / "stderr.txt").read_text()
    assert process.returncode == -signal.SIGKILL, f"not killed: {process.returncode} {errors}"
    checkpoint = torch.load(directory / "checkpoint.pt", weights_only=True)
    return int(checkpoint["step"])


def _assert_identical(left: Any, right: Any, where: str = "") -> None:
    if isinstance(left, torch.Tensor):
        assert isinstance(right, torch.Tensor) and torch.equal(left, right), where
    elif isinstance(left, dict):
        assert isinstance(right, dict) and left.keys() == right.keys(), where
        for key in left:
            _assert_identical(left[key], right[key], f"{where}/{key}")
    elif isinstance(left, (list, tuple)):
        assert len(left) == len(right), where
        for i, (a, b) in enumerate(zip(left, right, strict=True)):
            _assert_identical(a, b, f"{where}[{i}]")
    else:
        assert left == right, where


@pytest.mark.slow
def test_a_run_killed_after_a_checkpoint_resumes_bit_identically(tmp_path: Path) -> None:
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    _run(straight)
    killed_at = _run_and_kill(crashed)
    assert KILL_AFTER <= killed_at < STEPS
    assert not (crashed / "final.pt").exists()
    assert f"resumed {killed_at}" in _run(crashed, "--resume")
    expected = torch.load(straight / "final.pt", weights_only=True)
    resumed = torch.load(crashed / "final.pt", weights_only=True)
    _assert_identical(expected, resumed)
    # The run really trained FAMO: its logits moved away from uniform.
    assert expected["famo"]["logits"].abs().max() > 1e-3


@pytest.fixture(scope="module")
def checkpoint() -> dict[str, Any]:
    """A checkpoint as the script writes it (model, optimizer, FAMO), after a few steps."""
    model, optimizer, famo = script.build()
    for step in range(3):
        optimizer.zero_grad()
        famo.backward(script.task_losses(model, step))
        optimizer.step()
        with torch.no_grad():
            famo.update(script.task_losses(model, step))
    famo.backward(script.task_losses(model, 3))  # and losses pending at save time
    return {"model": model.state_dict(), "famo": famo.state_dict()}


def test_a_checkpoint_carries_the_format_version(checkpoint: dict[str, Any]) -> None:
    assert checkpoint["famo"]["format_version"].item() == FORMAT_VERSION


def test_a_checkpoint_round_trips_through_a_file(
    checkpoint: dict[str, Any], tmp_path: Path
) -> None:
    torch.save(checkpoint, tmp_path / "c.pt")
    famo = FAMOWeighting(script.TASKS)
    famo.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True)["famo"])
    assert_same_state(famo, checkpoint["famo"])


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize(
    "tasks",
    [
        3,  # same count, no names
        ["regression", "classification"],
        ["regression", "classification", "scale", "extra"],
        ["regression", "scale", "classification"],  # same names, other order
        ["regression", "classification", "depth"],
    ],
)
def test_a_checkpoint_for_other_tasks_is_refused_before_anything_is_copied(
    checkpoint: dict[str, Any], tasks: Any, strict: bool
) -> None:
    famo = FAMOWeighting(tasks)
    before = snapshot(famo)
    with pytest.raises(
        RuntimeError, match=r"The checkpoint is for tasks .* Create it with the same"
    ):
        famo.load_state_dict(checkpoint["famo"], strict=strict)
    assert_same_state(famo, before)


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (
            torch.tensor(FORMAT_VERSION + 1),
            rf"format version {FORMAT_VERSION + 1}.* reads versions 1 to",
        ),
        (torch.tensor(0), r"format version 0.* reads versions 1 to"),
        (torch.tensor(2.0), r"`format_version` should be a one-element integer tensor"),
        ("2", r"`format_version` should be a one-element integer tensor"),
    ],
)
def test_a_checkpoint_of_another_format_is_refused(
    checkpoint: dict[str, Any], version: Any, message: str
) -> None:
    state = dict(checkpoint["famo"])
    state["format_version"] = version
    famo = FAMOWeighting(script.TASKS)
    before = snapshot(famo)
    with pytest.raises(RuntimeError, match=message):
        famo.load_state_dict(state)
    assert_same_state(famo, before)


def test_a_checkpoint_missing_part_of_the_famo_state_is_refused(
    checkpoint: dict[str, Any],
) -> None:
    state = {k: v for k, v in checkpoint["famo"].items() if k != "exp_avg"}
    famo = FAMOWeighting(script.TASKS)
    before = snapshot(famo)
    with pytest.raises(RuntimeError, match=r"part of a FAMOWeighting state: \['exp_avg'\]"):
        famo.load_state_dict(state, strict=False)
    assert_same_state(famo, before)


def test_a_model_checkpoint_with_the_famo_part_missing_follows_strict() -> None:
    """A model that holds FAMO, loaded from a checkpoint saved before FAMO was added."""
    model = torch.nn.Module()
    model.head = torch.nn.Linear(2, 2)
    old = model.state_dict()
    model.famo = FAMOWeighting(2)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*famo\.logits"):
        model.load_state_dict(old)
    assert "famo.logits" in model.load_state_dict(old, strict=False).missing_keys


def test_a_float64_checkpoint_that_float32_cannot_hold_is_refused() -> None:
    wide = FAMOWeighting(2, dtype=torch.float64)
    wide.loss(torch.tensor([1e300, 1.0], dtype=torch.float64, requires_grad=True))  # pending
    narrow = FAMOWeighting(2)
    before = snapshot(narrow)
    with pytest.raises(RuntimeError, match=r"`window_sum` should be finite in torch.float32"):
        narrow.load_state_dict(wide.state_dict())
    assert_same_state(narrow, before)
