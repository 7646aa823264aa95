"""The checkpoint layout of :class:`~famo.FAMOWeighting`: tensors only, versioned, checked.

Layout version 2 (``state_dict()`` under the object's prefix):

==================== ============== ========================================================
key                  dtype, shape   meaning
==================== ============== ========================================================
``logits``           float, (k,)    :math:`\\xi`
``exp_avg``          float, (k,)    Adam's first moment
``exp_avg_sq``       float, (k,)    Adam's second moment
``steps``            float, (k,)    Adam's step count, per task
``min_losses``       float, (k,)    the lower bounds :math:`b`
``pending_sum``      float, (k,)    sum of the losses recorded since the last logit step
``pending_count``    float, (k,)    how many were recorded, per task (0: nothing pending)
``pending_stepped``  bool, ()       an attached optimizer stepped since they were recorded
``task_names``       uint8, (n,)    the task names in UTF-8, separated by NUL (empty: a count)
``format_version``   int64, ()      2
==================== ============== ========================================================

Everything a tool may carry (``safetensors``, Accelerate, ``torch.load(weights_only=True)``)
and nothing that depends on the constructor: hyper-parameters and flags are not saved. Layout 1
(famo 0.1) held the same seven float tensors plus a dict ``_extra_state``; it still loads, and
its hyper-parameters are ignored.

:func:`read` checks a whole FAMO part before anything is copied, and sorts keys into torch's
``missing_keys`` / ``unexpected_keys`` so that ``load_state_dict(strict=...)`` behaves as for any
module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import torch
from torch import Tensor

#: Version of the checkpoint layout written by :meth:`FAMOWeighting.state_dict`.
FORMAT_VERSION: Final = 2

FLOAT_KEYS: Final = (
    "logits",
    "exp_avg",
    "exp_avg_sq",
    "steps",
    "min_losses",
    "pending_sum",
    "pending_count",
)
KEYS: Final = (*FLOAT_KEYS, "pending_stepped", "task_names", "format_version")
_V1_KEYS: Final = (*FLOAT_KEYS, "_extra_state")


def encode_task_names(names: tuple[str, ...] | None) -> Tensor:
    data = "\x00".join(names).encode() if names is not None else b""
    return torch.tensor(list(data), dtype=torch.uint8)


def _decode_task_names(encoded: Tensor) -> list[str] | None:
    if encoded.numel() == 0:
        return None
    return bytes(encoded.tolist()).decode().split("\x00")


@dataclass(frozen=True)
class Checked:
    """A FAMO state that passed every check, in the object's dtype (float keys)."""

    tensors: dict[str, Tensor]
    stepped: bool


@dataclass(frozen=True)
class Sorted:
    """What :func:`read` found: the keys torch should report, and a state or an error."""

    missing: list[str]
    unexpected: list[str]
    state: Checked | None
    error: str | None


def read(
    ours: Mapping[str, Any],
    *,
    names: tuple[str, ...] | None,
    num_tasks: int,
    allow_missing_tasks: bool,
    dtype: torch.dtype,
) -> Sorted:
    """Sort and check the FAMO part of a state dict (keys without the prefix)."""
    layout = _V1_KEYS if "_extra_state" in ours and "format_version" not in ours else KEYS
    expected = list(layout)
    unexpected = [key for key in ours if key not in layout]
    present = [key for key in expected if key in ours]
    missing = [key for key in expected if key not in ours]
    if not present:
        return Sorted(missing, unexpected, None, None)
    if missing:
        return Sorted(
            missing,
            unexpected,
            None,
            f"The checkpoint holds part of a FAMOWeighting state: {missing} are missing, so "
            "none of it was loaded. Save the whole object's state_dict().",
        )
    try:
        checked = _check(ours, names, num_tasks, allow_missing_tasks, dtype)
    except ValueError as error:
        return Sorted([], unexpected, None, str(error))
    return Sorted([], unexpected, checked, None)


