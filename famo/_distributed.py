"""What ranks must agree on: the loss values FAMO learns from, and nothing else.

Every rank computes the task weights from the same all-reduced loss values and takes the same
logit step, so the logits stay identical without ever being broadcast. The weights are applied
to each rank's local losses; DDP's gradient averaging then yields exactly the gradient of one
process that saw the whole batch (for losses that are per-sample means over equal shards).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor


def active_group(process_group: Any) -> Any | None:
    """The group to all-reduce over, or None for a single process.

    ``process_group`` is what the user gave the constructor: None (the default group, whenever
    one is initialised when a call happens), False (never), or a specific group.
    """
    if process_group is False:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise RuntimeError(
                "`process_group` was given, but torch.distributed is not initialised. Call "
                "torch.distributed.init_process_group first, or pass process_group=False."
            )
        return None
    group = dist.group.WORLD if process_group is None else process_group
    if dist.get_world_size(group) == 1:
        return None
    return group


def all_reduce_sum_(tensor: Tensor, group: Any) -> Tensor:
    """Sum ``tensor`` over the ranks of ``group`` in place (every backend supports SUM)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def world_size(group: Any) -> int:
    return int(dist.get_world_size(group))


def is_process_group(value: Any) -> bool:
    return isinstance(value, dist.ProcessGroup) if dist.is_available() else False
