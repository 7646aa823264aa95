"""FAMO's hyper-parameters, once: their defaults, their checks, and how ``repr`` shows them.

The constructor, the attribute setters and ``repr`` all go through :data:`HYPERPARAMETERS`, so
a value is checked the same way however it arrives (``FAMOWeighting(lr=...)`` or
``famo.lr = ...``), and a checkpoint never carries them: they belong to the constructor, as for
every ``torch.nn.Module``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import torch

#: Named values of ``gamma``: the paper's Algorithm 2 (also LibMTL and TorchJD) and the class
#: default of the official code (its run scripts pass 1e-3).
GAMMA_PRESETS: Final[Mapping[str, float]] = {"paper": 1e-3, "official": 1e-5}


def _number(name: str, value: Any) -> float:
    """A real number as a Python float (numpy scalars and 0-dim tensors included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        tensor = isinstance(value, torch.Tensor) and value.numel() == 1
        if tensor or (type(value).__module__ == "numpy" and hasattr(value, "item")):
            value = value.item()  # type: ignore[union-attr]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"`{name}` should be a number. Found {value!r}.")
    return float(value)


def non_negative(name: str, value: Any) -> float:
    number = _number(name, value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"`{name}` should be a finite number ≥ 0. Found `{name} = {value}`.")
    return number


def _positive(name: str, value: Any) -> float:
    number = non_negative(name, value)
    if number == 0.0:
        raise ValueError(
            f"`{name}` should be > 0: with 0, a step whose gradient is zero divides 0 by 0 and "
            f"turns the logits into NaN. Found `{name} = {value}`."
        )
    return number


def _gamma(name: str, value: Any) -> float:
    if isinstance(value, str):
        if value not in GAMMA_PRESETS:
            raise ValueError(
                f"`gamma` should be a number ≥ 0 or one of {sorted(GAMMA_PRESETS)}. "
                f"Found {value!r}."
            )
        return GAMMA_PRESETS[value]
    return non_negative(name, value)


def _betas(name: str, value: Any) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"`betas` should be a pair (beta1, beta2). Found {value!r}.")
    beta1, beta2 = (non_negative(name, beta) for beta in value)
    if beta1 >= 1.0 or beta2 >= 1.0:
        raise ValueError(f"`betas` should each be in [0, 1). Found {tuple(value)}.")
    return beta1, beta2


@dataclass(frozen=True)
class Hyperparameter:
    name: str
    default: Any
    check: Callable[[str, Any], Any]


#: Every hyper-parameter, in the order of the constructor and of ``repr``.
HYPERPARAMETERS: Final = (
    Hyperparameter("lr", 0.025, non_negative),
    Hyperparameter("gamma", 1e-3, _gamma),
    Hyperparameter("eps", 1e-8, non_negative),
    Hyperparameter("betas", (0.9, 0.999), _betas),
    Hyperparameter("adam_eps", 1e-8, _positive),
)
BY_NAME: Final = {h.name: h for h in HYPERPARAMETERS}


def check(name: str, value: Any) -> Any:
    """The checked value of hyper-parameter ``name`` (a float, or a pair for ``betas``)."""
    return BY_NAME[name].check(name, value)


def describe(values: Mapping[str, Any]) -> list[str]:
    """``name=value`` for ``repr``: always ``lr``, ``gamma``, ``eps``; the others when changed."""
    shown = []
    for h in HYPERPARAMETERS:
        value = values[h.name]
        if h.name in ("lr", "gamma", "eps") or value != h.default:
            shown.append(f"{h.name}={value}")
    return shown


