r"""A training step: the fast path, the checked path, and the logit step.

Two ways to take a logit step, with the same arithmetic from :mod:`famo.functional`:

* :func:`learn` on the eager fast path (every task, no warm-up, ``update_every=1``);
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

from famo import _losses as L
from famo import _window as W
from famo import functional as F
from famo._losses import LossVector
from famo._settings import check_skip

if TYPE_CHECKING:
    from famo._weighting import FAMOWeighting


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
    log_d = torch.add(values, W.offset(famo, False)).log_()
    pending = window.pending
    learns = (
        pending
        and not famo._settings["extra_forward"]
        and (famo._attachment is None or window.stepped)
    )
    if famo._settings["validate"]:
        check_fast(famo, values, log_d, accumulate=pending and not learns)
    if learns:  # extra_forward=False: this call's losses end the previous step
        learn(famo, log_d, famo._adam)
    weights = torch.softmax(torch.sub(logits, log_d), dim=0)
    famo._applied_weights = weights
    if window.pending:
        W.record(famo, values, log_d, None)
    else:
        one, seen = famo._constants["one"], window.seen
        buffers["window_sum"], buffers["window_count"] = values, one
        window.pending, window.calls, window.lone_log = True, 1, log_d
        window.seen = (values, values._version, one, 0, seen[4], seen[5])  # stepped: as it was
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
    after = torch.add(values, W.offset(famo, False)).log_()
    if famo._settings["validate"]:
        check_fast(famo, values, after, param="new_losses")
    learn(famo, after, famo._adam)
    return True


# ---------------------------------------------------------------------------------- the calls


def record_call(famo: FAMOWeighting, losses: Any) -> Tensor:
    """``loss`` on the checked path: every form, tasks missing, several ranks, compiled."""
    record = torch.is_grad_enabled() and not replaying()
    batch = L.read(famo, losses, "losses", for_backward=record)
    if famo._fast and record and batch.present is None and batch.values is not losses:
        objective = fast_loss(famo, batch.values)  # a list or mapping, stacked
        if objective is not None:
            return objective
    if not record or (batch.values.is_meta and not famo._buffers["logits"].is_meta):
        return evaluate(famo, batch)  # (meta losses trace shapes: computed on copies)
    compiling = F.is_compiling()
    if not compiling:
        W.sync(famo)
    values, mask = L.values(famo, batch, follow=True)
    log_d = F.log_distance(values, W.offset(famo), mask)
    window = famo._window
    if famo._settings["extra_forward"]:
        learns = False
    elif compiling:
        learns = True  # decided by tensors in learn_any
    else:
        learns = window.pending and (famo._attachment is None or window.stepped)
    if famo._settings["validate"]:
        check(famo, batch, values, log_d, "losses", accumulate=not learns and window.pending)
    if learns:
        learn_any(famo, log_d, mask, None, values=values if compiling else None)
    logits = minus_infinity_outside(famo._buffers["logits"], mask)
    weights = F.weights_from_log_distance(logits, log_d)
    famo._applied_weights = weights
    if not (learns and compiling):
        W.record(famo, values, log_d, mask)
    return weighted_sum(batch, weights)


def update_call(famo: FAMOWeighting, new_losses: Any, skip: Any) -> None:
    """``update`` on the checked path (the caller checked the mode and that losses wait)."""
    skip_tensor = check_skip(skip)
    batch = L.read(famo, new_losses, "new_losses", for_backward=False)
    fast = famo._fast and skip is False and batch.present is None
    if fast and batch.values is not new_losses and fast_update(famo, batch.values):
        return  # a list or mapping, stacked
    if skip is True or (famo._attachment is not None and not famo._window.stepped):
        W.clear(famo)  # the step did not happen: nothing to learn from
        return
    values, mask = L.values(famo, batch, follow=False)
    after = F.log_distance(values, W.offset(famo), mask)
    if famo._settings["validate"]:
        check(famo, batch, values, after, "new_losses", accumulate=False)
    go = None if skip_tensor is None else ~skip_tensor.to(after.device)
    learn_any(famo, after, mask, go)


def evaluate(famo: FAMOWeighting, batch: LossVector) -> Tensor:
    """The weighted value of local losses, changing nothing (a validation batch)."""
    values, mask = L.values(famo, batch, follow=None)
    logits = famo._buffers["logits"]
    offset = W.offset(famo)
    if values.device != logits.device:
        logits, offset = logits.to(values.device), offset.to(values.device)
    log_d = F.log_distance(values, offset, mask)
    if famo._settings["validate"]:
        check(famo, batch, values, log_d, "losses", accumulate=False, local=True)
    weights = F.weights_from_log_distance(minus_infinity_outside(logits, mask), log_d)
    return weighted_sum(batch, weights)


def weighted_sum(batch: LossVector, weights: Tensor) -> Tensor:
    """Σ wᵢ ℓᵢ over the losses as given (their graph, their dtype promoted)."""
    if batch.present is not None:
        weights = torch.stack([weights[task] for task in batch.present])  # no index tensor
    given = batch.values
    return torch.dot(given if given.dtype == weights.dtype else given.to(weights.dtype), weights)


def backward_call(famo: FAMOWeighting, losses: Any, kwargs: dict[str, Any]) -> None:
    """``backward``: ``loss(losses).backward(**kwargs)``; a backward pass that raises (out of
    memory, a freed graph) leaves nothing of this call recorded, so the step can be retried."""
    if not torch.is_grad_enabled():
        raise RuntimeError(
            "`backward` should run with autograd enabled: FAMO's loss is backpropagated "
            "into the model. Found it called inside torch.no_grad() or "
            "torch.inference_mode(). Call it outside that block; only `update` (with the "
            "losses recomputed after the step) belongs under no_grad."
        )
    window, buffers = famo._window, famo._buffers
    learns = False  # whether this call takes the pending logit step (extra_forward=False)
    if not famo._settings["extra_forward"]:
        W.sync(famo)
        learns = window.pending and (famo._attachment is None or window.stepped)
    before = (buffers["window_sum"], buffers["window_count"])
    objective = famo.loss(losses)
    try:
        objective.backward(**kwargs)  # type: ignore[no-untyped-call]
    except BaseException:
        # No optimizer step follows a failed backward pass: forget what this call recorded, so
        # that a retry is not averaged with it. (A logit step it took stands.)
        if learns:
            W.clear(famo)
        else:
            buffers["window_sum"], buffers["window_count"] = before
            window.derive(buffers)
        raise


def adam_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The logits' Adam options as :func:`famo.functional.adam_step_` takes them."""
    return {
        "lr": settings["lr"],
        "gamma": settings["gamma"],
        "betas": settings["betas"],
        "eps": settings["adam_eps"],
    }


