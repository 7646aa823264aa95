r"""FAMOWeighting's state as registered buffers: the layout, written, checked, migrated, restored.

Every entry of ``state_dict()`` is a registered buffer, the module contract that BatchNorm's
running statistics follow, so every tool that finds a module's tensors by key finds FAMO's
(``torch.distributed.checkpoint``, ``from_pretrained``, Accelerate's big-model loading,
``torch.func.functional_call``). Layout version 3:

==================== ========== ====== ==========================================================
key                  dtype      shape  meaning
==================== ========== ====== ==========================================================
``logits``           state      (k,)   :math:`\xi`
``exp_avg``          state      (k,)   Adam's first moment
``exp_avg_sq``       state      (k,)   Adam's second moment
``adam_step``        float32    () (k) Adam's step count (per task with ``allow_missing_tasks``)
``lower_bounds``     float64    (k,)   the bounds :math:`b`, exactly as given
``window_sum``       state      (k,)   sum of the losses recorded since the last logit step
``window_count``     state      (k,)   how many were recorded, per task (0: nothing pending)
``window_stepped``   uint8      ()     1: an attached optimizer stepped since they were recorded
``warmup_count``     float32    ()     learning steps taken in warm-up
``block_count``      float32    ()     learning steps in the current block (``update_every``)
``block_sum``        state      (k,)   the block's sum of log-improvements, per task
``block_tasks``      state      (k,)   the block's learning steps where each task was present
``task_names_utf8``  uint8      (n,)   the task names in UTF-8, separated by NUL (empty: a count)
``format_version``   int64      ()     3
==================== ========== ====== ==========================================================

*state* is the module's dtype: float32, or float64 after ``.double()``; ``.half()`` and
``.bfloat16()`` move the state but never lower its precision, and the bounds stay float64
(float32 on MPS, which has no float64). The flag is uint8, not bool: tools that average a
module's buffers (``AveragedModel(use_buffers=True)``) subtract them. Hyper-parameters belong
to the constructor and are not saved. :func:`save` writes copies, so editing a ``state_dict()``
in place never reaches the live object. :func:`load` checks a whole FAMO part before any of it
is taken, sorts keys into torch's ``missing_keys``/``unexpected_keys`` (so ``strict`` behaves as
for any module), and migrates
layout 1 (famo 0.1: seven float tensors and ``_extra_state``) and layout 2 (famo 0.2: ``steps``,
``min_losses``, ``pending_*``, no schedule).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import torch
from torch import Tensor

from famo._distributed import watch_per_rank

if TYPE_CHECKING:
    from famo._weighting import FAMOWeighting

#: Version of the layout that :meth:`FAMOWeighting.state_dict` writes.
FORMAT_VERSION: Final = 3

STATE: Final = (
    "logits",
    "exp_avg",
    "exp_avg_sq",
    "window_sum",
    "window_count",
    "block_sum",
    "block_tasks",
)
COUNTS: Final = ("adam_step", "warmup_count", "block_count")
KEYS: Final = (
    "logits",
    "exp_avg",
    "exp_avg_sq",
    "adam_step",
    "lower_bounds",
    "window_sum",
    "window_count",
    "window_stepped",
    "warmup_count",
    "block_count",
    "block_sum",
    "block_tasks",
    "task_names_utf8",
    "format_version",
)
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
_LOW_PRECISION: Final = (torch.float16, torch.bfloat16)


def bounds_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def encode_task_names(names: tuple[str, ...] | None, device: torch.device) -> Tensor:
    data = "\x00".join(names).encode() if names is not None else b""
    return torch.tensor(list(data), dtype=torch.uint8, device=device)


def _decode_task_names(encoded: Tensor) -> list[str] | None:
    if encoded.numel() == 0:
        return None
    try:
        return bytes(encoded.tolist()).decode().split("\x00")
    except UnicodeDecodeError:
        raise ValueError("The checkpoint's `task_names_utf8` should be UTF-8. It is not.") from None


# ---------------------------------------------------------------------------------- creating


def initial(
    famo: FAMOWeighting, bounds: Tensor, device: torch.device, dtype: torch.dtype
) -> dict[str, Tensor]:
    """The buffers of a fresh object (layout 3), in the order of :data:`KEYS`."""

    def zeros(*shape: int, dtype: torch.dtype = dtype) -> Tensor:
        return torch.zeros(shape, dtype=dtype, device=device)

    k, counts = famo.num_tasks, torch.float32
    per_task = famo._settings["allow_missing_tasks"]
    return {
        "logits": zeros(k),
        "exp_avg": zeros(k),
        "exp_avg_sq": zeros(k),
        "adam_step": zeros(k, dtype=counts) if per_task else zeros(dtype=counts),
        "lower_bounds": bounds.to(device, bounds_dtype(device), copy=True),
        "window_sum": zeros(k),
        "window_count": zeros(k),
        "window_stepped": zeros(dtype=torch.uint8),
        "warmup_count": zeros(dtype=counts),
        "block_count": zeros(dtype=counts),
        "block_sum": zeros(k),
        "block_tasks": zeros(k),
        "task_names_utf8": encode_task_names(famo.task_names, device),
        "format_version": torch.tensor(FORMAT_VERSION, device=device),
    }


def register(famo: FAMOWeighting, bounds: Tensor, device: torch.device, dtype: torch.dtype) -> None:
    """A new object's buffers (and, for one state per rank, ``rank_canary``, not saved)."""
    for key, tensor in initial(famo, bounds, device, dtype).items():
        famo.register_buffer(key, tensor)
    if famo._settings["process_group"] is False:  # see famo._window._check_own_state
        canary = torch.tensor(famo._group.rank(), device=device)
        famo.register_buffer("rank_canary", canary, persistent=False)
        watch_per_rank(famo)
    famo._state_replaced()


