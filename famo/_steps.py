r"""The bookkeeping of a training step: the window of recorded losses and the logit step.

The buffers (see :mod:`famo._checkpoint`) are the state. :class:`Window` holds what famo knows
about them in Python (whether losses are waiting, how many calls recorded them, whether an
attached optimizer stepped, the log-distance of a lone call), so that an eager step decides
without asking the device. The facts carry the identity and version of the buffers they come
from; when a tool replaces or rewrites a buffer (a checkpoint loader, ``functional_call``, an
in-place edit), :func:`sync` derives them again from the tensors.

Two ways to take a logit step, with the same arithmetic from :mod:`famo.functional`:

* :func:`learn` on the eager fast path (no task missing, no warm-up, ``update_every=1``);
* :func:`learn_scheduled` with every decision as a tensor (the learning schedule, missing
  tasks, a tensor ``skip``, ``torch.compile``): one graph whatever the window or the step.

Both reduce to the same operations on the same values where they overlap, so an object with a
schedule takes the very steps of one without it once the schedule says "step".
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from famo import functional as F

if TYPE_CHECKING:
    from famo._weighting import FAMOWeighting


class Window:
    """What famo knows in Python about the losses recorded since the last logit step."""

    def __init__(self) -> None:
        self.pending = False  # some loss is recorded (window_count > 0 somewhere)
        self.stepped = False  # window_stepped
        self.calls: int | None = 0  # recording calls in the window; None: not known in Python
        self.lone_log: Tensor | None = None  # log D of the window's only call
        self.seen: tuple[Any, ...] = ()  # (tensor, version) of each buffer the facts come from
        self.version_seen = 0  # format_version's version: nothing outside famo writes it

    def note(self, buffers: dict[str, Tensor], compiling: bool | None = None) -> None:
        """The buffers as famo itself just left them."""
        if F.is_compiling() if compiling is None else compiling:
            self.seen = ()  # versions are not traced: the next eager call reads the facts again
            return
        total, count, stepped = (
            buffers["window_sum"],
            buffers["window_count"],
            buffers["window_stepped"],
        )
        self.seen = (total, total._version, count, count._version, stepped, stepped._version)

    def current(self, buffers: dict[str, Tensor]) -> bool:
        """Whether the buffers are as famo left them (same tensors, not written since)."""
        seen = self.seen
        if not seen:
            return False
        total, count, stepped = (
            buffers["window_sum"],
            buffers["window_count"],
            buffers["window_stepped"],
        )
        return (
            total is seen[0]
            and count is seen[2]
            and stepped is seen[4]
            and total._version == seen[1]
            and count._version == seen[3]
            and stepped._version == seen[5]
        )

    def same_tensors(self, buffers: dict[str, Tensor]) -> bool:
        seen = self.seen
        return bool(seen) and (
            buffers["window_sum"] is seen[0]
            and buffers["window_count"] is seen[2]
            and buffers["window_stepped"] is seen[4]
        )

    def derive(self, buffers: dict[str, Tensor]) -> None:
        """The facts from the tensors (one host synchronisation)."""
        count = buffers["window_count"]
        self.pending = bool((count > 0).any()) if count.device.type != "meta" else False
        stepped = buffers["window_stepped"]
        self.stepped = bool(stepped) if stepped.device.type != "meta" else False
        if self.pending and bool((count == count[0]).all()):
            self.calls = int(count[0].item())
        else:
            self.calls = 0 if not self.pending else None
        self.lone_log = None
        self.note(buffers)


def sync(famo: FAMOWeighting) -> None:
    """Make the Python facts agree with the buffers before an eager call relies on them."""
    buffers, window = famo._buffers, famo._window
    if famo._group.process_group is False and famo._group.per_rank_in_many():
        _check_own_state(famo)
    if window.current(buffers):
        return
    if window.same_tensors(buffers) and famo._group.active() is not None:
        # Rewritten in place while every rank holds the same state (DDP's buffer broadcast
        # from rank 0): the values are those famo already knows.
        window.note(buffers)
        return
    famo._state_replaced()  # replaced or edited from outside: read them again (one sync)


def _check_own_state(famo: FAMOWeighting) -> None:
    """One state per rank (``process_group=False``, several ranks): refuse if DDP's buffer
    broadcast reached it. At construction DDP writes every buffer (``format_version``'s version
    counter moves); before each forward it writes them keeping the version counters, which the
    rank in ``rank_canary`` (a buffer, not saved) shows: it holds rank 0's afterwards."""
    buffers, rank = famo._buffers, famo._group.rank()
    canary = buffers["rank_canary"]
    found = int(canary.item())
    if found == -1:  # created before torch.distributed was initialised
        buffers["rank_canary"] = torch.tensor(rank, device=canary.device)
    moved = buffers["format_version"]._version != famo._window.version_seen
    if moved or found not in (-1, rank):
        raise RuntimeError(
            "This FAMOWeighting keeps one state per rank (process_group=False), but "
            "DistributedDataParallel broadcast rank 0's buffers over this rank's: FAMO's state "
            "is buffers. Wrap the model with DistributedDataParallel(model, "
            "broadcast_buffers=False), or keep the FAMOWeighting outside the DDP module, or use "
            "process_group=None (one state shared by all ranks, which the broadcast leaves as "
            "it is)."
        )


