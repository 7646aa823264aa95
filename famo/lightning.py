"""FAMO in a PyTorch Lightning ``Trainer`` with automatic optimization (imported only when used).

Lightning calls ``backward`` and ``optimizer.step()`` itself, so FAMO enters in two places:

* ``training_step`` returns ``self.famo.loss(task_losses)``: Lightning backpropagates it (through
  its ``GradScaler`` under ``precision="16-mixed"``, divided by ``accumulate_grad_batches`` when
  accumulating), and the losses are recorded;
* :class:`FAMOCallback` makes the logits learn once per optimizer step. With the default
  ``extra_forward=True`` it recomputes the task losses on the step's batches without grad,
  under the Trainer's precision, and calls ``update``; when ``GradScaler`` skipped the step it
  drops the recorded losses instead. With ``extra_forward=False`` it attaches FAMO to the
  optimizer (:meth:`FAMOWeighting.attach <famo.FAMOWeighting.attach>`) for the time of
  ``fit``, so the next ``loss`` learns after each real step and a skipped step extends the
  window.

The callback also logs the task weights (``famo/<task>``) through the Trainer's loggers after
every optimizer step, unless ``FAMOCallback(log_weights=False)``.

The :class:`~famo.FAMOWeighting` is a submodule of the ``LightningModule``, so its whole state
(logits, Adam moments, bounds, recorded losses; tensors only) is in the module's ``state_dict``
and therefore in Lightning's own checkpoints; resuming with ``Trainer.fit(ckpt_path=...)``
restores it. The callback itself holds nothing between optimizer steps, so it has no state to
checkpoint.

Uses ``pytorch_lightning`` if it is installed, otherwise ``lightning.pytorch``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from famo._integrations import after_losses_of, check_options, find_weighting
from famo._weighting import FAMOWeighting

try:
    import pytorch_lightning as pl
except ImportError:  # pragma: no cover - the unified `lightning` package
    import lightning.pytorch as pl  # type: ignore[no-redef]

__all__ = ["FAMOCallback"]

TaskLosses = Callable[["pl.LightningModule", Any], Any]


class FAMOCallback(pl.Callback):
    r"""Calls :meth:`FAMOWeighting.update <famo.FAMOWeighting.update>` after every optimizer step.

    After Lightning's optimizer step (once per ``accumulate_grad_batches`` batches), the callback
    recomputes the task losses of every batch the step used, with ``torch.no_grad()`` and inside
    the Trainer's precision context (``autocast`` for ``"bf16-mixed"``/``"16-mixed"``), and calls
    ``famo.update`` with them (one row per batch, averaged: the accumulation rule of
    :meth:`~famo.FAMOWeighting.update`). When the Trainer's ``GradScaler`` skipped the step
    (inf/NaN gradients; its scale went down), the recorded losses are discarded and the logits do
    not move. With ``FAMOWeighting(extra_forward=False)`` nothing is recomputed: from
    ``on_train_start`` to ``on_train_end`` the object is attached to the Trainer's optimizer
    (``famo.attach``), so all the batches of one optimizer step form one window and the first
    ``loss`` after a real step learns from it; a step skipped by ``GradScaler`` extends the
    window.

    After each optimizer step (after the logit step, with ``extra_forward=True``) the callback
    logs ``famo.weights_dict()`` (``{"famo/<task>": weight}``, 0-dim tensors, no host sync)
    with ``LightningModule.log_dict(on_step=True, on_epoch=False)``, so every logger of the
    Trainer (CSV, TensorBoard, W&B, MLflow, ...) writes them every ``log_every_n_steps``. Without
    a logger (``logger=False``) nothing is logged.

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
    :raises RuntimeError: (when training starts, with ``extra_forward=False``) the
        ``FAMOWeighting`` is already attached to an optimizer by other code.

    >>> import pytorch_lightning as pl
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
        self._detach: Callable[[], None] | None = None
        self._window: list[Any] = []  # the batches since the last optimizer step
        self._stepped = False
        self._scale_before: float | None = None

    # ------------------------------------------------------------------ Lightning hooks

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

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._window, self._stepped = [], False
        famo = self._famo(pl_module)
        if not famo.extra_forward and trainer.optimizers:
            self._detach = famo.attach(trainer.optimizers[0]).remove

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hook()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove_hook()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._window.append(batch)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self._stepped = True
        scaler = _scaler(trainer)
        self._scale_before = scaler.get_scale() if scaler is not None else None

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._stepped:
            return  # accumulating: the optimizer has not stepped yet
        window, self._window, self._stepped = self._window, [], False
        famo = self._famo(pl_module)
        self._learn(trainer, pl_module, famo, window)
        if self.log_weights and trainer.loggers:
            pl_module.log_dict(famo.weights_dict(), on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ internals

    def _learn(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        famo: FAMOWeighting,
        window: list[Any],
    ) -> None:
        if not famo.extra_forward or not famo.pending:
            return  # attached: the next `loss` learns; or training_step recorded nothing
        scaler = _scaler(trainer)
        if (
            scaler is not None
            and self._scale_before is not None
            and scaler.get_scale() < self._scale_before
        ):
            famo.discard()  # GradScaler skipped the step: nothing to learn from
            return
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            rows = [self._task_losses(pl_module, batch) for batch in window]
        famo.update(after_losses_of(rows))

    def _remove_hook(self) -> None:
        if self._detach is not None:
            self._detach()
            self._detach = None

    def _task_losses(self, pl_module: pl.LightningModule, batch: Any) -> Any:
        if isinstance(self.losses, str):
            return getattr(pl_module, self.losses)(batch)
        return self.losses(pl_module, batch)

    def _famo(self, pl_module: pl.LightningModule) -> FAMOWeighting:
        return find_weighting(pl_module, self.weighting, "FAMOCallback")


def _scaler(trainer: pl.Trainer) -> Any:
    """The Trainer's GradScaler (``precision="16-mixed"``), or None."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if callable(getattr(scaler, "get_scale", None)) else None
