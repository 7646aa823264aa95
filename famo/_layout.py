r"""FAMO's state, declared once: one row per buffer, read by everything that handles them.

Every entry of ``state_dict()`` is a registered buffer (the module contract that BatchNorm's
running statistics follow), so every tool that finds a module's tensors by key finds FAMO's.
:data:`LAYOUT` is the table of them; creating (:func:`initial`), moving (:func:`convert`),
saving (:func:`save`), checking and migrating (:mod:`famo._checkpoint`) all read it. Adding a
piece of state is one row here (and, where the logit step writes it, the code that computes it).

==================== ======= ====== ==========================================================
name                 dtype   shape  meaning
==================== ======= ====== ==========================================================
``logits``           state   (k,)   :math:`\xi`
``exp_avg``          state   (k,)   Adam's first moment
``exp_avg_sq``       state   (k,)   Adam's second moment
``adam_step``        count   () (k) Adam's step count (per task with ``allow_missing_tasks``)
``lower_bounds``     bounds  (k,)   the bounds :math:`b`, exactly as given
``window_sum``       state   (k,)   sum of the losses recorded since the last logit step
``window_count``     state   (k,)   how many were recorded, per task (0: nothing pending)
``window_stepped``   flag    ()     1: an attached optimizer stepped since they were recorded
``warmup_count``     count   ()     learning steps taken in warm-up
``block_count``      count   ()     learning steps in the current block (``update_every``)
``block_sum``        state   (k,)   the block's sum of log-improvements, per task
``block_tasks``      state   (k,)   the block's learning steps where each task was present
``task_names_utf8``  bytes   (n,)   the task names in UTF-8, separated by NUL (empty: a count)
``format_version``   version ()     3
==================== ======= ====== ==========================================================

*state* is the module's dtype: float32, or float64 after ``.double()``; ``.half()`` and
``.bfloat16()`` move the state but never lower its precision. *count* is float32 (what
``torch._fused_adam_`` takes), *bounds* float64 (float32 on MPS, which has no float64), *flag*
uint8 (not bool: tools that average a module's buffers subtract them), *bytes* uint8, *version*
int64. Hyper-parameters belong to the constructor and are not saved.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import torch
from torch import Tensor

#: Version of the layout that ``state_dict()`` writes.
FORMAT_VERSION: Final = 3


@dataclass(frozen=True)
class Entry:
    """One buffer of the state.

    ``kind``: its dtype rule (see the module docstring). ``shape``: ``"k"`` (one value per
    task), ``"scalar"``, ``"steps"`` (scalar, or per task with ``allow_missing_tasks``) or
    ``"bytes"``. ``whole``: holds whole numbers ≥ 0. ``since``: the layout
    version that introduced it; a checkpoint of an older layout gets zeros.
    """

    name: str
    kind: str
    shape: str
    whole: bool = False
    since: int = 1


LAYOUT: Final = (
    Entry("logits", "state", "k"),
    Entry("exp_avg", "state", "k"),
    Entry("exp_avg_sq", "state", "k"),
    Entry("adam_step", "count", "steps", whole=True),
    Entry("lower_bounds", "bounds", "k"),
    Entry("window_sum", "state", "k"),
    Entry("window_count", "state", "k", whole=True),
    Entry("window_stepped", "flag", "scalar"),
    Entry("warmup_count", "count", "scalar", whole=True, since=3),
    Entry("block_count", "count", "scalar", whole=True, since=3),
    Entry("block_sum", "state", "k", since=3),
    Entry("block_tasks", "state", "k", whole=True, since=3),
    Entry("task_names_utf8", "bytes", "bytes"),
    Entry("format_version", "version", "scalar"),
)
BY_NAME: Final = {entry.name: entry for entry in LAYOUT}
KEYS: Final = tuple(entry.name for entry in LAYOUT)
#: Floating-point entries (state, count, bounds): what a checkpoint check converts and bounds.
FLOATING: Final = tuple(e.name for e in LAYOUT if e.kind in ("state", "count", "bounds"))
_LOW_PRECISION: Final = (torch.float16, torch.bfloat16)


def bounds_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def dtype_of(entry: Entry, state: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of ``entry`` for a state of dtype ``state`` on ``device``."""
    return {
        "state": state,
        "count": torch.float32,
        "bounds": bounds_dtype(device),
        "flag": torch.uint8,
        "bytes": torch.uint8,
        "version": torch.int64,
    }[entry.kind]