def offset(famo: FAMOWeighting, compiling: bool | None = None) -> Tensor:
    r""":math:`\epsilon - b` in the state's dtype, recomputed when the bounds or ``eps`` change.

    (A move to another dtype or device, and a load, start afresh: ``_state_replaced``.)
    """
    bounds = famo._buffers["lower_bounds"]
    eps = famo._settings["eps"]
    if F.is_compiling() if compiling is None else compiling:
        return bounds.to(famo._buffers["logits"].dtype).neg().add_(eps)
    key = famo._offset_key
    if key is None or key[0] is not bounds or key[1] != bounds._version or key[2] != eps:
        famo._offset = bounds.to(famo._buffers["logits"].dtype).neg().add_(eps)
        famo._offset_key = (bounds, bounds._version, eps)
        famo._window.lone_log = None  # computed with other bounds
    return famo._offset


# ---------------------------------------------------------------------------------- the fast path


def fast_loss(famo: FAMOWeighting, losses: Tensor) -> Tensor | None:
    """``loss`` for the common call, eager: one vector of losses of the state's dtype and device,
    under grad, one process, every task, no schedule; None where anything else applies (the
    general path then decides, with the same arithmetic)."""
    buffers, window = famo._buffers, famo._window
    logits = buffers["logits"]
    if (
        F.is_compiling()
        or losses.dim() != 1
        or losses.shape[0] != famo._num_tasks
        or losses.dtype != logits.dtype
        or not losses.requires_grad
        or losses.device != logits.device
        or torch._C._current_graph_task_id() != -1  # inside backward: maybe a replay
        or not window.current(buffers)
        or famo._group.active() is not None
        or famo._group.per_rank_in_many()
    ):
        return None
    values = losses.data  # read only, never written: no autograd node, no ATen op
    log_d = torch.add(values, offset(famo, False)).log_()
    pending = window.pending
    learns = (
        pending
        and not famo._settings["extra_forward"]
        and (famo._attachment is None or window.stepped)
    )
    if famo._settings["validate"]:
        famo._check_fast(values, log_d, accumulate=pending and not learns)
    if learns:  # extra_forward=False: this call's losses end the previous step
        learn(famo, log_d, famo._adam)
    weights = torch.softmax(torch.sub(logits, log_d), dim=0)
    if window.pending:
        record(famo, values, log_d, None)
    else:
        buffers["window_sum"] = values
        buffers["window_count"] = famo._constants["one"]
        window.pending, window.calls, window.lone_log = True, 1, log_d
        window.note(buffers, False)
    return torch.dot(losses, weights)


