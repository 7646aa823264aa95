"""What the trainer integrations (Lightning, Hugging Face) share: one pattern.

Each integration owns a :class:`StepWindow`: the optimizer it attached FAMO to (the handle) and
the batches of the optimizer step in progress. FAMO is attached in both modes, so its logits
learn only on optimizer steps that really happened (a ``GradScaler`` skip, a step a trainer
chose not to take): with ``extra_forward=False`` the next ``loss`` learns; with
``extra_forward=True`` the integration recomputes the step's batches and calls ``update``, which
drops the recorded losses when no real step followed them. Only public famo API is used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from famo._attach import Attachment
from famo._settings import check_flag
from famo._weighting import FAMOWeighting


def check_options(weighting: Any, log_weights: Any) -> None:
    """The options every integration takes: the attribute naming FAMO, and logging on or off."""
    if weighting is not None and not isinstance(weighting, str):
        raise TypeError(f"`weighting` should be an attribute name or None. Found {weighting!r}.")
    check_flag("log_weights", log_weights)


def find_weighting(module: nn.Module, attribute: str | None, who: str) -> FAMOWeighting:
    """The FAMOWeighting an integration (``who``) drives: ``module.<attribute>``, or the only one.

    A FAMOWeighting that PEFT holds twice (``LoraConfig(modules_to_save=["famo"])`` wraps it in a
    ``ModulesToSaveWrapper`` with the original and a trained copy) counts once: the copy that the
    model's ``self.famo.loss(...)`` reaches, which is also the one PEFT saves.

    :raises ValueError: the attribute is not a FAMOWeighting, or there is not exactly one.
    """
    if attribute is not None:
        found = getattr(module, attribute, None)
        found = _in_use(found) or found
        if not isinstance(found, FAMOWeighting):
            raise ValueError(
                f"`weighting` names {attribute!r}, but {type(module).__name__}.{attribute} is "
                f"{type(found).__name__}, not a FAMOWeighting."
            )
        return found
    shadowed: set[int] = set()
    for wrapper in module.modules():
        used = _in_use(wrapper)
        if used is not None:
            shadowed |= {id(m) for m in wrapper.modules() if m is not used}
    candidates = [
        m for m in module.modules() if isinstance(m, FAMOWeighting) and id(m) not in shadowed
    ]
    if len(candidates) != 1:
        raise ValueError(
            f"{who} should find one FAMOWeighting in {type(module).__name__}. Found "
            f"{len(candidates)}. Assign one as an attribute of the model (self.famo = "
            "FAMOWeighting(...)), so that the model's checkpoints hold its state, or name it "
            f"with {who}(weighting='attribute')."
        )
    return candidates[0]


def _in_use(wrapper: Any) -> FAMOWeighting | None:
    """For a module that wraps a FAMOWeighting and hands attribute look-ups to one of its copies
    (PEFT's ``ModulesToSaveWrapper``: ``original_module`` and ``modules_to_save[adapter]``), the
    copy that ``wrapper.loss`` reaches; ``None`` for any other module."""
    if isinstance(wrapper, FAMOWeighting) or not isinstance(
        getattr(wrapper, "original_module", None), FAMOWeighting
    ):
        return None
    owner = getattr(getattr(wrapper, "loss", None), "__self__", None)
    return owner if isinstance(owner, FAMOWeighting) else None


def logged_weights(famo: FAMOWeighting, *, as_floats: bool = False) -> dict[str, Any]:
    """What an integration logs: the task weights z under ``famo/task_weight/<task>`` and the
    weights w applied to each loss (at the last recording call) under ``famo/loss_weight/<task>``.
    """
    return {
        **famo.weights_dict("famo/task_weight/", as_floats=as_floats),
        **famo.loss_weights_dict(as_floats=as_floats),
    }


class StepWindow:
    """The attachment of an integration's FAMOWeighting, and the batches of the current step."""

    def __init__(self) -> None:
        self.batches: list[Any] = []
        self._handle: Attachment | None = None

    def start(self, famo: FAMOWeighting, optimizer: Any) -> None:
        """Training starts: attach to the optimizer, with nothing in the window."""
        self.stop()
        self.batches = []
        self._handle = famo.attach(optimizer)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def add(self, batch: Any) -> None:
        """A batch whose losses FAMO recorded for this step."""
        self.batches.append(batch)

    def learn(
        self,
        famo: FAMOWeighting,
        task_losses: Callable[[Any], Any],
        context: Callable[[], AbstractContextManager[Any]],
    ) -> None:
        """After an optimizer step: with ``extra_forward=True``, recompute the step's batches
        without grad (inside ``context``, the trainer's precision) and call ``update``."""
        batches, self.batches = self.batches, []
        if not famo.extra_forward or not batches or not famo.pending:
            return  # learns at the next `loss`; or nothing was recorded
        with torch.no_grad(), context():
            rows = [task_losses(batch) for batch in batches]
        famo.update(after_losses_of(rows))


def after_losses_of(rows: list[Any]) -> Any:
    """One step's after-losses from the losses of each of its micro-batches (for ``update``).

    ``update`` averages what this returns (the rows of a tensor, the values of a name).
    """
    if len(rows) == 1:
        return rows[0]
    if all(isinstance(row, Tensor) for row in rows):
        return torch.stack(rows)  # (micro_batches, k): `update` averages the rows
    if all(isinstance(row, Mapping) for row in rows):
        names = {name for row in rows for name in row}
        return {
            name: torch.stack([torch.as_tensor(row[name]) for row in rows if name in row]).mean()
            for name in names
        }
    if all(isinstance(row, Sequence) for row in rows):
        return torch.stack([torch.stack([torch.as_tensor(v) for v in row]) for row in rows])
    raise TypeError(
        "The task losses should be of one form (tensor, sequence or mapping) for every batch. "
        f"Found {sorted({type(row).__name__ for row in rows})}."
    )