class Setting:
    """A hyper-parameter attribute: reads the object's value, checks every assignment.

    Assigning calls the owner's ``_setting_changed(name, value)`` with the checked value, which
    stores it (and refreshes what is derived from it, such as the offset ``eps - min_losses``).
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type) -> Any:
        if instance is None:
            return self
        return instance.__dict__["_settings"][self.name]

    def __set__(self, instance: Any, value: Any) -> None:
        instance._setting_changed(self.name, check(self.name, value))


# ---------------------------------------------------------------------- other constructor checks


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` should be True or False. Found {value!r}.")
    return value


def check_tasks(tasks: Any) -> tuple[str, ...] | None:
    """The task names, or None when ``tasks`` is a count."""
    if (
        isinstance(tasks, bool)
        or not isinstance(tasks, (int, Sequence))
        or isinstance(tasks, (str, bytes))
    ):
        raise TypeError(
            "`tasks` should be the number of tasks (an int) or a sequence of task names. "
            f"Found {tasks!r}."
        )
    if isinstance(tasks, int):
        if tasks < 1:
            raise ValueError(f"`tasks` should be at least 1. Found {tasks}.")
        return None
    names = tuple(tasks)
    if not names:
        raise ValueError("`tasks` should name at least one task. Found an empty sequence.")
    for name in names:
        if not isinstance(name, str) or not name or "\x00" in name:
            raise TypeError(f"`tasks` should hold non-empty strings without NUL. Found {name!r}.")
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"`tasks` should be unique names. Found {duplicates} more than once.")
    return names


def check_dtype(dtype: Any) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(
            "`dtype` should be torch.float32 or torch.float64 (FAMO's own math never runs in 16 "
            f"bits; losses of any floating dtype are promoted). Found {dtype}."
        )
    return dtype  # type: ignore[no-any-return]


def check_min_losses(min_losses: Any, num_tasks: int) -> torch.Tensor:
    """The bounds as a float64 CPU tensor of shape (k,), exactly as given."""
    # On the CPU whatever the default device (`with torch.device("meta"):` included): they are
    # kept there in float64, so that `reset_parameters` and `.double()` can restore them exactly.
    if min_losses is None:
        return torch.zeros(num_tasks, dtype=torch.float64, device="cpu")
    if isinstance(min_losses, bool):
        raise TypeError(f"`min_losses` should be numbers. Found {min_losses!r}.")
    if isinstance(min_losses, (int, float)):
        bounds = torch.full((num_tasks,), float(min_losses), dtype=torch.float64, device="cpu")
    else:
        if isinstance(min_losses, torch.Tensor):
            min_losses = min_losses.detach()  # a bound is a constant, never part of a graph
            if min_losses.device.type == "meta":
                raise ValueError("`min_losses` should hold values. Found a tensor on meta.")
        try:
            bounds = torch.as_tensor(min_losses, dtype=torch.float64, device="cpu")
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(
                f"`min_losses` should be a number, a sequence or a tensor of {num_tasks} "
                f"numbers. Found {min_losses!r}."
            ) from error
        if bounds.dim() == 0:
            bounds = bounds.expand(num_tasks).clone()
        if bounds.shape != (num_tasks,):
            found = f"{bounds.shape[0]}" if bounds.dim() == 1 else f"shape {tuple(bounds.shape)}"
            raise ValueError(
                f"`min_losses` should have {num_tasks} entries, one per task. Found {found}."
            )
    if not torch.isfinite(bounds).all():
        raise ValueError(f"`min_losses` should be finite. Found {bounds.tolist()}.")
    return bounds.clone()


def check_representable(name: str, value: float, dtype: torch.dtype) -> None:
    if value > torch.finfo(dtype).max:
        raise ValueError(
            f"`{name}` should be representable in the state's dtype {dtype} (at most "
            f"{torch.finfo(dtype).max:.3g}). Found {value!r}; pass dtype=torch.float64."
        )


def check_skip(skip: Any) -> torch.Tensor | None:
    """``skip`` as a 0-dim bool tensor, or None for a Python bool (handled by the caller)."""
    if isinstance(skip, bool):
        return None
    if isinstance(skip, torch.Tensor) and skip.numel() == 1 and skip.dtype == torch.bool:
        return skip.reshape(())
    raise TypeError(f"`skip` should be a bool or a one-element bool tensor. Found {skip!r}.")
