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

import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

_AVAILABLE = dist.is_available()

PER_RANK_REFUSED = (
    "This FAMOWeighting keeps one state per rank (process_group=False), but "
    "DistributedDataParallel broadcasts rank 0's buffers over every rank's, and FAMO's state is "
    "buffers. Wrap the model with DistributedDataParallel(model, broadcast_buffers=False), or "
    "keep the FAMOWeighting outside the DDP module, or use process_group=None (one state shared "
    "by all ranks, which the broadcast leaves as it is)."
)


class Group:
    """The group a FAMOWeighting all-reduces over, resolved once per initialised default group.

    ``process_group`` is what the user gave the constructor: None (the default group, whenever
    one is initialised when a call happens), False (never), or a specific group.
    """

    def __init__(self, process_group: Any) -> None:
        self.process_group = process_group
        # The default group the cached size was computed for, held weakly: a group that famo
        # kept alive after destroy_process_group() would keep gloo's threads running into the
        # interpreter's exit.
        self._world: weakref.ref[Any] | None = None
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
        if self._world is None or self._world() is not world:  # a new default group
            group = world if self.process_group is None else self.process_group
            self._size = int(dist.get_world_size(group))
            self._world = weakref.ref(world)
        if self._size == 1:
            return None
        return world if self.process_group is None else self.process_group

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


# ------------------------------------------------------------------------------ one state per rank
# With process_group=False in a job of several ranks, each rank keeps its own state, and DDP's
# buffer broadcast would overwrite it with rank 0's. At construction DDP writes every buffer
# (`format_version`'s version counter moves: nothing else writes it); before each forward it
# writes them keeping the version counters, which `rank_canary` (a buffer that is not saved)
# shows: it holds rank 0's afterwards. Until the object's first recording call, a hook on every
# module's forward refuses, on every rank alike and before any collective, a DDP that is about
# to broadcast over it; from then on, `check_own_state` does at every eager call.

_WATCHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_HOOK: Any = None


def register_canary(module: nn.Module, device: Any) -> None:
    """The per-rank guard of a new object with ``process_group=False``."""
    module.register_buffer("rank_canary", torch.tensor(Group.rank(), device=device), False)
    if not (_AVAILABLE and dist.is_initialized() and dist.get_world_size() > 1):
        return  # no DDP yet: the version counters and the rank canary will tell
    _WATCHED.add(module)
    global _HOOK
    if _HOOK is None:
        _HOOK = nn.modules.module.register_module_forward_pre_hook(_refuse_a_broadcast_over)


def check_own_state(module: nn.Module, buffers: dict[str, Tensor], version_seen: int) -> None:
    """Refuse a per-rank state that DDP's buffer broadcast reached (one host sync)."""
    global _HOOK
    _WATCHED.discard(module)
    if not _WATCHED and _HOOK is not None:
        _HOOK.remove()
        _HOOK = None
    rank, canary = Group.rank(), buffers["rank_canary"]
    found = int(canary.item())
    if found == -1:  # created before torch.distributed was initialised
        canary.fill_(rank)
    moved = buffers["format_version"]._version != version_seen
    if moved or found not in (-1, rank):
        raise RuntimeError(PER_RANK_REFUSED)


def _refuse_a_broadcast_over(module: nn.Module, args: Any) -> None:
    if not _WATCHED or not isinstance(module, nn.parallel.DistributedDataParallel):
        return
    syncs = getattr(module, "forward_sync_buffers", getattr(module, "broadcast_buffers", True))
    if not syncs:
        return
    ignored: set[str] = getattr(module, "parameters_to_ignore", set())
    for name, sub in module.module.named_modules():
        if sub in _WATCHED:
            prefix = f"{name}." if name else ""
            if any(prefix + key not in ignored for key, _ in sub.named_buffers(recurse=False)):
                raise RuntimeError(PER_RANK_REFUSED)
