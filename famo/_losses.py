"""Losses as users pass them (tensor, sequence, mapping) → one checked vector, and the messages."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from famo._distributed import all_reduce_sum_


class LossVector(NamedTuple):
    """The losses of one call, in the declared task order.

    ``values`` holds the losses of the tasks in ``present`` (all tasks when ``present`` is None);
    it keeps the autograd graph of what the user passed.
    """

    values: Tensor
    present: tuple[int, ...] | None


def require_grad(batch: LossVector) -> None:
    """Recording losses must carry a graph: FAMO's loss is backpropagated into the model."""
    if not batch.values.requires_grad:
        raise RuntimeError(
            "`losses` should require grad: FAMO's loss is backpropagated into the model. "
            "Found losses without autograd history. Was the forward pass run under "
            "torch.no_grad() or torch.inference_mode(), were the losses detached (.detach(), "
            ".item()), or are all the model's parameters frozen (requires_grad=False)? "
            "Losses recomputed after the step go to `update`; for a validation batch, call "
            "`loss` under torch.no_grad()."
        )


def task_label(names: tuple[str, ...] | None, index: int) -> str:
    return f"task {names[index]!r}" if names is not None else f"task {index}"


def read_losses(
    losses: Any,
    *,
    param: str,
    num_tasks: int,
    names: tuple[str, ...] | None,
    allow_missing: bool,
    allow_rows: bool,
    allow_numbers: bool,
) -> LossVector:
    """Check the structure (type, count, names, dtype, device) of ``losses``; no host sync.

    The common forms take a fast path whose Python work does not grow with k: a 1-D tensor
    as it is, and a sequence or mapping of scalar tensors through one ``torch.stack`` (no
    per-task node in the autograd graph). Anything else, or anything that fails there, goes
    through the item-by-item reading that names what is wrong.
    """
    k = num_tasks
    if isinstance(losses, Tensor):
        if losses.dim() == 1 and losses.shape[0] == k and losses.is_floating_point():
            return LossVector(losses, None)
        return LossVector(_read_tensor(losses, param, k, allow_rows), None)
    if isinstance(losses, Mapping):
        if names is not None and len(losses) == k:
            try:
                items = [losses[name] for name in names]
            except KeyError:
                pass
            else:
                stacked = _stack_fast(items)
                if stacked is not None:
                    return LossVector(stacked, None)
        return _read_mapping(losses, param, names, allow_missing, allow_numbers)
    if isinstance(losses, (list, tuple)) and len(losses) == k:
        stacked = _stack_fast(losses)
        if stacked is not None:
            return LossVector(stacked, None)
    if isinstance(losses, Sequence) and not isinstance(losses, (str, bytes)):
        if len(losses) != k:
            raise ValueError(
                f"`{param}` should have {k} entries, one per task. Found {len(losses)}."
            )
        return LossVector(_stack(list(losses), param, names, allow_numbers), None)
    raise TypeError(
        f"`{param}` should be a 1-D tensor of losses, a sequence of scalar tensors or a mapping "
        f"from task name to scalar tensor. Found {type(losses).__name__}."
    )


def _stack_fast(items: Sequence[Any]) -> Tensor | None:
    """One ``torch.stack`` of scalar floating tensors of one dtype and device, else None."""
    try:
        stacked = torch.stack(items)  # type: ignore[arg-type]
    except (TypeError, RuntimeError):
        return None
    if stacked.dim() != 1 or not stacked.is_floating_point() or stacked.dtype != items[0].dtype:
        return None  # items of another shape or of mixed dtypes: read one by one
    return stacked


def _read_tensor(losses: Tensor, param: str, k: int, allow_rows: bool) -> Tensor:
    _check_floating(losses, param)
    if allow_rows and losses.dim() == 2:
        if losses.shape[0] == 0 or losses.shape[1] != k:
            raise ValueError(
                f"`{param}` as a 2-D tensor should have shape (micro_batches, {k}), one column "
                f"per task and at least one row. Found shape {tuple(losses.shape)}."
            )
        # Gradient accumulation: the after-losses of several micro-batches are averaged.
        return losses.mean(dim=0)
    if losses.dim() != 1 or losses.shape[0] != k:
        expected = f"shape ({k},)"
        if allow_rows:
            expected += f" (or (micro_batches, {k}))"
        raise ValueError(
            f"`{param}` should be a tensor of {expected}, one loss per task. "
            f"Found shape {tuple(losses.shape)}."
        )
    return losses


