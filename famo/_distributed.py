"""What ranks must agree on: the loss values FAMO learns from, and nothing else.

Every rank computes the task weights from the same all-reduced loss values and takes the same
logit step, so the logits stay identical without ever being broadcast. The weights are applied
to each rank's local losses; DDP's gradient averaging then yields exactly the gradient of one
process that saw the whole batch (for losses that are per-sample means over equal shards).

Only calls that record (``loss``/``backward`` under grad, ``update``) communicate: every rank
makes them together. An evaluation call (under ``torch.no_grad()``) computes locally, so one
rank may validate alone.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor

_AVAILABLE = dist.is_available()


class Group:
    """The group a FAMOWeighting all-reduces over, resolved once per initialised default group.

    ``process_group`` is what the user gave the constructor: None (the default group, whenever
    one is initialised when a call happens), False (never), or a specific group.
    """

    def __init__(self, process_group: Any) -> None:
        self.process_group = process_group
        self._world: Any = None  # the default group the cached answer was computed for
        self._active: Any = None
        self._size = 1

    def active(self) -> Any | None:
        """The group to all-reduce over, or None (one process, or ``process_group=False``)."""
        if self.process_group is False or not _AVAILABLE:
            return None
        if not dist.is_initialized():
            if self.process_group is not None:
                raise RuntimeError(
                    "`process_group` was given, but torch.distributed is not initialised. Call "
                    "torch.distributed.init_process_group first, or pass process_group=False."
                )
            return None
        world = dist.group.WORLD
        if world is not self._world:  # a new default group: resolve again
            group = world if self.process_group is None else self.process_group
            self._size = int(dist.get_world_size(group))
            self._active = group if self._size > 1 else None
            self._world = world
        return self._active

    @property
    def size(self) -> int:
        return self._size

    def per_rank_in_many(self) -> bool:
        """``process_group=False`` in a job of several ranks: one FAMO state per rank."""
        return (
            self.process_group is False
            and _AVAILABLE
            and dist.is_initialized()
            and dist.get_world_size() > 1
        )

    @staticmethod
    def rank() -> int:
        """This process's rank, or -1 where torch.distributed is not initialised."""
        return int(dist.get_rank()) if _AVAILABLE and dist.is_initialized() else -1


def all_reduce_sum_(tensor: Tensor, group: Any) -> Tensor:
    """Sum ``tensor`` over the ranks of ``group`` in place (every backend supports SUM)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def is_process_group(value: Any) -> bool:
    return isinstance(value, dist.ProcessGroup) if _AVAILABLE else False