def check(
    famo: FAMOWeighting,
    batch: LossVector,
    values: Tensor,
    log_d: Tensor,
    param: str,
    *,
    accumulate: bool,
    local: bool = False,
) -> None:
    """:func:`check_values` with the object's bounds and window (``local``: not averaged)."""
    buffers = famo._buffers
    L.check_values(
        batch,
        values,
        log_d,
        offset=W.offset(famo).to(values.device),
        bounds=buffers["lower_bounds"].to(values.device),
        recorded=buffers["window_sum"] if accumulate else None,
        param=param,
        eps=famo._settings["eps"],
        names=famo._task_names,
        across_ranks=not local and famo._group.active() is not None,
    )


def check_fast(
    famo: FAMOWeighting,
    values: Tensor,
    log_d: Tensor,
    *,
    accumulate: bool = False,
    param: str = "losses",
) -> None:
    check(famo, L.LossVector(values, None), values, log_d, param, accumulate=accumulate)


def fused(famo: FAMOWeighting, device: torch.device, compiling: bool | None = None) -> bool:
    """:func:`famo.functional.use_fused_adam`, asked again only when its inputs change."""
    if F.is_compiling() if compiling is None else compiling:
        return False
    key = (device, torch.get_num_threads())
    if key != famo._fused_key:
        famo._fused_now, famo._fused_key = F.use_fused_adam(device), key
    return famo._fused_now


# ---------------------------------------------------------------------------------- learning


def learn_any(
    famo: FAMOWeighting,
    after: Tensor,
    mask: Tensor | None,
    go: Tensor | None,
    *,
    values: Tensor | None = None,
) -> None:
    """The logit step from the window to ``after``: the fast one where it applies, else the
    scheduled one. ``values`` (``extra_forward=False``, compiled): the call's losses, which open
    the next window where the step is taken and join the current one where it is not."""
    adam = famo._adam
    settings = famo._settings
    compiling = F.is_compiling()
    simple = settings["warmup_steps"] == 0 and settings["update_every"] == 1
    plain = go is None and mask is None and not settings["allow_missing_tasks"]
    if plain and simple and not compiling:
        learn(famo, after, adam)
        return
    if values is not None and compiling:
        ready = ready_tensor(famo)
        go = ready if go is None else go & ready
        learn_scheduled(famo, after, mask, go, adam)
        consume_if(famo, ready, values, mask)
        return
    learn_scheduled(famo, after, mask, go, adam)
    W.clear(famo)


def learn(famo: FAMOWeighting, after: Tensor, adam: dict[str, Any]) -> None:
    """The logit step from the window to ``after`` (log D): eager, all tasks, no schedule."""
    buffers = famo._buffers
    logits = buffers["logits"]
    lone = famo._window.lone_log
    before = lone if lone is not None else W.window_log_distance(famo, W.offset(famo, False))
    grad = F.logit_gradient(logits, torch.sub(before, after))
    state = (logits, grad, buffers["exp_avg"], buffers["exp_avg_sq"], buffers["adam_step"])
    if fused(famo, logits.device, False):
        F._fused_adam_(*state, adam["lr"], adam["gamma"], adam["betas"], adam["eps"], None)
    else:
        F._single_tensor_adam_(*state, adam["lr"], adam["gamma"], adam["betas"], adam["eps"])
    W.clear(famo, False)


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
    before = W.window_log_distance(famo, W.offset(famo))
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
        fused=fused(famo, logits.device),
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