def _read_mapping(
    losses: Mapping[Any, Any],
    param: str,
    names: tuple[str, ...] | None,
    allow_missing: bool,
    allow_numbers: bool,
) -> LossVector:
    if names is None:
        raise TypeError(
            f"`{param}` is a mapping, but this FAMOWeighting was created with a number of tasks, "
            "so it has no task names. Create it with FAMOWeighting([name, ...]) to pass losses "
            "by name, or pass a tensor or a sequence in task order."
        )
    known = set(names)  # a set: k can be 100,000 tasks
    unknown = [key for key in losses if key not in known]
    if unknown:
        raise ValueError(
            f"`{param}` should only have the declared task names {list(names)} as keys. "
            f"Found unknown {unknown}."
        )
    present = tuple(i for i, name in enumerate(names) if name in losses)
    if len(present) < len(names):
        missing = [name for name in names if name not in losses]
        if not allow_missing:
            raise ValueError(
                f"`{param}` should have a loss for every task. Found none for {missing}. "
                "To leave tasks out of some steps, create FAMOWeighting(..., "
                "allow_missing_tasks=True)."
            )
        if not present:
            raise ValueError(f"`{param}` should have a loss for at least one task. Found none.")
    values = _stack([losses[names[i]] for i in present], param, names, allow_numbers, present)
    return LossVector(values, None if len(present) == len(names) else present)


def _stack(
    items: list[Any],
    param: str,
    names: tuple[str, ...] | None,
    allow_numbers: bool,
    indices: tuple[int, ...] | None = None,
) -> Tensor:
    if not items:
        raise ValueError(f"`{param}` should have at least one loss. Found an empty sequence.")
    tensors = []
    for position, item in enumerate(items):
        index = indices[position] if indices is not None else position
        if isinstance(item, Tensor):
            if item.numel() != 1 or item.dim() > 1:
                raise ValueError(
                    f"`{param}` should hold one scalar loss per task. Found shape "
                    f"{tuple(item.shape)} for {task_label(names, index)}."
                )
            _check_floating(item, param)
            tensors.append(item.reshape(()))
        elif allow_numbers and isinstance(item, (int, float)) and not isinstance(item, bool):
            tensors.append(torch.tensor(float(item), dtype=torch.float64))
        else:
            kind = "scalar tensors or numbers" if allow_numbers else "scalar tensors"
            raise TypeError(
                f"`{param}` should hold {kind}. Found {type(item).__name__} for "
                f"{task_label(names, index)}."
            )
    devices = {item.device for item in items if isinstance(item, Tensor)}
    if len(devices) > 1:
        raise ValueError(
            f"`{param}` should all be on one device. Found {sorted(map(str, devices))}."
        )
    if devices:  # numbers (update only) join the tensors' device
        device = devices.pop()
        tensors = [t if t.device == device else t.to(device) for t in tensors]
    return torch.stack(tensors)


def _check_floating(losses: Tensor, param: str) -> None:
    if not losses.is_floating_point():
        raise TypeError(
            f"`{param}` should have a floating-point dtype (float16, bfloat16, float32 or "
            f"float64). Found {losses.dtype}."
        )


def average_over_ranks(
    values: Tensor,
    present: tuple[int, ...] | None,
    group: Any,
    size: int,
    *,
    num_tasks: int,
    masked: bool,
) -> tuple[Tensor, Tensor | None]:
    """The values averaged over the ``size`` ranks of ``group`` (None: one process), as (k,).

    ``masked`` (tasks may be missing): each task's mean is over the ranks that have it, and the
    mask of the tasks present on some rank comes back too (the vector holds 0 for the others).
    """
    if not masked:
        if group is not None:
            values = all_reduce_sum_(values.clone(), group).div_(size)
        return values, None
    packed = values.new_zeros(2, num_tasks)
    if present is None:
        packed[0] = values
        packed[1] = 1.0
    else:
        # Python indices, not an index tensor: that would be a blocking host→device copy.
        for position, task in enumerate(present):
            packed[0, task] = values[position]
            packed[1, task] = 1.0
    if group is not None:
        all_reduce_sum_(packed, group)
    sums, counts = packed
    return sums / counts.clamp_min(1.0), counts > 0