def reset(famo: FAMOWeighting, bounds: Tensor) -> None:
    """A fresh state with these bounds, on the object's device and in its dtype."""
    logits = famo._buffers["logits"]
    famo._buffers.update(initial(famo, bounds, logits.device, logits.dtype))
    famo._state_replaced()


# ---------------------------------------------------------------------------------- writing


def save(buffers: Mapping[str, Tensor], destination: Any, prefix: str, keep_vars: bool) -> None:
    """Write the layout: copies (``keep_vars=True``: the buffers themselves, as torch does)."""
    for key in KEYS:
        tensor = buffers[key]
        destination[prefix + key] = tensor if keep_vars else tensor.detach().clone()


# ---------------------------------------------------------------------------------- moving


def convert(buffers: Mapping[str, Tensor], fn: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """``.to()``, ``.double()``, ``to_empty()``, ``share_memory()``… applied to the buffers.

    The device always follows ``fn``. The state's dtype follows a float32/float64 conversion
    but not a 16-bit one; counts stay float32, bounds float64, and the others keep their dtype.
    Converting float64 state to float32 is refused, changing nothing, where a value would
    overflow.
    """
    converted = {}
    for key, tensor in buffers.items():
        new = fn(tensor)
        if key in STATE:
            dtype = new.dtype if new.dtype not in _LOW_PRECISION else tensor.dtype
        elif key in COUNTS:
            dtype = torch.float32
        elif key == "lower_bounds":
            dtype = bounds_dtype(new.device)
        else:
            dtype = tensor.dtype
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
            key
            for key in STATE
            if not buffers[key].is_meta
            and bool(torch.isfinite(buffers[key]).all())
            and not bool(torch.isfinite(converted[key]).all())
        ]
        if overflowed:
            names = ", ".join(f"`{key}`" for key in overflowed)
            raise ValueError(
                f"FAMO's state ({names}) holds values beyond the range of {new_dtype}, so the "
                f"conversion was undone and the state stays {old_dtype}. Call `update` or "
                f"`discard` first, or keep the state in {old_dtype}."
            )
    return converted


def move(famo: FAMOWeighting, fn: Callable[[Tensor], Tensor]) -> None:
    """``_apply`` of :class:`~famo.FAMOWeighting`: :func:`convert`, then the facts go along
    (or are read again, where a tool replaced the buffers since famo's last call)."""
    known = famo._window.current(famo._buffers)
    famo._buffers.update(convert(famo._buffers, fn))
    famo._state_replaced(derive=not known)


# ---------------------------------------------------------------------------------- loading


