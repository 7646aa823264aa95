r"""The window of recorded losses, and what famo knows about it in Python.

The buffers (see :mod:`famo._checkpoint`) are the state. :class:`Window` holds what famo knows
about them in Python (whether losses are waiting, how many calls recorded them, whether an
attached optimizer stepped, the log-distance of a lone call), so that an eager step decides
without asking the device. The facts carry the identity and version of the buffers they come
from; when a tool replaces or rewrites a buffer (a checkpoint loader, ``functional_call``, an
in-place edit), :func:`sync` derives them again from the tensors. Compiled code reads none of
them (one graph whatever the window holds) and leaves them to be derived again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from famo import functional as F
from famo._checkpoint import adopt, bounds_dtype
from famo._distributed import PER_RANK_REFUSED, unwatch
from famo._settings import check_representable

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
        unwatch(famo)
        _check_own_state(famo)
    if window.current(buffers):
        return
    if window.same_tensors(buffers) and famo._group.active() is not None:
        # Rewritten in place while every rank holds the same state (DDP's buffer broadcast
        # from rank 0): the values are those famo already knows.
        window.note(buffers)
        return
    # Replaced or edited from outside: checked, then read again (host syncs, this once).
    if not any(tensor.is_meta for tensor in buffers.values()):
        adopt(famo)
    state_replaced(famo)


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
        raise RuntimeError(PER_RANK_REFUSED)


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


def assign_bounds(famo: FAMOWeighting, bounds: Tensor) -> None:
    """``famo.min_losses = bounds`` (checked float64 CPU bounds): refused while losses wait."""
    check_representable("min_losses", float(bounds.abs().max()), famo._buffers["logits"].dtype)
    if famo.pending:
        raise RuntimeError(
            "`min_losses` cannot change while losses are recorded and waiting for a logit "
            "step: their log-distances used the old bounds. Call `update` (or `discard`) "
            "first, then assign the new bounds."
        )
    device = famo._buffers["logits"].device
    famo._buffers["lower_bounds"] = bounds.to(device, bounds_dtype(device))
    famo._initial_min_losses = bounds  # it behaves as if built with them, reset included


def state_replaced(famo: FAMOWeighting, *, derive: bool = True) -> None:
    """The buffers were set by famo (construction, a load, a move) or replaced by a tool: the
    constants, the offset and the facts start afresh."""
    logits = famo._buffers["logits"]
    constants = famo._constants = {
        "zero_sum": torch.zeros_like(logits),
        "zero_count": torch.zeros_like(logits),
        "one": torch.ones_like(logits),
        "false": torch.zeros((), dtype=torch.uint8, device=logits.device),
        "true": torch.ones((), dtype=torch.uint8, device=logits.device),
    }
    # What `note` would find after `clear` (a constant written in place since fails the check).
    famo._empty_seen = (constants["zero_sum"], 0, constants["zero_count"], 0, constants["false"], 0)
    famo._offset_key = None
    window = famo._window
    window.version_seen = famo._buffers["format_version"]._version
    if derive:
        window.derive(famo._buffers)
    else:  # the same values, moved: the facts hold, but not a log-distance computed before
        window.lone_log = None
        window.note(famo._buffers)


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
    if F.is_compiling() if compiling is None else compiling:
        window.seen = ()
    else:
        window.seen = famo._empty_seen


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
