r"""FAMO's state: its tensors, what was recorded for the next logit step, devices and dtypes.

:class:`State` is a plain object held by :class:`~famo.FAMOWeighting` (not ``nn.Module``
buffers: DDP would broadcast buffers from rank 0 over a rank's own state, and updating plain
attributes costs nothing on the hot path). It knows how to move (``apply``), what a checkpoint
holds (``checkpoint``) and how to take one back (``load``); the layout and its checks are in
:mod:`famo._checkpoint`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import torch
from torch import Tensor

from famo import _checkpoint, _functional

_LOW_PRECISION: Final = (torch.float16, torch.bfloat16)
_TENSORS: Final = ("logits", "exp_avg", "exp_avg_sq", "min_losses", "offset", "step")


class Recorded:
    """The losses recorded since the last logit step (one window)."""

    def __init__(self) -> None:
        self.sum: Tensor | None = None  # their sum; None: nothing recorded
        self.count: int | Tensor = 0  # how many calls recorded them (per task, missing tasks)
        self.log: Tensor | None = None  # log(mean - b + eps), where a lone call knows it
        self.stepped = False  # an attached optimizer really stepped since the first of them

    def fields(self) -> tuple[Any, ...]:
        return self.sum, self.count, self.log, self.stepped

    def restore(self, fields: tuple[Any, ...]) -> None:
        self.sum, self.count, self.log, self.stepped = fields

    def clear(self) -> None:
        self.sum, self.count, self.log, self.stepped = None, 0, None, False


class State:
    r"""Logits, Adam moments and step count, bounds, the offset :math:`\epsilon - b`, the window.

    The step count is one 0-dim tensor (float32 for the fused kernel), or one per task when
    tasks may be missing. ``exact_min_losses`` keeps the bounds in float64 on the CPU, so that
    they survive ``.float()`` then ``.double()`` exactly.
    """

    def __init__(
        self,
        num_tasks: int,
        bounds: Tensor,
        eps: float,
        *,
        per_task_steps: bool,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.per_task_steps = per_task_steps
        self.fused = _functional.fused_adam_available(device)
        self.logits = torch.zeros(num_tasks, device=device, dtype=dtype)
        self.exp_avg = torch.zeros_like(self.logits)
        self.exp_avg_sq = torch.zeros_like(self.logits)
        self.step = self._zero_step()
        self.set_min_losses(bounds, eps)
        self.recorded = Recorded()

    def _zero_step(self) -> Tensor:
        logits = self.logits
        if self.per_task_steps:
            return torch.zeros_like(logits)
        dtype = torch.float32 if self.fused else logits.dtype  # the fused kernel's step dtype
        return torch.zeros((), device=logits.device, dtype=dtype)

    def set_min_losses(self, exact: Tensor, eps: float) -> None:
        self.exact_min_losses = exact.detach().to("cpu", torch.float64, copy=True)
        self.min_losses = exact.detach().to(self.logits.device, self.logits.dtype, copy=True)
        self.refresh_offset(eps)

    def refresh_offset(self, eps: float) -> None:
        r""":math:`\epsilon - b`, computed once: then :math:`D = \ell + (\epsilon - b)`."""
        self.offset = self.min_losses.neg().add_(eps)

    def reset(self) -> None:
        with torch.no_grad():
            for tensor in (self.logits, self.exp_avg, self.exp_avg_sq, self.step):
                tensor.zero_()
        self.recorded.clear()

    # ------------------------------------------------------------------ recording and learning

    def record(self, values: Tensor, log_d: Tensor, mask: Tensor | None) -> None:
        """Add one call's losses (and their log-distance) to the window."""
        # By reference: `values` is a fresh (or detached) tensor that nothing else writes to.
        recorded = self.recorded
        count: int | Tensor = 1 if mask is None else mask.to(values.dtype)
        if recorded.sum is None:
            recorded.sum, recorded.count = values, count
            recorded.log = log_d if mask is None else None
        else:
            recorded.sum = recorded.sum + values
            recorded.count = recorded.count + count
            recorded.log = None

    def learn(
        self, after: Tensor, after_mask: Tensor | None, skip: Tensor | None, adam: dict[str, Any]
    ) -> None:
        """The logit step from the window's mean to ``after`` (log-distances); then clear it.

        One call of the window: its log-distance was kept. Several: the log of their mean.
        Tasks may be missing (per-task counts): only those in the window and in ``after_mask``
        move, with a step count each.
        """
        recorded = self.recorded
        total, count, before = recorded.sum, recorded.count, recorded.log
        assert total is not None
        if not isinstance(count, Tensor):
            if before is None:
                before = torch.add(self.offset, total, alpha=1.0 / count).log_()
            delta = _functional.centred_improvement(before, after)
            grad = _functional.logit_gradient(self.logits, delta)
            _functional.adam_step_(
                self.logits,
                grad,
                self.exp_avg,
                self.exp_avg_sq,
                self.step,
                fused=_functional.use_fused_adam(self.logits.device),
                skip=skip,
                **adam,
            )
        else:
            present = count > 0
            mean = total / count.clamp_min(1.0)
            before = torch.where(present, torch.add(mean, self.offset), 1.0).log_()
            mask = present if after_mask is None else present & after_mask
            grad = _functional.masked_logit_gradient(self.logits, before - after, mask)
            if skip is not None:
                mask = mask & ~skip
            _functional.masked_adam_step_(
                self.logits, grad, self.exp_avg, self.exp_avg_sq, self.step, mask, **adam
            )
        recorded.clear()

    # ------------------------------------------------------------------ materialised views

    @property
    def steps(self) -> Tensor:
        step = self.step.to(self.logits.dtype)
        return step.expand_as(self.logits).clone() if step.dim() == 0 else step.clone()

    @property
    def pending_sum(self) -> Tensor:
        total = self.recorded.sum
        return torch.zeros_like(self.logits) if total is None else total.clone()

    @property
    def pending_count(self) -> Tensor:
        count = self.recorded.count
        if isinstance(count, Tensor):
            return count.clone()
        return torch.full_like(self.logits, float(count))

    # ------------------------------------------------------------------ devices and dtypes

    def apply(self, fn: Callable[[Tensor], Tensor], eps: float) -> None:
        """``.to()``, ``.double()``, ``to_empty()``… applied to every tensor of the state.

        16-bit dtypes keep FAMO's precision (only the device follows). Converting to float64
        takes the bounds from their exact float64 copy. Converting float64 to float32 is refused,
        changing nothing, where a value would overflow.
        """
        recorded = self.recorded
        before: dict[str, Any] = {name: getattr(self, name) for name in _TENSORS}
        before.update({f"pending {name}": getattr(recorded, name) for name in ("sum", "log")})
        before["pending count"] = recorded.count
        after: dict[str, Any] = {}
        for name, tensor in before.items():
            if not isinstance(tensor, Tensor):
                after[name] = tensor
                continue
            new = fn(tensor)
            fused_step = name == "step" and tensor.dim() == 0 and self.fused  # stays float32
            after[name] = (
                tensor.to(new.device) if new.dtype in _LOW_PRECISION or fused_step else new
            )
        old_dtype, new_dtype = self.logits.dtype, after["logits"].dtype
        if new_dtype != old_dtype:
            overflowed = [
                name
                for name, tensor in after.items()
                if isinstance(tensor, Tensor)
                and bool(torch.isfinite(before[name]).all())
                and not bool(torch.isfinite(tensor).all())
            ]
            if overflowed:
                names = ", ".join(
                    f"`{name.replace('pending ', 'pending_')}`" for name in overflowed
                )
                raise ValueError(
                    f"FAMO's state ({names}) holds values beyond the range of {new_dtype}, so the "
                    f"conversion was undone and the state stays {old_dtype}. Call `update` or "
                    f"`discard` first, or keep the state in {old_dtype}."
                )
        for name in _TENSORS:
            setattr(self, name, after[name])
        recorded.sum, recorded.log = after["pending sum"], after["pending log"]
        recorded.count = after["pending count"]
        if new_dtype != old_dtype:
            self.min_losses = self.exact_min_losses.to(self.logits.device, new_dtype)
            self.refresh_offset(eps)
        self.fused = _functional.fused_adam_available(self.logits.device)
        if self.step.dim() == 0:
            self.step = self.step.to(torch.float32 if self.fused else self.logits.dtype)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self, task_names: tuple[str, ...] | None) -> dict[str, Tensor]:
        """The tensors of :mod:`famo._checkpoint`'s layout (no hyper-parameters)."""
        return {
            "logits": self.logits.detach(),
            "exp_avg": self.exp_avg.detach(),
            "exp_avg_sq": self.exp_avg_sq.detach(),
            "steps": self.steps,
            "min_losses": self.min_losses.detach(),
            "pending_sum": self.pending_sum,
            "pending_count": self.pending_count,
            "pending_stepped": torch.tensor(self.recorded.stepped),
            "task_names": _checkpoint.encode_task_names(task_names),
            "format_version": torch.tensor(_checkpoint.FORMAT_VERSION),
        }

    def load(self, checked: _checkpoint.Checked, eps: float, *, assign: bool) -> None:
        """Take a checked checkpoint: copied to this state's device, or assigned as it is."""
        tensors = checked.tensors
        if not assign:
            device = self.logits.device
            tensors = {key: value.to(device, copy=True) for key, value in tensors.items()}
        self.logits, self.exp_avg = tensors["logits"], tensors["exp_avg"]
        self.exp_avg_sq = tensors["exp_avg_sq"]
        self.set_min_losses(tensors["min_losses"], eps)
        self.fused = _functional.fused_adam_available(self.logits.device)
        steps = tensors["steps"]
        if self.per_task_steps:
            self.step = steps
        else:
            self.step = steps[0].to(torch.float32 if self.fused else steps.dtype).clone()
        recorded = self.recorded
        recorded.clear()
        counts = tensors["pending_count"]
        if bool((counts > 0).any()):
            recorded.sum = tensors["pending_sum"]
            recorded.count = counts if self.per_task_steps else int(counts[0].item())
            recorded.stepped = checked.stepped