def _check(
    ours: Mapping[str, Any],
    names: tuple[str, ...] | None,
    num_tasks: int,
    allow_missing_tasks: bool,
    dtype: torch.dtype,
) -> Checked:
    mine: list[str] | int = list(names) if names is not None else num_tasks
    if "_extra_state" in ours:
        extra = ours["_extra_state"]
        if not isinstance(extra, Mapping) or extra.get("format_version") != 1:
            raise ValueError(
                "The checkpoint's `_extra_state` should be famo 0.1's metadata (a dict with "
                f"format_version 1). Found {type(extra).__name__}."
            )
        theirs = extra.get("tasks")
        stepped = False
    else:
        version = _integer_scalar(ours["format_version"], "format_version")
        if not 2 <= version <= FORMAT_VERSION:
            raise ValueError(
                f"The checkpoint has FAMOWeighting format version {version}; this famo reads "
                f"versions 1 to {FORMAT_VERSION}. Upgrade famo to load it."
            )
        encoded = ours["task_names"]
        if not isinstance(encoded, Tensor) or encoded.dtype != torch.uint8 or encoded.dim() != 1:
            raise ValueError("The checkpoint's `task_names` should be a 1-D uint8 tensor.")
        decoded = _decode_task_names(encoded)
        theirs = decoded if decoded is not None else _length(ours["logits"])
        stepped = _bool_scalar(ours["pending_stepped"])
    if theirs != mine:
        raise ValueError(
            f"The checkpoint is for tasks {theirs!r}, but this FAMOWeighting has tasks {mine!r}. "
            "Create it with the same tasks (names and order) to load it."
        )
    tensors = {}
    for key in FLOAT_KEYS:
        value = ours[key]
        if (
            not isinstance(value, Tensor)
            or not value.is_floating_point()
            or value.shape != (num_tasks,)
        ):
            found = (
                f"{value.dtype} of shape {tuple(value.shape)}"
                if isinstance(value, Tensor)
                else type(value).__name__
            )
            raise ValueError(
                f"The checkpoint's `{key}` should be a floating-point tensor of shape "
                f"({num_tasks},). Found {found}."
            )
        converted = value.detach().to(dtype)  # a float64 checkpoint may not fit float32 state
        if not bool(torch.isfinite(converted).all()):
            raise ValueError(f"The checkpoint's `{key}` should be finite in {dtype}. It is not.")
        tensors[key] = converted
    if bool((tensors["exp_avg_sq"] < 0).any()):
        raise ValueError("The checkpoint's `exp_avg_sq` should be ≥ 0. It is not.")
    for key in ("steps", "pending_count"):
        value = tensors[key]
        if bool((value < 0).any()) or not torch.equal(value, value.round()):
            raise ValueError(
                f"The checkpoint's `{key}` should hold whole numbers ≥ 0. It does not."
            )
    counts = tensors["pending_count"]
    if bool(((counts == 0) & (tensors["pending_sum"] != 0)).any()):
        raise ValueError(
            "The checkpoint's `pending_sum` should be 0 where `pending_count` is 0: it was not "
            "written by FAMOWeighting."
        )
    if not allow_missing_tasks:
        for key in ("steps", "pending_count"):
            if bool((tensors[key] != tensors[key][0]).any()):
                raise ValueError(
                    f"The checkpoint's `{key}` differ between tasks, which only happens with "
                    "tasks missing from some batches. Create FAMOWeighting(..., "
                    "allow_missing_tasks=True) to load it."
                )
    if stepped and not bool((counts > 0).any()):
        raise ValueError(
            "The checkpoint's `pending_stepped` is set with no losses pending: it was not "
            "written by FAMOWeighting."
        )
    return Checked(tensors, stepped)


def _length(value: Any) -> int | None:
    return int(value.shape[0]) if isinstance(value, Tensor) and value.dim() == 1 else None


def _integer_scalar(value: Any, key: str) -> int:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value.item())
    raise ValueError(f"The checkpoint's `{key}` should be a one-element integer tensor.")


def _bool_scalar(value: Any) -> bool:
    if isinstance(value, Tensor) and value.numel() == 1 and value.dtype == torch.bool:
        return bool(value.item())
    raise ValueError("The checkpoint's `pending_stepped` should be a one-element bool tensor.")