def check_values(
    batch: LossVector,
    values: Tensor,
    log_d: Tensor,
    *,
    offset: Tensor,
    bounds: Tensor,
    recorded: Tensor | None,
    param: str,
    eps: float,
    names: tuple[str, ...] | None,
    across_ranks: bool,
) -> None:
    """Raise a clear ValueError for a loss FAMO's math cannot use (one host sync).

    ``values`` are the (averaged) values in the state's dtype and ``log_d`` their log-distance;
    ``recorded``: the window's sum, when ``values`` will be added to it (it must stay finite).
    """
    if values.device.type == "meta":
        raise ValueError(
            f"`{param}` are on the meta device, which holds no values to check. Create "
            "FAMOWeighting(..., validate=False) to run on meta tensors."
        )
    good = torch.isfinite(log_d).all()
    if recorded is not None:
        good &= torch.isfinite(recorded + values).all()
    if bool(good):
        return
    index = slice(None) if batch.present is None else list(batch.present)
    message = describe_bad_values(
        values[index] if across_ranks else batch.values.detach(),
        values[index],
        offset[index],
        bounds[index],
        eps,
        None if recorded is None else recorded[index],
        batch.present,
        param,
        names,
        across_ranks,
    )
    if param == "new_losses":
        message += (
            " The losses recorded for this step are kept: call `discard()` to drop them, "
            "or `update` again with usable values."
        )
    raise ValueError(message)


def describe_bad_values(
    given: Tensor,
    values: Tensor,
    offset: Tensor,
    bounds: Tensor,
    eps: float,
    recorded: Tensor | None,
    present: tuple[int, ...] | None,
    param: str,
    names: tuple[str, ...] | None,
    across_ranks: bool,
) -> str:
    """The message for the first loss FAMO's math cannot use (slow path).

    ``given`` are the losses as passed (averaged over ranks when ``across_ranks``), ``values``
    the same in the state's dtype, ``offset`` is ``eps - min_losses`` and ``recorded`` the sum of
    the losses recorded since the last logit step when ``values`` will be added to it (all three
    restricted to the tasks in ``present``).
    """
    indices = present if present is not None else tuple(range(values.shape[0]))
    dtype = str(values.dtype).removeprefix("torch.")
    where = " (the mean over the ranks)" if across_ranks else ""
    rows = zip(
        given.detach().double().cpu().tolist(),
        values.detach().double().cpu().tolist(),
        bounds.detach().double().cpu().tolist(),
        (values + offset).detach().double().cpu().tolist(),
        (recorded + values).detach().double().cpu().tolist()
        if recorded is not None
        else [0.0] * len(indices),
        indices,
        strict=True,
    )
    for given_value, value, bound, shifted, total, index in rows:
        label = task_label(names, index)
        if not math.isfinite(given_value):
            return (
                f"`{param}` should be finite. Found {given_value}{where} for {label}. A "
                "non-finite loss would turn FAMO's weights into NaN; skip this batch (or this "
                "step) instead."
            )
        if not math.isfinite(value):
            return (
                f"`{param}` should be representable in {dtype}, the dtype of FAMO's state. Found "
                f"{given_value!r}{where} for {label}, which is {value} in {dtype}. Scale the loss "
                "down or create FAMOWeighting(..., dtype=torch.float64)."
            )
        if not shifted > 0:
            if given_value - bound + eps > 0:
                return (
                    f"`{param}` minus their lower bounds plus eps should be > 0 in {dtype}, the "
                    f"dtype of FAMO's state. Found {given_value!r}{where} for {label}, whose "
                    f"bound is {bound!r}: loss - bound + eps is {given_value - bound + eps:.3g}, "
                    f"but it rounds to {shifted!r} in {dtype}. Lower this task's `min_losses` or "
                    "create FAMOWeighting(..., dtype=torch.float64)."
                )
            return (
                f"`{param}` minus their lower bounds plus eps should be > 0, since FAMO takes "
                f"log(loss - bound + eps). Found {given_value!r}{where} for {label}, whose bound "
                f"is {bound!r} (eps {eps:.3g}). If this loss can go below its bound, pass "
                "`min_losses` with a value below the lowest it can reach (for example its known "
                "minimum)."
            )
        if not math.isfinite(shifted):
            return (
                f"`{param}` minus their lower bounds should be representable in {dtype}, the "
                f"dtype of FAMO's state. Found {given_value!r}{where} for {label} with bound "
                f"{bound!r}: their difference overflows. Raise `min_losses`, scale the loss down "
                "or create FAMOWeighting(..., dtype=torch.float64)."
            )
        if not math.isfinite(total):
            return (
                f"`{param}` added to the losses recorded since the last `update` should stay "
                f"representable in {dtype}. Found {given_value!r}{where} for {label}, and the "
                "recorded sum overflows. Call `update` after fewer `loss` calls, scale the loss "
                "down or create FAMOWeighting(..., dtype=torch.float64)."
            )
    raise AssertionError("describe_bad_values called on valid values")
