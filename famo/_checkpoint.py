r"""Reading a checkpoint: which layout it is, migrated to the current one, and every check.

:func:`read` takes the FAMO part of a ``state_dict`` (keys without their prefix) and returns the
tensors as the buffers will hold them, or raises ``ValueError`` with what is wrong, before any of
it is taken. The layout (:mod:`famo._layout`) drives the checks. Older layouts still load:
layout 1 (famo 0.1: seven float tensors and ``_extra_state``) and layout 2 (famo 0.2:
``steps``, ``min_losses``, ``pending_*``, no schedule); the entries they lack get zeros.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import torch
from torch import Tensor

from famo._layout import BY_NAME, FLOATING, FORMAT_VERSION, KEYS, LAYOUT, bounds_dtype
from famo._layout import encode_task_names as encode

_V2_RENAMED: Final = {
    "steps": "adam_step",
    "min_losses": "lower_bounds",
    "pending_sum": "window_sum",
    "pending_count": "window_count",
    "pending_stepped": "window_stepped",
    "task_names": "task_names_utf8",
}
_V2_KEYS: Final = ("logits", "exp_avg", "exp_avg_sq", *_V2_RENAMED, "format_version")
_V1_KEYS: Final = (
    "logits",
    "exp_avg",
    "exp_avg_sq",
    "steps",
    "min_losses",
    "pending_sum",
    "pending_count",
    "_extra_state",
)


def layout_of(ours: Mapping[str, Any]) -> tuple[str, ...]:
    """The keys of the layout a FAMO part was written in."""
    if "_extra_state" in ours and "format_version" not in ours:
        return _V1_KEYS
    if any(key in ours for key in _V2_RENAMED if key != "task_names"):
        return _V2_KEYS
    return KEYS


def read(
    ours: Mapping[str, Any],
    layout: tuple[str, ...],
    *,
    num_tasks: int,
    names: tuple[str, ...] | None,
    per_task: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, Tensor]:
    """A whole FAMO part (every key of ``layout``) checked and in the current layout: the
    tensors as the buffers hold them (the state in ``dtype``; not yet on ``device``, whose type
    decides the bounds' dtype). :raises ValueError: what is wrong, naming the key."""
    return _checked(_migrated(ours, layout), num_tasks, names, per_task, dtype, device)


def _migrated(ours: Mapping[str, Any], layout: tuple[str, ...]) -> dict[str, Any]:
    """Layouts 1 and 2 in layout 3's keys (what an older layout lacks gets zeros)."""
    if layout == KEYS:
        return dict(ours)
    migrated = {_V2_RENAMED.get(key, key): value for key, value in ours.items()}
    if layout == _V1_KEYS:
        extra = migrated.pop("_extra_state")
        if not isinstance(extra, Mapping) or extra.get("format_version") != 1:
            raise ValueError(
                "The checkpoint's `_extra_state` should be famo 0.1's metadata (a dict with "
                f"format_version 1). Found {type(extra).__name__}."
            )
        tasks = extra.get("tasks")  # names, or a count that the logits' length must match
        names = tuple(tasks) if isinstance(tasks, list) else None
        if names is None and tasks != _length(ours["logits"]):
            names = ("?",)  # refused by the task check
        migrated["task_names_utf8"] = encode(names, torch.device("cpu"))
        migrated["window_stepped"] = torch.tensor(0, dtype=torch.uint8)
    logits = migrated["logits"]
    like = logits.detach() if isinstance(logits, Tensor) else torch.zeros(0)
    migrated["format_version"] = torch.tensor(FORMAT_VERSION)
    for entry in LAYOUT:
        if entry.since > 2 and entry.name not in migrated:
            shape_like = like if entry.shape == "k" else torch.zeros(())
            migrated[entry.name] = torch.zeros_like(shape_like, dtype=torch.float32)
    return migrated


def _checked(
    ours: Mapping[str, Any],
    k: int,
    names: tuple[str, ...] | None,
    per_task: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, Tensor]:
    version = ours["format_version"]
    if not (
        isinstance(version, Tensor) and version.numel() == 1 and not version.is_floating_point()
    ):
        raise ValueError(
            "The checkpoint's `format_version` should be a one-element integer tensor."
        )
    found_version = int(version.item())
    if not 1 <= found_version <= FORMAT_VERSION:
        raise ValueError(
            f"The checkpoint has FAMOWeighting format version {found_version}; this famo reads "
            f"versions 1 to {FORMAT_VERSION}. Upgrade famo to load it."
        )
    encoded = ours["task_names_utf8"]
    if not isinstance(encoded, Tensor) or encoded.dtype != torch.uint8 or encoded.dim() != 1:
        raise ValueError("The checkpoint's `task_names_utf8` should be a 1-D uint8 tensor.")
    decoded = _decode_task_names(encoded.cpu())
    theirs = decoded if decoded is not None else _length(ours["logits"])
    mine: list[str] | int = list(names) if names is not None else k
    if theirs != mine:
        raise ValueError(
            f"The checkpoint is for tasks {theirs!r}, but this FAMOWeighting has tasks {mine!r}. "
            "Create it with the same tasks (names and order) to load it."
        )
    tensors: dict[str, Tensor] = {}
    for key in FLOATING:
        entry = BY_NAME[key]
        value = ours[key]
        options: dict[str, list[tuple[int, ...]]] = {
            "k": [(k,)],
            "scalar": [()],
            "steps": [(k,), ()],
        }
        shapes = options[entry.shape]
        if not (isinstance(value, Tensor) and value.is_floating_point() and value.shape in shapes):
            found = (
                f"{value.dtype} of shape {tuple(value.shape)}"
                if isinstance(value, Tensor)
                else type(value).__name__
            )
            wanted = " or ".join(str(shape).replace(",)", ",)") for shape in shapes)
            raise ValueError(
                f"The checkpoint's `{key}` should be a floating-point tensor of shape {wanted}. "
                f"Found {found}."
            )
        target = {"state": dtype, "count": torch.float32, "bounds": bounds_dtype(device)}[
            entry.kind
        ]
        # A float64 checkpoint may not fit float32 state.
        converted = value.detach().to(target)
        if not bool(torch.isfinite(converted).all()):
            raise ValueError(f"The checkpoint's `{key}` should be finite in {target}. It is not.")
        tensors[key] = converted
    if bool((tensors["exp_avg_sq"] < 0).any()):
        raise ValueError("The checkpoint's `exp_avg_sq` should be ≥ 0. It is not.")
    for entry in LAYOUT:
        value = tensors.get(entry.name)
        if (
            entry.whole
            and value is not None
            and (bool((value < 0).any()) or not torch.equal(value, value.round()))
        ):
            raise ValueError(
                f"The checkpoint's `{entry.name}` should hold whole numbers ≥ 0. It does not."
            )
    for total, count in (("window_sum", "window_count"), ("block_sum", "block_tasks")):
        if bool(((tensors[count] == 0) & (tensors[total] != 0)).any()):
            raise ValueError(
                f"The checkpoint's `{total}` should be 0 where `{count}` is 0: it was not "
                "written by FAMOWeighting."
            )
    steps = tensors["adam_step"]
    if not per_task:
        for key in ("adam_step", "window_count", "block_tasks"):
            value = tensors[key]
            if value.dim() == 1 and bool((value != value[0]).any()):
                raise ValueError(
                    f"The checkpoint's `{key}` differ between tasks, which only happens with "
                    "tasks missing from some batches. Create FAMOWeighting(..., "
                    "allow_missing_tasks=True) to load it."
                )
        tensors["adam_step"] = steps[0].clone() if steps.dim() == 1 else steps
    elif steps.dim() == 0:
        tensors["adam_step"] = steps.expand(k).clone()
    stepped = ours["window_stepped"]
    flags = (torch.bool, torch.uint8)  # (bool up to layout 2)
    if not (
        isinstance(stepped, Tensor)
        and stepped.numel() == 1
        and stepped.dtype in flags
        and int(stepped.item()) in (0, 1)
    ):
        raise ValueError(
            "The checkpoint's `window_stepped` should be one element, 0 or 1 (uint8 or bool)."
        )
    if bool(stepped) and not bool((tensors["window_count"] > 0).any()):
        raise ValueError(
            "The checkpoint's `window_stepped` is set with no losses pending: it was not "
            "written by FAMOWeighting."
        )
    tensors["window_stepped"] = stepped.detach().reshape(()).to(torch.uint8)
    tensors["task_names_utf8"] = encoded.detach()
    tensors["format_version"] = torch.tensor(FORMAT_VERSION)
    return {key: tensors[key] for key in KEYS}


def _decode_task_names(encoded: Tensor) -> list[str] | None:
    if encoded.numel() == 0:
        return None
    try:
        return bytes(encoded.tolist()).decode().split("\x00")
    except UnicodeDecodeError:
        raise ValueError("The checkpoint's `task_names_utf8` should be UTF-8. It is not.") from None


def _length(value: Any) -> int | None:
    return int(value.shape[0]) if isinstance(value, Tensor) and value.dim() == 1 else None