def load(
    famo: FAMOWeighting,
    state_dict: Mapping[str, Any],
    prefix: str,
    local_metadata: Mapping[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """``_load_from_state_dict``: check all, then take all (``assign=True``: the checkpoint's
    tensors become the buffers). torch passes ``strict=True`` here; the keys reported decide."""
    assign = bool(local_metadata.get("assign_to_params_buffers", False))
    ours = {
        key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)
    }
    layout: tuple[str, ...]
    if "_extra_state" in ours and "format_version" not in ours:
        layout = _V1_KEYS
    elif any(key in ours for key in _V2_RENAMED if key != "task_names"):
        layout = _V2_KEYS
    else:
        layout = KEYS
    unexpected_keys.extend(prefix + key for key in ours if key not in layout)
    missing = [key for key in layout if key not in ours]
    if len(missing) == len(layout):
        missing_keys.extend(prefix + key for key in missing)
        return  # no FAMO state in this checkpoint: torch's strict rules decide
    if missing:
        error_msgs.append(
            f"The checkpoint holds part of a FAMOWeighting state: {missing} are missing, so "
            "none of it was loaded. Save the whole object's state_dict()."
        )
        return
    try:
        tensors = _checked(famo, _migrated(ours, layout))
    except ValueError as error:
        error_msgs.append(str(error))
        return
    device = famo._buffers["logits"].device
    for key, value in tensors.items():
        famo._buffers[key] = value if assign else value.to(device, copy=True)
    famo._state_replaced()


def adopt(famo: FAMOWeighting) -> None:
    """Buffers that a tool replaced (a loader that sets tensors by key, ``functional_call``),
    checked as a checkpoint is and brought back to FAMO's dtypes (a loader may cast to 16 bits).

    :raises RuntimeError: not a FAMO state (a loader that found none left uninitialised memory).
    """
    buffers = famo._buffers
    dtype = buffers["logits"].dtype
    dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    try:
        tensors = _checked(famo, {key: buffers[key] for key in KEYS}, dtype)
    except ValueError as error:
        raise RuntimeError(
            "FAMOWeighting's buffers were replaced from outside famo by values that are not a "
            f"FAMO state: {error} A loader that found no FAMO state in its checkpoint (say "
            "`from_pretrained` of a backbone saved without FAMO) leaves uninitialised memory "
            "there: call `reset_parameters()` on the FAMOWeighting after loading, or load a "
            "checkpoint that holds its state."
        ) from None
    for key, value in tensors.items():
        current = buffers[key]
        if value.dtype != current.dtype or value.shape != current.shape:
            buffers[key] = value.to(current.device)


def _migrated(ours: Mapping[str, Any], layout: tuple[str, ...]) -> dict[str, Any]:
    """Layouts 1 and 2 in layout 3's keys (the schedule of an older checkpoint is empty)."""
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
        migrated["task_names_utf8"] = encode_task_names(names, torch.device("cpu"))
        migrated["window_stepped"] = torch.tensor(0, dtype=torch.uint8)
    logits = migrated["logits"]
    like = logits.detach() if isinstance(logits, Tensor) else torch.zeros(0)
    migrated["format_version"] = torch.tensor(FORMAT_VERSION)
    for key in ("warmup_count", "block_count"):
        migrated[key] = torch.zeros((), dtype=torch.float32)
    for key in ("block_sum", "block_tasks"):
        migrated[key] = torch.zeros_like(like)
    return migrated


def _checked(
    famo: FAMOWeighting, ours: Mapping[str, Any], dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """Every check of a layout-3 FAMO part; returns the tensors as the buffers will hold them
    (the state in ``dtype``, by default the object's)."""
    k = famo.num_tasks
    dtype = famo._buffers["logits"].dtype if dtype is None else dtype
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
    mine: list[str] | int = list(famo.task_names) if famo.task_names is not None else k
    if theirs != mine:
        raise ValueError(
            f"The checkpoint is for tasks {theirs!r}, but this FAMOWeighting has tasks {mine!r}. "
            "Create it with the same tasks (names and order) to load it."
        )
    tensors: dict[str, Tensor] = {}
    for key in (*STATE, *COUNTS, "lower_bounds"):
        value = ours[key]
        scalar = key in ("warmup_count", "block_count")
        shapes = [()] if scalar else [(k,), ()] if key == "adam_step" else [(k,)]
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
        target = torch.float32 if key in COUNTS else dtype
        if key == "lower_bounds":
            target = bounds_dtype(famo._buffers["logits"].device)
        # A float64 checkpoint may not fit float32 state. (The tensor itself where nothing
        # changes: `assign=True` makes the checkpoint's tensors the buffers.)
        converted = value if value.dtype == target and not value.requires_grad else value.detach()
        converted = converted.to(target)
        if not bool(torch.isfinite(converted).all()):
            raise ValueError(f"The checkpoint's `{key}` should be finite in {target}. It is not.")
        tensors[key] = converted
    if bool((tensors["exp_avg_sq"] < 0).any()):
        raise ValueError("The checkpoint's `exp_avg_sq` should be ≥ 0. It is not.")
    for key in ("adam_step", "window_count", "warmup_count", "block_count", "block_tasks"):
        value = tensors[key]
        if bool((value < 0).any()) or not torch.equal(value, value.round()):
            raise ValueError(
                f"The checkpoint's `{key}` should hold whole numbers ≥ 0. It does not."
            )
    for total, count in (("window_sum", "window_count"), ("block_sum", "block_tasks")):
        if bool(((tensors[count] == 0) & (tensors[total] != 0)).any()):
            raise ValueError(
                f"The checkpoint's `{total}` should be 0 where `{count}` is 0: it was not "
                "written by FAMOWeighting."
            )
    per_task = famo.allow_missing_tasks
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
    if stepped.dtype != torch.uint8 or stepped.dim() != 0:
        stepped = stepped.detach().reshape(()).to(torch.uint8)
    tensors["window_stepped"] = stepped
    tensors["task_names_utf8"] = encoded
    if found_version != FORMAT_VERSION:  # migrated from an older layout
        version = torch.tensor(FORMAT_VERSION)
    tensors["format_version"] = version
    return tensors


def _length(value: Any) -> int | None:
    return int(value.shape[0]) if isinstance(value, Tensor) and value.dim() == 1 else None
