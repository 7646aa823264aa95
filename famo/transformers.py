"""FAMO in a Hugging Face ``transformers.Trainer`` (imported only when used).

:class:`FAMOTrainer` is a ``Trainer`` whose ``compute_loss`` returns FAMO's objective over the
task losses of a batch, whose logits learn on the Trainer's real optimizer steps, and whose logs
carry the task weights. Three things make it a small change to an existing ``Trainer``:

* the :class:`~famo.FAMOWeighting` is a submodule of the model (``model.famo =
  FAMOWeighting(...)``). Every folder that the trainer saves the model to (each checkpoint, and
  ``save_model``) also gets FAMO's ``state_dict`` as ``famo_state.safetensors``, and
  ``train(resume_from_checkpoint=...)`` loads it back: FAMO resumes exactly even where the
  model's own save leaves it out (a PEFT model saves only its adapter; DeepSpeed and FSDP may save
  the model in shards);
* the model returns its task losses (``outputs["task_losses"]``), or a function computes them;
* nothing else: when training starts, the trainer attaches FAMO to its optimizer with
  :meth:`FAMOWeighting.attach <famo.FAMOWeighting.attach>`, and detaches it when training ends.

Both ``extra_forward`` settings work:

* ``FAMOWeighting(..., extra_forward=False)`` (recommended here): no extra forward pass. The
  losses of all micro-batches between two real optimizer steps form one window (their mean is
  recorded); the first ``loss`` after the step learns from the window to its own losses. A step
  that the Trainer's ``GradScaler`` skipped (fp16) does not happen, so the window simply goes on.
* ``extra_forward=True`` (the published recipe): after each optimizer step the trainer
  recomputes the task losses of every micro-batch of the step with ``torch.no_grad()`` (the
  model stays in training mode, as in the step; under the Trainer's mixed precision, which
  Accelerate applies to the model's forward) and calls ``update`` with their mean. When the step
  did not really happen (skipped by ``GradScaler``) ``update`` drops the recorded losses instead,
  and the logits do not move.

Evaluation (``trainer.evaluate()``, ``eval_strategy``) calls ``compute_loss`` with the model in
eval mode under ``torch.no_grad()``: FAMO then records nothing, and the evaluation loss (which the
Trainer computes when the batches hold the ``label_names``, or a ``labels`` key) is FAMO's
objective :math:`\\sum_i w_i \\ell_i` with the current weights. The predictions it gathers are
the model's outputs less ``"task_losses"`` (none with a ``task_losses`` callable).

The trainer leaves ``num_items_in_batch`` aside (``loss_is_scaled_for_ga = False``): each task
loss is whatever the model or the function returns (a mean over that task's samples or tokens),
and the Trainer divides FAMO's objective by the number of micro-batches in the window, as the
plain loop divides ``famo.loss(losses)`` by the window length.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from typing_extensions import override

from famo._integrations import StepWindow, check_options, find_weighting, logged_weights
from famo._weighting import FAMOWeighting

__all__ = ["FAMOTrainer"]

TaskLosses = Callable[[nn.Module, Mapping[str, Any]], Any]

FAMO_STATE = "famo_state.safetensors"  # FAMO's state_dict, in every folder the model is saved to


class FAMOTrainer(Trainer):
    r"""A ``transformers.Trainer`` that weights the task losses of each batch with FAMO.

    ``compute_loss`` returns ``famo.loss(task_losses)``: the convex combination
    :math:`\sum_i w_i \ell_i` of the batch's task losses, whose gradient is FAMO's. When training
    starts (``on_train_begin``) the trainer calls ``famo.attach(optimizer)`` on the Trainer's
    optimizer, so the logits learn once per optimizer step that really happened, and it removes
    the hook when training ends. With ``extra_forward=True`` it also recomputes the step's task
    losses after each optimizer step and calls ``famo.update`` (see the module docstring).
    Every ``log`` call (training logs every ``logging_steps``, evaluation, the final summary)
    adds both kinds of weights as floats: ``famo/task_weight/<task>``, the task weights :math:`z`
    (:attr:`~famo.FAMOWeighting.weights`, on the log losses), and ``famo/loss_weight/<task>``,
    the weights :math:`w` that multiplied each loss's gradient at the last training batch
    (:attr:`~famo.FAMOWeighting.loss_weights`), so ``state.log_history`` and every reporting
    integration (TensorBoard, W&B, MLflow, ...) get them.

    Every checkpoint folder (and the folder of ``save_model``) holds FAMO's ``state_dict`` in
    ``famo_state.safetensors``, which ``train(resume_from_checkpoint=...)`` loads before training
    resumes, whatever the model's own save holds: a PEFT model (``get_peft_model``) saves only
    its adapter, yet the resumed run equals one that never stopped. With
    ``LoraConfig(modules_to_save=["famo"])`` the trainer drives the copy that PEFT trains and
    saves (the one ``model.famo.loss`` reaches).

    All ``Trainer`` arguments are accepted; the model must hold exactly one
    :class:`~famo.FAMOWeighting` as a submodule (or name it with ``weighting``).

    :param task_losses: ``None`` (default): the model's output holds the task losses under
        ``"task_losses"`` (``outputs["task_losses"]``, for a dict or a ``ModelOutput``).
        Otherwise a callable ``(model, inputs) -> losses``. The losses are anything
        ``FAMOWeighting.loss`` accepts: a 1-D tensor, a sequence of scalar tensors, or a mapping
        from task name to scalar tensor (tasks may be missing with
        ``allow_missing_tasks=True``). Inputs that the model's ``forward`` does not take (a
        task id, say) reach the callable only with
        ``TrainingArguments(remove_unused_columns=False)``.
    :param weighting: the attribute name of the ``FAMOWeighting`` on the model, or ``None``
        (default) to find the only one among the model's submodules.
    :param log_weights: add the weights :math:`z` and :math:`w` to every ``log`` call (default
        ``True``).
    :raises ValueError: the model holds no ``FAMOWeighting``, or several and ``weighting`` is
        ``None``; ``weighting`` names something else.
    :raises TypeError: ``task_losses`` is neither ``None`` nor callable; ``log_weights`` is not
        a bool.
    :raises RuntimeError: (when training starts) the ``FAMOWeighting`` is already attached to an
        optimizer by other code: the trainer attaches it itself.

    Example (a plain ``nn.Module``; a ``PreTrainedModel`` works the same way):

    >>> import torch
    >>> from transformers import TrainingArguments
    >>> from famo import FAMOWeighting
    >>> class TwoTasks(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = torch.nn.Linear(3, 2)
    ...         self.famo = FAMOWeighting(["a", "b"], extra_forward=False)  # checkpointed
    ...
    ...     def forward(self, x, y):
    ...         return {"task_losses": ((self.net(x) - y) ** 2).mean(dim=0)}
    >>> data = [{"x": torch.randn(3), "y": torch.randn(2)} for _ in range(8)]
    >>> args = TrainingArguments(
    ...     "out", max_steps=2, per_device_train_batch_size=4, use_cpu=True, report_to="none",
    ... )
    >>> trainer = FAMOTrainer(model=TwoTasks(), args=args, train_dataset=data)
    >>> trainer.train()  # doctest: +SKIP
    """

    # Each task loss is a mean the model or `task_losses` computed; the Trainer divides FAMO's
    # objective by the window's number of micro-batches (it would not for a model whose forward
    # takes **kwargs, which Trainer reads as "normalised by num_items_in_batch").
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        task_losses: TaskLosses | None = None,
        weighting: str | None = None,
        log_weights: bool = True,
        **kwargs: Any,
    ) -> None:
        if task_losses is not None and not callable(task_losses):
            raise TypeError(
                "`task_losses` should be None (the model returns outputs['task_losses']) or a "
                f"callable (model, inputs) -> losses. Found {task_losses!r}."
            )
        check_options(weighting, log_weights)
        super().__init__(*args, **kwargs)
        self.task_losses = task_losses
        self.log_weights = log_weights
        self.famo = _find_famo(self.model, weighting)
        self._famo_steps = _FAMOSteps(self)
        self.add_callback(self._famo_steps)

    def compute_task_losses(self, model: nn.Module, inputs: Mapping[str, Any]) -> tuple[Any, Any]:
        """The batch's task losses and the model's outputs (``None`` with a ``task_losses``
        callable). Override it to compute the losses another way."""
        if self.task_losses is not None:
            return self.task_losses(model, inputs), None
        outputs = model(**inputs)
        try:
            losses = outputs["task_losses"]
        except (KeyError, TypeError, IndexError):
            raise ValueError(
                "The model's output should hold the task losses under 'task_losses' (a dict "
                "or a ModelOutput with that key). Found "
                f"{type(outputs).__name__}{_keys(outputs)}. Return them from forward, or pass "
                "FAMOTrainer(task_losses=lambda model, inputs: ...)."
            ) from None
        return losses, outputs

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """FAMO's objective over the batch's task losses (recorded only when training)."""
        recording = torch.is_grad_enabled()  # as `famo.loss` decides (evaluation runs no_grad)
        losses, outputs = self.compute_task_losses(model, inputs)
        loss = self.famo.loss(losses)
        if recording:
            self._famo_steps.window.add((model, inputs))  # recomputed after the optimizer step
        if not return_outputs:
            return loss
        return loss, _predictions(outputs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model``, and FAMO's state beside the model (``famo_state.safetensors``),
        which a PEFT adapter, or a sharded DeepSpeed or FSDP save, may not hold."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            folder = Path(str(output_dir if output_dir is not None else self.args.output_dir))
            folder.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().cpu().contiguous() for k, v in self.famo.state_dict().items()}
            safetensors.torch.save_file(state, str(folder / FAMO_STATE))

    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        """``Trainer.train``; when resuming, FAMO's state comes from the checkpoint's
        ``famo_state.safetensors`` (see the class docstring)."""
        checkpoint: Any = resume_from_checkpoint
        if checkpoint is True:
            # as Trainer.train resolves it
            checkpoint = get_last_checkpoint(self.args.output_dir)  # type: ignore[no-untyped-call]
        if isinstance(checkpoint, str | os.PathLike):
            self._load_famo_state(Path(checkpoint))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_famo_state(self, checkpoint: Path) -> None:
        saved = checkpoint / FAMO_STATE
        if saved.is_file():
            self.famo.load_state_dict(safetensors.torch.load_file(str(saved)))
        elif hasattr(self.model, "peft_config") and not _saved_by_peft(self.model):
            warnings.warn(
                f"{checkpoint} has no {FAMO_STATE} (a checkpoint of another trainer, or of an "
                "older famo), and a PEFT model's checkpoint holds only its adapter: FAMO goes on "
                "from its current state. Load its saved state with model.famo.load_state_dict "
                "before train(), or resume from a checkpoint that FAMOTrainer saved.",
                stacklevel=3,
            )

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """``Trainer.log`` with the task weights added (when ``log_weights``)."""
        if self.log_weights:
            logs.update(logged_weights(self.famo, as_floats=True))
        super().log(logs, *args, **kwargs)


class _FAMOSteps(TrainerCallback):
    """Owns the trainer's step window: attaches FAMO to the Trainer's optimizer for the time of
    ``train``, and with ``extra_forward=True`` recomputes each step's micro-batches after the
    optimizer step and calls ``update``."""

    def __init__(self, trainer: FAMOTrainer) -> None:
        self.trainer = trainer
        self.window = StepWindow()

    @override
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        self.window.start(trainer.famo, kwargs.get("optimizer") or trainer.optimizer)

    @override
    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        self.window.learn(
            trainer.famo,
            lambda batch: trainer.compute_task_losses(*batch)[0],
            trainer.compute_loss_context_manager,
        )

    @override
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.window.stop()


def _find_famo(model: Any, weighting: str | None) -> FAMOWeighting:
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"FAMOTrainer should get a model (an nn.Module). Found {type(model).__name__}."
        )
    return find_weighting(model, weighting, "FAMOTrainer")


def _saved_by_peft(model: Any) -> bool:
    """Whether PEFT saves a FAMOWeighting with the adapter (``modules_to_save=["famo"]``)."""
    return any(
        isinstance(getattr(m, "original_module", None), FAMOWeighting) for m in model.modules()
    )


def _predictions(outputs: Any) -> Any:
    """What evaluation gathers as predictions: the model's outputs less the task losses (scalars
    per batch, which the evaluation loop cannot concatenate); nothing for a ``task_losses``
    callable."""
    if outputs is None:
        return {}
    if isinstance(outputs, Mapping):
        return {key: value for key, value in outputs.items() if key != "task_losses"}
    return outputs


def _keys(outputs: Any) -> str:
    keys = getattr(outputs, "keys", None)
    return f" with keys {sorted(keys())}" if callable(keys) else ""
