"""famo.transformers.FAMOTrainer with the real Hugging Face ``Trainer`` on CPU, offline.

A ``Trainer(max_steps=…)`` run equals the plain loop (with and without
``gradient_accumulation_steps``, both ``extra_forward`` settings), a run resumed from the
Trainer's own checkpoint (``model.safetensors``) equals one that never stopped, the weights are
in ``state.log_history`` and reach every callback's ``on_log``, and evaluation leaves FAMO's
state alone. The models are built from code (a small ``nn.Module``, and a tiny GPT-2 from a
config with random weights); the data are generated.
"""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from famo import FAMOWeighting
from tests._scripts.launch import run_script

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
from famo.transformers import FAMOTrainer  # noqa: E402

TASKS = ("a", "b", "c")
BATCH = 4
SCRIPTS = Path(__file__).resolve().parent / "_scripts"


class MultiTask(nn.Module):
    """Three regression heads of very different scales; forward returns the task losses."""

    def __init__(self, *, seed: int = 0, **famo: Any) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, len(TASKS))).double()
        self.famo = FAMOWeighting(TASKS, gamma=0.01, dtype=torch.float64, **famo)

    def task_losses(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        losses = ((self.net(x) - y) ** 2).mean(dim=0)
        return dict(zip(TASKS, losses, strict=True))

    def forward(self, x: Tensor, y: Tensor) -> dict[str, Any]:
        return {"task_losses": self.task_losses(x, y)}


def dataset(samples: int) -> list[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(1)
    scale = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)
    x = torch.randn(samples, 4, generator=generator, dtype=torch.float64)
    y = torch.randn(samples, len(TASKS), generator=generator, dtype=torch.float64) * scale
    return [{"x": x[i], "y": y[i]} for i in range(samples)]


def sgd(model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def arguments(folder: Path, max_steps: int, **options: Any) -> Any:
    defaults: dict[str, Any] = {
        "per_device_train_batch_size": BATCH,
        "per_device_eval_batch_size": BATCH,
        "max_grad_norm": 0.0,  # no clipping: the plain loop does not clip
        "train_sampling_strategy": "sequential",  # the plain loop's order
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "seed": 0,
    }
    return transformers.TrainingArguments(
        output_dir=str(folder), max_steps=max_steps, **{**defaults, **options}
    )


def trainer(model: nn.Module, args: Any, data: list[dict[str, Tensor]], **kw: Any) -> FAMOTrainer:
    return FAMOTrainer(model=model, args=args, train_dataset=data, optimizers=sgd(model), **kw)


def collate(samples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {key: torch.stack([sample[key] for sample in samples]) for key in samples[0]}


def plain_loop(
    model: MultiTask, data: list[dict[str, Tensor]], steps: int, accumulate: int
) -> None:
    """What the Trainer should do, written out with ``famo.attach`` and explicit updates."""
    optimizer, _ = sgd(model)
    model.famo.attach(optimizer)
    batches = [collate(data[i : i + BATCH]) for i in range(0, len(data), BATCH)]
    for step in range(steps):
        window = batches[step * accumulate : (step + 1) * accumulate]
        optimizer.zero_grad()
        for batch in window:
            (model.famo.loss(model(**batch)["task_losses"]) / len(window)).backward()
        optimizer.step()
        if model.famo.extra_forward:
            with torch.no_grad():
                rows = [torch.stack(list(model(**b)["task_losses"].values())) for b in window]
                model.famo.update(torch.stack(rows))


def assert_same(a: MultiTask, b: MultiTask) -> None:
    for (name, pa), pb in zip(a.net.named_parameters(), b.net.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0.0, atol=1e-12, msg=name)
    for name in ("logits", "exp_avg", "exp_avg_sq", "steps", "pending_sum", "pending_count"):
        torch.testing.assert_close(
            getattr(a.famo, name), getattr(b.famo, name), rtol=0.0, atol=1e-12, msg=name
        )


@pytest.mark.parametrize("extra_forward", [False, True])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_trainer_run_equals_the_plain_loop(
    extra_forward: bool, accumulate: int, tmp_path: Path
) -> None:
    steps = 4
    data = dataset(steps * accumulate * BATCH)
    model = MultiTask(extra_forward=extra_forward)
    args = arguments(tmp_path, steps, gradient_accumulation_steps=accumulate)
    trainer(model, args, data).train()
    expected = MultiTask(extra_forward=extra_forward)
    plain_loop(expected, data, steps, accumulate)
    learned = steps if extra_forward else steps - 1  # without: the last step awaits a batch
    assert model.famo.steps.tolist() == [float(learned)] * len(TASKS)
    assert model.famo.logits.abs().min() > 1e-3  # the weights did move
    assert_same(model, expected)


@pytest.mark.parametrize("extra_forward", [False, True])
def test_resuming_from_the_trainers_checkpoint_equals_a_run_that_never_stopped(
    extra_forward: bool, tmp_path: Path
) -> None:
    steps, accumulate = 4, 2
    data = dataset(steps * accumulate * BATCH)
    options = {"gradient_accumulation_steps": accumulate, "save_strategy": "steps"}
    straight = MultiTask(extra_forward=extra_forward)
    args = arguments(tmp_path / "straight", steps, save_steps=2, **options)
    trainer(straight, args, data).train()
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    saved = safetensors_torch.load_file(str(checkpoint / "model.safetensors"))
    assert saved["famo.adam_step"].item() == (1.0 if not extra_forward else 2.0)
    beside = safetensors_torch.load_file(str(checkpoint / "famo_state.safetensors"))
    for name, value in beside.items():  # the same state, also beside the model's file
        assert torch.equal(value, saved[f"famo.{name}"]), name

    resumed = MultiTask(seed=5, extra_forward=extra_forward)  # everything from the checkpoint
    assert not torch.equal(resumed.net[0].weight, straight.net[0].weight)
    args = arguments(tmp_path / "resumed", steps, save_steps=10, **options)
    trainer(resumed, args, data).train(resume_from_checkpoint=str(checkpoint))
    assert_same(resumed, straight)


class OverflowAt(transformers.TrainerCallback):  # type: ignore[misc]
    """Makes one step's gradients inf, as an fp16 overflow would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step == self.step:
            for parameter in kw["model"].net.parameters():
                parameter.grad.fill_(float("inf"))


@pytest.mark.parametrize("extra_forward", [False, True])
def test_a_step_skipped_by_the_grad_scaler_is_not_learned_from(
    extra_forward: bool, tmp_path: Path
) -> None:
    # On CPU, Trainer(fp16=True) runs without a GradScaler; give its Accelerator the one that
    # fp16 uses on a GPU, before train() prepares the optimizer with it.
    model = MultiTask(extra_forward=extra_forward)
    run = trainer(model, arguments(tmp_path, 4), dataset(4 * BATCH), callbacks=[OverflowAt(1)])
    run.accelerator.scaler = torch.amp.GradScaler("cpu")
    run.train()
    assert run.accelerator.scaler.get_scale() < 2.0**16  # it did skip step 1
    if extra_forward:
        assert model.famo.steps.tolist() == [3.0] * len(TASKS)  # steps 0, 2, 3
    else:
        # Real steps 0, 2, 3: batch 1 learns from batch 0; batches 1 and 2 form one window
        # (step 1 did not happen), which batch 3 learns from; batch 3's window is pending.
        assert model.famo.steps.tolist() == [2.0] * len(TASKS)
        assert model.famo.pending_count.tolist() == [1.0] * len(TASKS)
    assert torch.isfinite(model.famo.logits).all()


def test_the_weights_are_in_the_log_history_and_reach_the_callbacks(tmp_path: Path) -> None:
    class Recorder(transformers.TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.logs: list[dict[str, float]] = []

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            self.logs.append(dict(logs))

    model = MultiTask(extra_forward=False)
    recorder = Recorder()
    run = trainer(model, arguments(tmp_path, 3), dataset(3 * BATCH), callbacks=[recorder])
    run.train()
    z_keys = [f"famo/task_weight/{task}" for task in TASKS]
    w_keys = [f"famo/loss_weight/{task}" for task in TASKS]
    training_logs = [entry for entry in run.state.log_history if "loss" in entry]
    assert len(training_logs) == 3
    for entry in [*training_logs, *recorder.logs]:
        for keys in (z_keys, w_keys):
            assert set(keys) <= entry.keys()
            assert all(isinstance(entry[key], float) for key in keys)
            assert sum(entry[key] for key in keys) == pytest.approx(1.0)
    final = run.state.log_history[-1]
    assert [final[key] for key in z_keys] == model.famo.weights.tolist()
    assert [final[key] for key in w_keys] == model.famo.loss_weights.tolist()
    assert [final[key] for key in w_keys] != pytest.approx(model.famo.weights.tolist(), rel=1e-2)

    quiet = trainer(MultiTask(), arguments(tmp_path, 1), dataset(BATCH), log_weights=False)
    quiet.train()
    assert not any(key.startswith("famo/") for e in quiet.state.log_history for key in e)


def test_evaluation_leaves_famo_alone_and_reports_the_weighted_loss(tmp_path: Path) -> None:
    model = MultiTask(extra_forward=False)
    # HF computes an evaluation loss when the batch has the `label_names` (or a `labels` key).
    run = trainer(model, arguments(tmp_path, 2, label_names=["y"]), dataset(2 * BATCH))
    run.train()
    before = {name: value.clone() for name, value in model.famo.state_dict().items()}
    metrics = run.evaluate(dataset(3 * BATCH))
    for name, value in model.famo.state_dict().items():
        assert torch.equal(value, before[name]), name
    model.eval()
    with torch.no_grad():  # what HF evaluates: FAMO's objective Σ w_i ℓ_i, batch by batch
        batches = [collate(dataset(3 * BATCH)[i : i + BATCH]) for i in range(0, 12, BATCH)]
        objectives = [model.famo.loss(model(**batch)["task_losses"]) for batch in batches]
    assert metrics["eval_loss"] == pytest.approx(float(torch.stack(objectives).mean()), rel=1e-6)
    assert {"eval_loss", "famo/task_weight/a", "famo/loss_weight/a"} <= run.state.log_history[
        -1
    ].keys()


def test_a_model_without_famo_or_task_losses_is_refused(tmp_path: Path) -> None:
    plain = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="should find one FAMOWeighting"):
        FAMOTrainer(model=plain, args=arguments(tmp_path, 1), train_dataset=dataset(BATCH))
    with pytest.raises(TypeError, match="`task_losses` should be None"):
        trainer(MultiTask(), arguments(tmp_path, 1), dataset(BATCH), task_losses="losses")

    class NoLosses(MultiTask):
        def forward(self, x: Tensor, y: Tensor) -> dict[str, Any]:  # type: ignore[override]
            return {"loss": sum(self.task_losses(x, y).values())}

    run = trainer(NoLosses(), arguments(tmp_path, 1), dataset(BATCH))
    with pytest.raises(ValueError, match=r"under 'task_losses' .* with keys \['loss'\]"):
        run.train()

    attached = MultiTask()
    attached.famo.attach(torch.optim.SGD(attached.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="already attached"):
        trainer(attached, arguments(tmp_path, 1), dataset(BATCH)).train()


def test_two_ddp_processes_equal_one_process(tmp_path: Path) -> None:
    # torchrun, 2 CPU processes (gloo): each takes half of every batch; FAMO all-reduces its
    # loss values inside the Trainer, and with extra_forward=True the after-step forward runs
    # on each rank's own micro-batches. Reduction order differs: equal to rounding.
    from tests._scripts import transformers_ddp

    out = tmp_path / "rank0.pt"
    run_script(SCRIPTS / "transformers_ddp.py", str(out), "extra_forward", ranks=2)
    two = torch.load(out)
    one = transformers_ddp.fit(str(tmp_path / "one"), processes=1, extra_forward=True)
    assert torch.equal(two["logits_of_every_rank"][0], two["logits_of_every_rank"][1])
    for name, parameter in one.net.named_parameters():
        torch.testing.assert_close(two["parameters"][name], parameter, rtol=1e-12, atol=1e-14)
    for name, value in one.famo.state_dict().items():
        torch.testing.assert_close(two["famo"][name], value, rtol=1e-10, atol=1e-14)
    assert one.famo.steps.tolist() == [3.0] * 3


# ---------------------------------------------------------------------- a tiny causal LM

LM_TASKS = ("copy", "reverse", "sort")
VOCAB, HALF = 12, 5  # tokens 2..11; a sequence is: task token, HALF digits, HALF answer


def lm_dataset(samples: int, seed: int = 0) -> list[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(samples):
        task = int(torch.randint(len(LM_TASKS), (), generator=generator))
        digits = torch.randint(3, VOCAB, (HALF,), generator=generator)
        answer = [digits, digits.flip(0), digits.sort().values][task]
        data.append(
            {
                "input_ids": torch.cat([torch.tensor([task]), digits, answer]),
                "task": torch.tensor(task),
            }
        )
    return data


def lm_task_losses(model: nn.Module, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-task mean token loss over the answer tokens; tasks absent from the batch are left out."""
    ids = inputs["input_ids"]
    logits = model(input_ids=ids).logits[:, HALF:-1]  # predictions of the answer tokens
    tokens = nn.functional.cross_entropy(
        logits.reshape(-1, VOCAB), ids[:, HALF + 1 :].reshape(-1), reduction="none"
    ).view(ids.shape[0], -1)
    per_sample = tokens.mean(dim=1)
    return {
        name: per_sample[inputs["task"] == index].mean()
        for index, name in enumerate(LM_TASKS)
        if bool((inputs["task"] == index).any())
    }


def tiny_gpt2(seed: int) -> nn.Module:
    torch.manual_seed(seed)
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
    model = transformers.GPT2LMHeadModel(config)
    model.famo = FAMOWeighting(LM_TASKS, allow_missing_tasks=True, extra_forward=False)
    return model


@pytest.mark.filterwarnings("ignore:.*copying from a non-meta parameter")
def test_a_tiny_gpt2_with_missing_tasks_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    data = lm_dataset(6 * BATCH)

    def run(model: nn.Module, folder: str, resume: str | None = None) -> FAMOTrainer:
        args = arguments(
            tmp_path / folder,
            6,
            save_strategy="steps",
            save_steps=3,
            remove_unused_columns=False,  # keep the "task" column, which forward does not take
        )
        famo_trainer = trainer(model, args, data, task_losses=lm_task_losses)
        famo_trainer.train(resume_from_checkpoint=resume)
        return famo_trainer

    straight = tiny_gpt2(seed=0)
    straight_run = run(straight, "straight")
    steps = straight.famo.steps.tolist()
    assert max(steps) == 5.0 and min(steps) < 5.0  # some batches missed some tasks
    resumed = tiny_gpt2(seed=1)
    run(resumed, "resumed", resume=str(tmp_path / "straight" / "checkpoint-3"))
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        if isinstance(a, Tensor):
            assert torch.equal(a, b), name
    logged = straight_run.state.log_history[0].keys()
    assert {f"famo/task_weight/{task}" for task in LM_TASKS} <= logged


# ---------------------------------------------------------------------- the docs' example


def test_the_readme_transformers_example_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # the Trainer writes famo-run/ under the working directory
    torch.manual_seed(0)
    namespace = runpy.run_path(str(SCRIPTS / "readme_transformers.py"), run_name="readme")
    famo = namespace["trainer"].model.famo
    assert famo.steps.tolist() == [19.0, 19.0]  # 20 optimizer steps; the 20th awaits a batch
    saved = safetensors_torch.load_file(str(tmp_path / "famo-run/checkpoint-20/model.safetensors"))
    assert torch.equal(saved["famo.logits"], famo.logits)
    assert "{'famo/task_weight/small': " in capsys.readouterr().out


def test_import_famo_does_not_import_transformers() -> None:
    code = (
        "import sys, famo; "
        "assert not {'transformers', 'accelerate', 'pytorch_lightning'} & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
