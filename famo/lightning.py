"""FAMO in a PyTorch Lightning ``Trainer`` with automatic optimization (imported only when used).

Lightning calls ``backward`` and ``optimizer.step()`` itself, so FAMO enters in two places:

* ``training_step`` returns ``self.famo.loss(task_losses)``: Lightning backpropagates it (through
  its ``GradScaler`` under ``precision="16-mixed"``, divided by ``accumulate_grad_batches`` when
  accumulating), and the losses are recorded;
* :class:`FAMOCallback` attaches FAMO to the optimizer for the time of ``fit``
  (:meth:`FAMOWeighting.attach <famo.FAMOWeighting.attach>`), so the logits learn once per
  optimizer step that really happened. With the default ``extra_forward=True`` it recomputes
  the task losses of the step's batches without grad, under the Trainer's precision, and calls
  ``update`` (which drops the recorded losses when ``GradScaler`` skipped the step). With
  ``extra_forward=False`` the next ``loss`` learns, and a skipped step extends the window. A
  batch whose ``training_step`` returned ``None`` (Lightning's way to skip a batch) is not part
  of the window.

The callback also logs both kinds of weights through the Trainer's loggers after every optimizer
step, unless ``FAMOCallback(log_weights=False)``: ``famo/task_weight/<task>`` are the task
weights :math:`z` (on the log losses) and ``famo/loss_weight/<task>`` the weights :math:`w` that
multiplied each loss's gradient in that step.

The :class:`~famo.FAMOWeighting` is a submodule of the ``LightningModule``, so its whole state
(logits, Adam moments, bounds, recorded losses; tensors only) is in the module's ``state_dict``
and therefore in Lightning's own checkpoints; resuming with ``Trainer.fit(ckpt_path=...)``
restores it. The callback also puts a copy of FAMO's state in every checkpoint (under
``"famo_state"``), and restores it on resume when the module's saved ``state_dict`` left FAMO
out (a ``state_dict`` override or an ``on_save_checkpoint`` that keeps only some weights, with
``strict_loading = False``); otherwise the module's own copy is the one restored.

Uses ``pytorch_lightning`` if it is installed, otherwise ``lightning.pytorch``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from typing_extensions import override

from famo._integrations import StepWindow, check_options, find_weighting, logged_weights
from famo._weighting import FAMOWeighting

try:
    import pytorch_lightning as pl
except ImportError:  # pragma: no cover - the unified `lightning` package
    import lightning.pytorch as pl  # type: ignore[no-redef]

__all__ = ["FAMOCallback"]

STATE_KEY = "famo_state"  # FAMO's state_dict in each checkpoint, whatever the module's holds

TaskLosses = Callable[["pl.LightningModule", Any], Any]


class FAMOCallback(pl.Callback):
    r"""Makes a module's :class:`~famo.FAMOWeighting` learn once per real optimizer step.

    From ``on_train_start`` to ``on_train_end`` the object is attached to the Trainer's
    optimizer (``famo.attach``). With ``extra_forward=True``, after each optimizer step (once
    per ``accumulate_grad_batches`` batches) the callback recomputes the task losses of every
    batch of the step whose ``training_step`` returned a loss, with ``torch.no_grad()`` and
    inside the Trainer's precision context (``autocast`` for ``"bf16-mixed"``/``"16-mixed"``),
    and calls ``famo.update`` with them (one row per batch, averaged: the accumulation rule of
    :meth:`~famo.FAMOWeighting.update`); a step that did not happen (its ``GradScaler`` found
    inf/NaN gradients) leaves the logits as they are. With ``extra_forward=False`` nothing is
    recomputed: the first ``loss`` after a real step learns from the step's batches.

    After each optimizer step the callback logs ``famo/task_weight/<task>``, the task weights
    :math:`z` (:attr:`~famo.FAMOWeighting.weights`, on the log losses), and
    ``famo/loss_weight/<task>``, the weights :math:`w` that multiplied each loss's gradient at the
    step's last recording call (:attr:`~famo.FAMOWeighting.loss_weights`); 0-dim tensors, no
    host sync, through ``LightningModule.log_dict(on_step=True, on_epoch=False)``, so every
    logger of the Trainer writes them every ``log_every_n_steps``. Without a logger
    (``logger=False``) nothing is logged.

    A ``FAMOWeighting`` with ``warmup_steps`` or ``update_every`` keeps its schedule here: a
    learning step is an optimizer step that happened.

    Every checkpoint also gets FAMO's ``state_dict`` under ``"famo_state"``; resuming restores it
    when the module's saved ``state_dict`` left FAMO out (see the module docstring).

    :param losses: how to compute the task losses of a batch: the name of a method of the
        ``LightningModule`` taking the batch (default ``"task_losses"``), or a callable
        ``(module, batch) -> losses``. It must return what ``FAMOWeighting.loss`` accepts (a 1-D
        tensor, a sequence of scalar tensors or a mapping from task name to scalar tensor), and
        ``training_step`` should pass the same function's result to ``self.famo.loss``.
    :param weighting: the attribute name of the ``FAMOWeighting`` on the module, or ``None``
        (default) to find the one ``FAMOWeighting`` among the module's submodules.
    :param log_weights: log the task weights after every optimizer step (default ``True``).
    :raises ValueError: (when the Trainer starts) the module holds no ``FAMOWeighting``, or
        several and ``weighting`` is ``None``; ``losses`` names no method of the module; the
        module uses manual optimization.
    :raises RuntimeError: (when training starts) the ``FAMOWeighting`` is already attached to an
        optimizer by other code.

    >>> import pytorch_lightning as pl
    >>> import torch
    >>> from famo import FAMOWeighting
    >>> class TwoTasks(pl.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = torch.nn.Linear(3, 2)
    ...         self.famo = FAMOWeighting(["a", "b"])  # a submodule: checkpointed with the model
    ...
    ...     def task_losses(self, batch):
    ...         x, y = batch
    ...         return ((self.net(x) - y) ** 2).mean(dim=0)
    ...
    ...     def training_step(self, batch, batch_idx):
    ...         return self.famo.loss(self.task_losses(batch))
    ...
    ...     def configure_optimizers(self):
    ...         return torch.optim.SGD(self.net.parameters(), lr=0.1)
    >>> data = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.randn(8, 2))
    >>> trainer = pl.Trainer(
    ...     max_steps=2, callbacks=[FAMOCallback()], logger=False, enable_checkpointing=False,
    ...     enable_progress_bar=False, enable_model_summary=False,
    ... )
    >>> module = TwoTasks()
    >>> trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))  # doctest: +SKIP
    """

    def __init__(
        self,
        losses: str | TaskLosses = "task_losses",
        weighting: str | None = None,
        *,
        log_weights: bool = True,
    ):
        super().__init__()
        if not (isinstance(losses, str) or callable(losses)):
            raise TypeError(
                "`losses` should be the name of a LightningModule method or a callable "
                f"(module, batch) -> losses. Found {losses!r}."
            )
        check_options(weighting, log_weights)
        self.losses = losses
        self.weighting = weighting
        self.log_weights = log_weights
        self._window = StepWindow()
        self._stepping = False  # an optimizer step was attempted in this batch

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._famo(pl_module)  # fail at the start, not after the first step
        if not pl_module.automatic_optimization:
            raise ValueError(
                "FAMOCallback works with Lightning's automatic optimization. With "
                "automatic_optimization = False, call self.famo.update(new_losses) in "
                "training_step yourself, after optimizer.step()."
            )
        if isinstance(self.losses, str) and not callable(getattr(pl_module, self.losses, None)):
            raise ValueError(
                f"`losses` names the method {self.losses!r}, but {type(pl_module).__name__} has "
                "no such method. Define it (batch -> task losses) or pass a callable "
                "FAMOCallback(losses=lambda module, batch: ...)."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stepping = False
        if trainer.optimizers:
            self._window.start(self._famo(pl_module), trainer.optimizers[0])

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._window.stop()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._window.stop()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self._stepping = True

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if _trained_on(outputs):
            self._window.add(batch)
        if not self._stepping:
            return  # accumulating: the optimizer has not stepped yet
        self._stepping = False
        famo = self._famo(pl_module)
        self._window.learn(
            famo,
            lambda batch: self._task_losses(pl_module, batch),
            trainer.precision_plugin.forward_context,
        )
        if self.log_weights and trainer.loggers:
            pl_module.log_dict(logged_weights(famo), on_step=True, on_epoch=False)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # The module's own hook runs after this one and may drop FAMO from its state_dict.
        famo = self._famo(pl_module)
        checkpoint[STATE_KEY] = {k: v.detach().clone() for k, v in famo.state_dict().items()}

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        saved = checkpoint.get(STATE_KEY)
        if saved is None:
            return  # saved without the callback: the module's state_dict is all there is
        famo = self._famo(pl_module)
        prefix = next(name for name, m in pl_module.named_modules() if m is famo)
        module_state = checkpoint.get("state_dict", {})
        if not all(f"{prefix}.{key}" in module_state for key in famo.state_dict()):
            famo.load_state_dict(saved)  # the module's checkpoint left FAMO out

    # ------------------------------------------------------------------ internals

    def _task_losses(self, pl_module: pl.LightningModule, batch: Any) -> Any:
        if isinstance(self.losses, str):
            return getattr(pl_module, self.losses)(batch)
        return self.losses(pl_module, batch)

    def _famo(self, pl_module: pl.LightningModule) -> FAMOWeighting:
        return find_weighting(pl_module, self.weighting, "FAMOCallback")


def _trained_on(outputs: Any) -> bool:
    """Whether ``training_step`` returned a loss for the batch (``None`` skips it: Lightning
    then hands ``on_train_batch_end`` an empty mapping)."""
    if outputs is None:
        return False
    return not isinstance(outputs, Mapping) or outputs.get("loss") is not None
