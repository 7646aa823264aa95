"""What the optional integrations (Lightning, Hugging Face) share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from famo._settings import check_flag
from famo._weighting import FAMOWeighting


def check_options(weighting: Any, log_weights: Any) -> None:
    """The options every integration takes: the attribute naming FAMO, and logging on or off."""
    if weighting is not None and not isinstance(weighting, str):
        raise TypeError(f"`weighting` should be an attribute name or None. Found {weighting!r}.")
    check_flag("log_weights", log_weights)


def find_weighting(module: nn.Module, attribute: str | None, who: str) -> FAMOWeighting:
    """The FAMOWeighting an integration (``who``) drives: ``module.<attribute>``, or the only one.

    :raises ValueError: the attribute is not a FAMOWeighting, or there is not exactly one.
    """
    if attribute is not None:
        found = getattr(module, attribute, None)
        if not isinstance(found, FAMOWeighting):
            raise ValueError(
                f"`weighting` names {attribute!r}, but {type(module).__name__}.{attribute} is "
                f"{type(found).__name__}, not a FAMOWeighting."
            )
        return found
    candidates = [m for m in module.modules() if isinstance(m, FAMOWeighting)]
    if len(candidates) != 1:
        raise ValueError(
            f"{who} should find one FAMOWeighting in {type(module).__name__}. Found "
            f"{len(candidates)}. Assign one as an attribute of the model (self.famo = "
            "FAMOWeighting(...)), so that the model's checkpoints hold its state, or name it "
            f"with {who}(weighting='attribute')."
        )
    return candidates[0]


def after_losses_of(rows: list[Any]) -> Any:
    """One step's after-losses from the losses of each of its micro-batches (for ``update``).

    The integrations recompute every micro-batch of an accumulation window after the optimizer
    step; ``update`` averages what this returns (the rows of a tensor, the values of a name).
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
