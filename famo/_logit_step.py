r"""The logit step as tensors in, tensors out: from the window's losses to new Adam values.

Two forms, with the same arithmetic from :mod:`famo.functional`:

* :func:`plain_step_`: every task, no schedule, decided in Python; writes the Adam work copies it
  is given (never the state itself: the caller commits them in one operation);
* :func:`scheduled_step`: every decision a tensor (warm-up, blocks of ``update_every``, missing
  tasks, a tensor ``skip``, ``torch.compile``), so that a compiled step is one graph whatever
  the window or the step count; returns the new value of every buffer it changes.

Where the two overlap they run the same operations on the same values, so an object with a
schedule takes the very steps of one without it once the schedule says "step".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from famo import functional


class Adam(NamedTuple):
    """The logits' Adam options, as :func:`famo.functional.adam_step_` takes them."""

    lr: float
    gamma: float
    betas: tuple[float, float]
    eps: float


def window_log_distance(
    total: Tensor, count: Tensor, offset: Tensor, calls: int | None, masked: bool
) -> Tensor:
    """log D of the window's mean losses (0 for tasks it does not hold).

    ``calls``: the number of recording calls, where every task was recorded by each and Python
    knows it (an eager call); otherwise the counts are read as tensors.
    """
    if calls and not masked:
        return torch.add(offset, total, alpha=1.0 / calls).log_()
    present = count > 0
    return torch.where(present, total / count.clamp_min(1.0) + offset, 1.0).log_()


def plain_step_(
    work: tuple[Tensor, Tensor, Tensor, Tensor],
    before: Tensor,
    after: Tensor,
    adam: Adam,
    fused: bool,
) -> None:
    """One logit step on ``work`` (logits, exp_avg, exp_avg_sq, step), in place, from the log
    distances ``before`` and ``after`` (every task present, no schedule)."""
    logits, exp_avg, exp_avg_sq, step = work
    grad = functional.logit_gradient(logits, torch.sub(before, after))
    if fused:
        functional._fused_adam_(logits, grad, exp_avg, exp_avg_sq, step, *adam, None)
    else:
        functional._single_tensor_adam_(logits, grad, exp_avg, exp_avg_sq, step, *adam)


def scheduled_step(
    state: Mapping[str, Tensor],
    before: Tensor,
    after: Tensor,
    after_mask: Tensor | None,
    go: Tensor | None,
    *,
    warmup_steps: int,
    update_every: int,
    masked: bool,
    adam: Adam,
    fused: bool,
) -> dict[str, Tensor]:
    r"""The logit step with every decision a tensor; the new values of the buffers it changes.

    ``go`` (0-dim bool, None for True): whether this is a learning step at all (an update not
    skipped). During warm-up it only counts; after it, :math:`\delta` joins the block, and the
    block's mean takes the Adam step once the block holds ``update_every`` learning steps. With
    ``masked``, the step uses the tasks present both in the window and in ``after_mask``.
    """
    logits, count = state["logits"], state["window_count"]
    new: dict[str, Tensor] = {}
    mask = None
    if masked:
        mask = count > 0 if after_mask is None else (count > 0) & after_mask
        delta = torch.where(mask, before - after, 0.0)
    else:
        delta = torch.sub(before, after)
    if warmup_steps > 0:
        warm = state["warmup_count"]
        in_warmup = warm < warmup_steps
        counted = in_warmup if go is None else in_warmup & go
        new["warmup_count"] = warm + counted.to(warm.dtype)
        go = ~in_warmup if go is None else go & ~in_warmup
    if update_every > 1:
        take = torch.ones_like(delta, dtype=torch.bool) if mask is None else mask
        if go is not None:
            take = take & go
        block_sum = state["block_sum"] + torch.where(take, delta, 0.0)
        block_tasks = state["block_tasks"] + take.to(block_sum.dtype)
        block_count = state["block_count"] + (1.0 if go is None else go.to(torch.float32))
        full = block_count >= update_every
        delta = block_sum / block_tasks.clamp_min(1.0)
        if mask is not None:
            mask = block_tasks > 0
        go = full if go is None else go & full
        keep = ~full
        new["block_sum"] = torch.where(keep, block_sum, 0.0)
        new["block_tasks"] = torch.where(keep, block_tasks, 0.0)
        new["block_count"] = torch.where(keep, block_count, 0.0)
    grad = functional.logit_gradient(logits, delta, mask)
    if mask is not None and go is not None:
        mask = mask & go
    work = [state[key].clone() for key in ("logits", "exp_avg", "exp_avg_sq", "adam_step")]
    functional.adam_step_(
        work[0],
        grad,
        work[1],
        work[2],
        work[3],
        lr=adam.lr,
        gamma=adam.gamma,
        betas=adam.betas,
        eps=adam.eps,
        fused=fused,
        mask=mask if mask is not None else go,
    )
    new.update(zip(("logits", "exp_avg", "exp_avg_sq", "adam_step"), work, strict=True))
    return new