def shape_of(entry: Entry, k: int, per_task: bool) -> tuple[int, ...]:
    if entry.shape == "k" or (entry.shape == "steps" and per_task):
        return (k,)
    return ()


def encode_task_names(names: tuple[str, ...] | None, device: torch.device) -> Tensor:
    data = "\x00".join(names).encode() if names is not None else b""
    return torch.tensor(list(data), dtype=torch.uint8, device=device)


def initial(
    k: int,
    names: tuple[str, ...] | None,
    bounds: Tensor,
    per_task: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, Tensor]:
    """The buffers of a fresh object, in layout order: zeros, but for the identifying entries."""
    buffers = {}
    for entry in LAYOUT:
        if entry.name == "lower_bounds":
            value = bounds.to(device, bounds_dtype(device), copy=True)
        elif entry.name == "task_names_utf8":
            value = encode_task_names(names, device)
        elif entry.name == "format_version":
            value = torch.tensor(FORMAT_VERSION, device=device)
        else:
            shape = shape_of(entry, k, per_task)
            value = torch.zeros(shape, dtype=dtype_of(entry, dtype, device), device=device)
        buffers[entry.name] = value
    return buffers


def save(buffers: Mapping[str, Tensor], destination: Any, prefix: str, keep_vars: bool) -> None:
    """Write the layout: copies (``keep_vars=True``: the buffers themselves, as torch does)."""
    for key in KEYS:
        tensor = buffers[key]
        destination[prefix + key] = tensor if keep_vars else tensor.detach().clone()


def convert(buffers: Mapping[str, Tensor], fn: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """``.to()``, ``.double()``, ``to_empty()``, ``share_memory()``… applied to the buffers.

    The device always follows ``fn``. The state's dtype follows a float32/float64 conversion
    but not a 16-bit one; the other kinds keep theirs. Converting float64 state to float32 is
    refused, changing nothing, where a value would overflow. (Buffers outside the layout, such
    as ``rank_canary``, keep their dtype.)
    """
    converted = {}
    for key, tensor in buffers.items():
        new = fn(tensor)
        entry = BY_NAME.get(key)
        if entry is None:
            dtype = tensor.dtype
        elif entry.kind == "state":
            dtype = new.dtype if new.dtype not in _LOW_PRECISION else tensor.dtype
        else:
            dtype = dtype_of(entry, tensor.dtype, new.device)
        if new.dtype != dtype:
            new = (
                torch.empty(tensor.shape, dtype=dtype, device=new.device)
                if tensor.is_meta
                else tensor.to(new.device, dtype)
            )
        converted[key] = new
    old_dtype, new_dtype = buffers["logits"].dtype, converted["logits"].dtype
    if new_dtype != old_dtype and new_dtype == torch.float32:
        overflowed = [
            entry.name
            for entry in LAYOUT
            if entry.kind == "state"
            and not buffers[entry.name].is_meta
            and bool(torch.isfinite(buffers[entry.name]).all())
            and not bool(torch.isfinite(converted[entry.name]).all())
        ]
        if overflowed:
            names = ", ".join(f"`{key}`" for key in overflowed)
            raise ValueError(
                f"FAMO's state ({names}) holds values beyond the range of {new_dtype}, so the "
                f"conversion was undone and the state stays {old_dtype}. Call `update` or "
                f"`discard` first, or keep the state in {old_dtype}."
            )
    return converted
