"""famo.lightning with the real pytorch-lightning Trainer on CPU (automatic optimization).

A Trainer run equals the plain loop (one batch per step, and with ``accumulate_grad_batches``),
resumes bit for bit from Lightning's own checkpoint, recomputes the after-losses under the
Trainer's precision, and does not learn from a step that its GradScaler skipped.
"""

from __future__ import annotations

import csv
import runpy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from famo import FAMOWeighting
from tests._scripts.launch import run_script

pl = pytest.importorskip("pytorch_lightning")
from famo.lightning import FAMOCallback  # noqa: E402

pytestmark = [
    # Raised inside Lightning 2.6 on torch ≥ 2.10 and about Lightning's own data loading.
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning"),
    pytest.mark.filterwarnings("ignore:The '\\w+_dataloader' does not have many workers"),
    pytest.mark.filterwarnings("ignore:The number of training batches"),
]

TASKS = 3
BATCH = 8
SCRIPTS = Path(__file__).resolve().parent / "_scripts"


class MultiTask(pl.LightningModule):  # type: ignore[misc]
    def __init__(self, *, seed: int = 0, dtype: torch.dtype = torch.float64, **famo: Any):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, TASKS)).to(dtype)
        self.famo = FAMOWeighting(TASKS, **famo)
        self.after_dtypes: list[torch.dtype] = []

    def task_losses(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        losses = ((self.net(x) - y) ** 2).mean(dim=0)
        if not torch.is_grad_enabled():
            self.after_dtypes.append(self.net(x).dtype)
        return losses

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.famo.loss(self.task_losses(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.net.parameters(), lr=0.02, momentum=0.9)


def dataset(batches: int, dtype: torch.dtype = torch.float64) -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(1)
    scale = torch.tensor([1.0, 10.0, 100.0])
    x = torch.randn(batches * BATCH, 4, generator=generator)
    y = torch.randn(batches * BATCH, TASKS, generator=generator) * scale
    return torch.utils.data.TensorDataset(x.to(dtype), y.to(dtype))


def loader(batches: int, dtype: torch.dtype = torch.float64) -> torch.utils.data.DataLoader[Any]:
    return torch.utils.data.DataLoader(dataset(batches, dtype), batch_size=BATCH, shuffle=False)


def trainer(max_steps: int, **options: Any) -> Any:
    defaults = {
        "callbacks": [FAMOCallback()],
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(max_steps=max_steps, **{**defaults, **options})


def plain_loop(module: MultiTask, batches: int, steps: int, accumulate: int = 1) -> None:
    """What the Trainer should do, written out: the README's loop with accumulation (hooked to
    the optimizer with ``extra_forward=False``)."""
    optimizer = module.configure_optimizers()
    if not module.famo.extra_forward:
        module.famo.attach(optimizer)
    data = list(loader(batches))
    for step in range(steps):
        window = [data[(step * accumulate + i) % len(data)] for i in range(accumulate)]
        optimizer.zero_grad()
        for batch in window:
            (module.famo.loss(module.task_losses(batch)) / accumulate).backward()
        optimizer.step()
        if module.famo.extra_forward:
            with torch.no_grad():
                rows = [module.task_losses(batch) for batch in window]
                module.famo.update(rows[0] if accumulate == 1 else torch.stack(rows))


def assert_same(a: MultiTask, b: MultiTask, exact: bool = False) -> None:
    for (name, pa), pb in zip(a.net.named_parameters(), b.net.parameters(), strict=True):
        if exact:
            assert torch.equal(pa, pb), name
        else:  # Lightning divides the loss by accumulate_grad_batches at another point
            torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-14)
    for name in ("logits", "exp_avg", "exp_avg_sq", "steps", "pending_count"):
        if exact:
            assert torch.equal(getattr(a.famo, name), getattr(b.famo, name)), name
        else:
            torch.testing.assert_close(
                getattr(a.famo, name), getattr(b.famo, name), rtol=1e-10, atol=1e-14
            )


@pytest.mark.parametrize("extra_forward", [True, False])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_trainer_run_equals_the_plain_loop(accumulate: int, extra_forward: bool) -> None:
    # extra_forward=False: the callback attaches FAMO to the optimizer, so an accumulation
    # window of Lightning is one window of FAMO, as in the hooked plain loop.
    module = MultiTask(extra_forward=extra_forward).double()
    trainer(4, accumulate_grad_batches=accumulate).fit(module, loader(4 * accumulate))
    expected = MultiTask(extra_forward=extra_forward).double()
    plain_loop(expected, batches=4 * accumulate, steps=4, accumulate=accumulate)
    assert module.famo.steps.tolist() == [4.0 if extra_forward else 3.0] * TASKS
    assert_same(module, expected)
    assert module.famo.logits.abs().min() > 1e-3


def checkpointing(folder: Path) -> dict[str, Any]:
    """Trainer options: FAMOCallback, and Lightning's ModelCheckpoint at each epoch's end."""
    saving = pl.callbacks.ModelCheckpoint(
        dirpath=folder, save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True
    )
    return {"callbacks": [FAMOCallback(), saving], "enable_checkpointing": True}


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.parametrize("extra_forward", [True, False])
def test_resuming_from_a_lightning_checkpoint_is_bit_identical(
    extra_forward: bool, tmp_path: Path
) -> None:
    # Lightning's ModelCheckpoint at each epoch's end. One batch per epoch, so that the data
    # order does not depend on how Lightning replays a resumed epoch (it restarts a plain
    # DataLoader from its first batch). FAMO's state is in the module's state_dict.
    straight = MultiTask(extra_forward=extra_forward).double()
    trainer(4, **checkpointing(tmp_path / "straight")).fit(straight, loader(1))
    path = tmp_path / "straight" / "epoch=1-step=2.ckpt"
    saved = torch.load(path, weights_only=False)["state_dict"]
    copy = torch.load(path, weights_only=True)["famo_state"]  # the callback's copy, tensors only
    assert copy.keys() == straight.famo.state_dict().keys()
    assert all(torch.equal(value, saved[f"famo.{name}"]) for name, value in copy.items())
    if extra_forward:
        assert saved["famo.adam_step"].item() == 2.0
        assert not saved["famo.window_count"].any()  # saved between steps: nothing recorded
    else:  # attached: the second step's losses await the next batch, which learns from them
        assert saved["famo.adam_step"].item() == 1.0
        assert saved["famo.window_count"].tolist() == [1.0] * TASKS

    resumed = MultiTask(seed=5, extra_forward=extra_forward).double()  # all from the file
    assert not torch.equal(resumed.net[0].weight, straight.net[0].weight)
    trainer(4, **checkpointing(tmp_path / "straight")).fit(resumed, loader(1), ckpt_path=path)
    assert_same(resumed, straight, exact=True)


class SavesOnlyTheNetwork(MultiTask):
    """A module whose checkpoints keep only some weights (as one that saves only an adapter)."""

    strict_loading = False

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k.startswith("net.")}


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.parametrize("extra_forward", [True, False])
def test_a_checkpoint_whose_module_state_leaves_famo_out_still_resumes_bit_identically(
    extra_forward: bool, tmp_path: Path
) -> None:
    straight = SavesOnlyTheNetwork(extra_forward=extra_forward).double()
    trainer(4, **checkpointing(tmp_path / "straight")).fit(straight, loader(1))
    path = tmp_path / "straight" / "epoch=1-step=2.ckpt"
    saved = torch.load(path, weights_only=False)
    assert not any(key.startswith("famo.") for key in saved["state_dict"])  # left out
    assert saved["famo_state"]["adam_step"].item() == (2.0 if extra_forward else 1.0)

    resumed = SavesOnlyTheNetwork(seed=5, extra_forward=extra_forward).double()
    trainer(4, **checkpointing(tmp_path / "straight")).fit(resumed, loader(1), ckpt_path=path)
    assert_same(resumed, straight, exact=True)


def test_bf16_mixed_recomputes_the_after_losses_under_autocast() -> None:
    module = MultiTask(dtype=torch.float32)
    trainer(3, precision="bf16-mixed").fit(module, loader(3, torch.float32))
    assert module.after_dtypes == [torch.bfloat16] * 3  # the callback's forward ran in autocast
    assert module.famo.logits.dtype == torch.float32  # FAMO's own math did not
    assert module.famo.steps.tolist() == [3.0] * TASKS
    assert torch.isfinite(module.famo.logits).all() and module.famo.logits.abs().min() > 1e-3


class OverflowAt(pl.Callback):  # type: ignore[misc]
    """Makes one step's gradients inf (as an fp16 overflow would) and snapshots FAMO's state."""

    def __init__(self, step: int):
        self.step = step
        self.snapshots: list[dict[str, Tensor]] = []

    def on_after_backward(self, trainer: Any, pl_module: MultiTask) -> None:
        if trainer.global_step == self.step:
            for parameter in pl_module.net.parameters():
                parameter.grad.fill_(float("inf"))

    def on_train_batch_end(self, trainer: Any, pl_module: MultiTask, *args: Any) -> None:
        self.snapshots.append({k: v.clone() for k, v in pl_module.famo.state_dict().items()})


def test_a_step_skipped_by_the_trainers_grad_scaler_is_not_learned_from() -> None:
    module = MultiTask(dtype=torch.float32)
    overflow = OverflowAt(step=1)
    # FAMOCallback runs first (callbacks run in list order), so the snapshots see its update.
    # Lightning maps precision="16-mixed" to bf16 on CPU; its plugin takes a real fp16 scaler.
    fp16 = pl.plugins.precision.MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    run = trainer(4, plugins=[fp16], callbacks=[FAMOCallback(), overflow])
    run.fit(module, loader(4, torch.float32))
    scaler = run.precision_plugin.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.get_scale() < 2.0**16
    steps = [snapshot["adam_step"].item() for snapshot in overflow.snapshots]
    assert steps == [1.0, 1.0, 2.0, 3.0]
    for name, buffer in overflow.snapshots[1].items():
        assert torch.equal(buffer, overflow.snapshots[0][name]), name  # the skip changed nothing


def test_without_extra_forward_a_skipped_step_extends_the_window() -> None:
    # Attached by the callback: real steps after batches 0, 2 and 3 (step 1 skipped). Batch 1
    # learns from batch 0; batches 1 and 2 form one window, which batch 3 learns from.
    module = MultiTask(dtype=torch.float32, extra_forward=False)
    overflow = OverflowAt(step=1)
    fp16 = pl.plugins.precision.MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    trainer(4, plugins=[fp16], callbacks=[FAMOCallback(), overflow]).fit(
        module, loader(4, torch.float32)
    )
    steps = [snapshot["adam_step"].item() for snapshot in overflow.snapshots]
    counts = [snapshot["window_count"][0].item() for snapshot in overflow.snapshots]
    assert steps == [0.0, 1.0, 1.0, 2.0]
    assert counts == [1.0, 1.0, 2.0, 1.0]


def test_without_extra_forward_the_callback_recomputes_nothing() -> None:
    module = MultiTask(extra_forward=False).double()
    trainer(4).fit(module, loader(4))
    assert module.after_dtypes == []
    assert module.famo.steps.tolist() == [3.0] * TASKS  # the 4th step waits for a 5th batch


def metrics_csv(folder: Path) -> list[dict[str, str]]:
    files = list(folder.glob("**/metrics.csv"))
    if not files:
        return []
    with files[0].open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("extra_forward", [True, False])
def test_the_weights_are_in_the_csv_loggers_file(extra_forward: bool, tmp_path: Path) -> None:
    module = MultiTask(extra_forward=extra_forward).double()
    logger = pl.loggers.CSVLogger(tmp_path, name="run")
    trainer(4, logger=logger, log_every_n_steps=1).fit(module, loader(4))
    rows = [row for row in metrics_csv(tmp_path) if row.get("famo/task_weight/0")]
    assert len(rows) == 4  # once per optimizer step
    z_keys = [f"famo/task_weight/{task}" for task in range(TASKS)]
    w_keys = [f"famo/loss_weight/{task}" for task in range(TASKS)]
    for row in rows:
        assert sum(float(row[key]) for key in z_keys) == pytest.approx(1.0)
        assert sum(float(row[key]) for key in w_keys) == pytest.approx(1.0)
    last_z = [float(rows[-1][key]) for key in z_keys]
    last_w = [float(rows[-1][key]) for key in w_keys]
    assert last_z == pytest.approx(module.famo.weights.tolist(), rel=1e-6)
    assert last_w == pytest.approx(module.famo.loss_weights.tolist(), rel=1e-6)
    assert last_z != pytest.approx([1 / TASKS] * TASKS, rel=1e-4)  # the weights moved
    assert last_w != pytest.approx(last_z, rel=1e-2)  # w = softmax(ξ − log D), not z


def test_log_weights_false_logs_nothing(tmp_path: Path) -> None:
    logger = pl.loggers.CSVLogger(tmp_path, name="run")
    run = trainer(
        3, logger=logger, log_every_n_steps=1, callbacks=[FAMOCallback(log_weights=False)]
    )
    run.fit(MultiTask().double(), loader(3))
    assert not any(key.startswith("famo/") for row in metrics_csv(tmp_path) for key in row)
    with pytest.raises(TypeError, match="`log_weights` should be True or False"):
        FAMOCallback(log_weights="yes")  # type: ignore[arg-type]


class NamedTasks(MultiTask):
    def __init__(self) -> None:
        super().__init__()
        self.famo = FAMOWeighting(["a", "b", "c"]).double()

    def named_losses(self, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        return dict(zip(["a", "b", "c"], self.task_losses(batch), strict=True))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.famo.loss(self.named_losses(batch))


def test_mapping_losses_and_accumulation_match_tensor_losses() -> None:
    named = NamedTasks().double()
    run = trainer(2, accumulate_grad_batches=2)
    run.callbacks[0].losses = "named_losses"
    run.fit(named, loader(4))
    plain = MultiTask().double()
    trainer(2, accumulate_grad_batches=2).fit(plain, loader(4))
    assert_same(named, plain)


def test_a_module_without_famo_or_the_losses_method_fails_at_the_start() -> None:
    class NoFAMO(MultiTask):
        def __init__(self) -> None:
            super().__init__()
            del self.famo

    with pytest.raises(ValueError, match="should find one FAMOWeighting"):
        trainer(1).fit(NoFAMO(), loader(1))
    run = trainer(1)
    run.callbacks[0].losses = "losses_of"
    with pytest.raises(ValueError, match="no such method"):
        run.fit(MultiTask().double(), loader(1))


def test_the_readme_lightning_example_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # Lightning writes its checkpoints under the working directory
    torch.manual_seed(0)
    namespace = runpy.run_path(str(SCRIPTS / "readme_lightning.py"), run_name="readme_lightning")
    famo = namespace["module"].famo
    assert famo.steps.tolist() == [20.0, 20.0]
    assert famo.weights[1] > famo.weights[0]  # the task with 30× the scale gets more weight
    assert "weights:" in capsys.readouterr().out
    checkpoint = next(tmp_path.glob("checkpoints/*.ckpt"))
    assert "famo.logits" in torch.load(checkpoint, weights_only=False)["state_dict"]


def test_manual_optimization_is_refused_with_what_to_do_instead() -> None:
    class Manual(MultiTask):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match=r"call self\.famo\.update"):
        trainer(1).fit(Manual().double(), loader(1))


def test_ddp_strategy_on_two_processes_equals_one_process(tmp_path: Path) -> None:
    # Lightning's "ddp" strategy on 2 CPU processes (gloo), each on half of every batch: FAMO
    # all-reduces by itself inside the Trainer. Reduction order differs: equal to rounding.
    from tests._scripts import lightning_ddp

    out = tmp_path / "rank0.pt"
    run_script(SCRIPTS / "lightning_ddp.py", str(out))
    two = torch.load(out)
    one = lightning_ddp.fit(devices=1)
    assert torch.equal(two["logits_of_every_rank"][0], two["logits_of_every_rank"][1])
    for name, parameter in one.net.named_parameters():
        torch.testing.assert_close(two["parameters"][name], parameter, rtol=1e-12, atol=1e-14)
    for name, buffer in one.famo.state_dict().items():
        torch.testing.assert_close(two["famo"][name], buffer, rtol=1e-10, atol=1e-14)
    assert one.famo.steps.tolist() == [3.0] * TASKS