def fast_update(famo: FAMOWeighting, new_losses: Tensor) -> bool:
    """``update`` for the common call (see :func:`fast_loss`); False where it does not apply."""
    buffers, window = famo._buffers, famo._window
    logits = buffers["logits"]
    if (
        F.is_compiling()
        or not window.pending
        or not famo._settings["extra_forward"]
        or new_losses.dim() != 1
        or new_losses.shape[0] != famo._num_tasks
        or new_losses.dtype != logits.dtype
        or new_losses.device != logits.device
        or (famo._attachment is not None and not window.stepped)
        or not window.current(buffers)
        or famo._group.active() is not None
        or famo._group.per_rank_in_many()
    ):
        return False
    values = new_losses.data if new_losses.requires_grad else new_losses
    after = torch.add(values, offset(famo, False)).log_()
    if famo._settings["validate"]:
        famo._check_fast(values, after, param="new_losses")
    learn(famo, after, famo._adam)
    return True


# ---------------------------------------------------------------------------------- recording


def record(famo: FAMOWeighting, values: Tensor, log_d: Tensor, mask: Tensor | None) -> None:
    """Add one call's losses (and their log-distance) to the window."""
    buffers, window = famo._buffers, famo._window
    compiling = F.is_compiling()  # then no fact is read: one graph whatever the window holds
    # Never in place: a window buffer may be a shared zero, or the caller's own loss values.
    if not compiling and not window.pending and mask is None:
        buffers["window_sum"] = values  # by reference: a fresh (or detached) tensor
        buffers["window_count"] = famo._constants["one"]
        window.calls, window.lone_log = 1, log_d
    else:
        present = 1.0 if mask is None else mask.to(values.dtype)
        buffers["window_sum"] = buffers["window_sum"] + values
        buffers["window_count"] = buffers["window_count"] + present
        if compiling:
            window.calls = None
        elif window.calls is not None:
            window.calls += 1
        window.lone_log = None
    window.pending = True
    window.note(buffers, compiling)


def clear(famo: FAMOWeighting, compiling: bool | None = None) -> None:
    """Forget the window (consumed by a logit step, or dropped)."""
    buffers, window, constants = famo._buffers, famo._window, famo._constants
    buffers["window_sum"] = constants["zero_sum"]
    buffers["window_count"] = constants["zero_count"]
    buffers["window_stepped"] = constants["false"]
    window.pending, window.stepped, window.calls, window.lone_log = False, False, 0, None
    window.note(buffers, compiling)


def mark_stepped(famo: FAMOWeighting) -> None:
    """An attached optimizer really stepped: the window's losses were followed by a step."""
    window = famo._window
    if window.pending and not window.stepped:
        famo._buffers["window_stepped"] = famo._constants["true"]
        window.stepped = True
        window.note(famo._buffers)


def window_log_distance(famo: FAMOWeighting, offset: Tensor) -> Tensor:
    """log D of the window's mean losses (0 for tasks it does not hold)."""
    buffers = famo._buffers
    total, count = buffers["window_sum"], buffers["window_count"]
    if not F.is_compiling():  # (compiled: nothing read from Python, one graph for any window)
        window = famo._window
        if window.lone_log is not None:
            return window.lone_log
        if window.calls and not famo._settings["allow_missing_tasks"]:
            return torch.add(offset, total, alpha=1.0 / window.calls).log_()
    present = count > 0
    return torch.where(present, total / count.clamp_min(1.0) + offset, 1.0).log_()


# ---------------------------------------------------------------------------------- learning


def learn(famo: FAMOWeighting, after: Tensor, adam: dict[str, Any]) -> None:
    """The logit step from the window to ``after`` (log D): eager, all tasks, no schedule."""
    buffers = famo._buffers
    logits = buffers["logits"]
    lone = famo._window.lone_log
    before = lone if lone is not None else window_log_distance(famo, offset(famo, False))
    grad = F.logit_gradient(logits, torch.sub(before, after))
    state = (logits, grad, buffers["exp_avg"], buffers["exp_avg_sq"], buffers["adam_step"])
    if famo._fused(logits.device, False):
        F._fused_adam_(*state, adam["lr"], adam["gamma"], adam["betas"], adam["eps"], None)
    else:
        F._single_tensor_adam_(*state, adam["lr"], adam["gamma"], adam["betas"], adam["eps"])
    clear(famo, False)


def learn_scheduled(
    famo: FAMOWeighting,
    after: Tensor,
    after_mask: Tensor | None,
    go: Tensor | None,
    adam: dict[str, Any],
) -> None:
    r"""The logit step with every decision a tensor: schedule, missing tasks, skips.

    ``go`` (0-dim bool, None for True): whether this is a learning step at all (an update not
    skipped). During warm-up it only counts; after it, :math:`\delta` joins the block, and the
    block's mean takes the Adam step once the block holds ``update_every`` learning steps.
    Leaves the window to the caller.
    """
    buffers = famo._buffers
    logits = buffers["logits"]
    count = buffers["window_count"]
    before = window_log_distance(famo, offset(famo))
    masked = famo.allow_missing_tasks
    mask = None
    if masked:
        mask = count > 0 if after_mask is None else (count > 0) & after_mask
        delta = torch.where(mask, before - after, 0.0)
    else:
        delta = torch.sub(before, after)
    if famo.warmup_steps > 0:
        warm = buffers["warmup_count"]
        in_warmup = warm < famo.warmup_steps
        counted = in_warmup if go is None else in_warmup & go
        buffers["warmup_count"] = warm + counted.to(warm.dtype)
        go = ~in_warmup if go is None else go & ~in_warmup
    if famo.update_every > 1:
        take = torch.ones_like(delta, dtype=torch.bool) if mask is None else mask
        if go is not None:
            take = take & go
        block_sum = buffers["block_sum"] + torch.where(take, delta, 0.0)
        block_tasks = buffers["block_tasks"] + take.to(block_sum.dtype)
        block_count = buffers["block_count"] + (1.0 if go is None else go.to(torch.float32))
        full = block_count >= famo.update_every
        delta = block_sum / block_tasks.clamp_min(1.0)
        if mask is not None:
            mask = block_tasks > 0
        go = full if go is None else go & full
        keep = ~full
        buffers["block_sum"] = torch.where(keep, block_sum, 0.0)
        buffers["block_tasks"] = torch.where(keep, block_tasks, 0.0)
        buffers["block_count"] = torch.where(keep, block_count, 0.0)
    grad = F.logit_gradient(logits, delta, mask)
    if mask is not None and go is not None:
        mask = mask & go
    F.adam_step_(
        logits,
        grad,
        buffers["exp_avg"],
        buffers["exp_avg_sq"],
        buffers["adam_step"],
        fused=famo._fused(logits.device),
        mask=mask if mask is not None else go,
        **adam,
    )


def consume_if(famo: FAMOWeighting, learned: Tensor, values: Tensor, mask: Tensor | None) -> None:
    """``extra_forward=False`` in tensor form: where ``learned``, this call opens a new window;
    otherwise it joins the current one."""
    buffers = famo._buffers
    present = values.new_ones(()) if mask is None else mask.to(values.dtype)
    buffers["window_sum"] = torch.where(learned, values, buffers["window_sum"] + values)
    buffers["window_count"] = torch.where(learned, present, buffers["window_count"] + present)
    # A learning call clears `stepped`; a call that did not learn had it False already.
    buffers["window_stepped"] = famo._constants["false"]
    window = famo._window
    window.pending, window.stepped, window.calls, window.lone_log = True, False, None, None
    window.note(buffers)


def ready_tensor(famo: FAMOWeighting) -> Tensor:
    """``extra_forward=False``: whether a ``loss`` call now takes the pending step (a tensor)."""
    pending = (famo._buffers["window_count"] > 0).any()
    if famo._attachment is None:
        return pending
    return pending & famo._buffers["window_stepped"].bool()


def replaying() -> bool:
    """Whether autograd is running a forward again inside backward to recompute what it did not
    save (non-reentrant activation checkpointing): such a call has been made and recorded once.

    (Reentrant checkpointing runs its forward under ``torch.no_grad()``, which records nothing,
    and the call it replays inside backward is then the one that records.)
    """
    if F.is_compiling() or torch._C._current_graph_task_id() == -1:
        return False  # (a compiled region is recomputed inside its own graph, not by Python)
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(True)
    return hooks is not None and "_recomputation_hook" in getattr(hooks[0], "__qualname__", "")


def minus_infinity_outside(logits: Tensor, mask: Tensor | None) -> Tensor:
    return logits if mask is None else logits.masked_fill(~mask, -math.inf)
