"""FAMOWeighting's options, each declared once: its default, its check and its description.

The constructor's defaults, its ``:param`` documentation, each option attribute's documentation
(:func:`setting_doc`), the checks (at construction and on assignment), which options may be
assigned later, and ``repr`` all read :data:`OPTIONS`. Adding
an option is one record here and one keyword argument in the constructor's signature, whose
default reads the record.
"""

from __future__ import annotations

import math
import operator
import textwrap
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import torch

from famo._distributed import is_process_group

#: Named values of ``gamma``: the paper's Algorithm 2 (also LibMTL and TorchJD) and the class
#: default of the official code (its run scripts pass 1e-3).
GAMMA_PRESETS: Final[Mapping[str, float]] = {"paper": 1e-3, "official": 1e-5}


# ---------------------------------------------------------------------------------- the checks


def _number(name: str, value: Any) -> float:
    """A real number as a Python float (numpy scalars and one-element tensors included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        tensor = isinstance(value, torch.Tensor) and value.numel() == 1
        if tensor or (type(value).__module__ == "numpy" and hasattr(value, "item")):
            value = value.item()  # type: ignore[union-attr]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"`{name}` should be a number. Found {value!r}.")
    return float(value)


def _non_negative(name: str, value: Any, num_tasks: int) -> float:
    number = _number(name, value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"`{name}` should be a finite number ≥ 0. Found `{name} = {value}`.")
    return number


def _positive(name: str, value: Any, num_tasks: int) -> float:
    number = _non_negative(name, value, num_tasks)
    if number == 0.0:
        raise ValueError(
            f"`{name}` should be > 0: with 0, a step whose gradient is zero divides 0 by 0 and "
            f"turns the logits into NaN. Found `{name} = {value}`."
        )
    return number


def _gamma(name: str, value: Any, num_tasks: int) -> float:
    if isinstance(value, str):
        if value not in GAMMA_PRESETS:
            raise ValueError(
                f"`gamma` should be a number ≥ 0 or one of {sorted(GAMMA_PRESETS)}. "
                f"Found {value!r}."
            )
        return GAMMA_PRESETS[value]
    return _non_negative(name, value, num_tasks)


def _betas(name: str, value: Any, num_tasks: int) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"`betas` should be a pair (beta1, beta2). Found {value!r}.")
    beta1, beta2 = (_non_negative(name, beta, num_tasks) for beta in value)
    if beta1 >= 1.0 or beta2 >= 1.0:
        raise ValueError(f"`betas` should each be in [0, 1). Found {tuple(value)}.")
    return beta1, beta2


def _count(minimum: int) -> Callable[[str, Any, int], int]:
    def check(name: str, value: Any, num_tasks: int) -> int:
        try:
            if isinstance(value, bool):
                raise TypeError
            value = operator.index(value)  # ints, numpy ints; never a float, however whole
        except TypeError:
            raise TypeError(f"`{name}` should be an int ≥ {minimum}. Found {value!r}.") from None
        if value < minimum:
            raise ValueError(f"`{name}` should be an int ≥ {minimum}. Found `{name} = {value}`.")
        return int(value)

    return check


def _flag(name: str, value: Any, num_tasks: int) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` should be True or False. Found {value!r}.")
    return value


def check_flag(name: str, value: Any) -> bool:
    return _flag(name, value, 0)


def _process_group(name: str, value: Any, num_tasks: int) -> Any:
    if value is None or value is False or is_process_group(value):
        return value
    raise TypeError(
        "`process_group` should be None (the default group when one is initialised), False (no "
        f"communication) or a torch.distributed ProcessGroup. Found {value!r}."
    )


def check_min_losses(name: str, min_losses: Any, num_tasks: int) -> torch.Tensor:
    """The bounds as a float64 CPU tensor of shape (k,), exactly as given (None: zeros)."""
    # On the CPU whatever the default device (`with torch.device("meta"):` included): kept there
    # in float64, so that `reset_parameters` can restore them exactly.
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
            bounds = bounds.expand(num_tasks)
        if bounds.shape != (num_tasks,):
            found = f"{bounds.shape[0]}" if bounds.dim() == 1 else f"shape {tuple(bounds.shape)}"
            raise ValueError(
                f"`min_losses` should have {num_tasks} entries, one per task. Found {found}."
            )
    if not torch.isfinite(bounds).all():
        raise ValueError(f"`min_losses` should be finite. Found {bounds.tolist()}.")
    return bounds.clone()


def _device(name: str, value: Any, num_tasks: int) -> torch.device:
    return torch.empty(0, device=value).device  # honours `with torch.device(...)` for None


def _dtype(name: str, value: Any, num_tasks: int) -> torch.dtype:
    if value is None:
        return torch.float32
    if value not in (torch.float32, torch.float64):
        raise TypeError(
            "`dtype` should be torch.float32 or torch.float64 (FAMO's own math never runs in 16 "
            f"bits; losses of any floating dtype are promoted). Found {value}."
        )
    return value  # type: ignore[no-any-return]


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


# ---------------------------------------------------------------------------------- the records


@dataclass(frozen=True)
class Option:
    """One keyword option of :class:`~famo.FAMOWeighting`.

    ``check(name, value, num_tasks)`` returns the value as stored (or raises); ``assignable``:
    ``famo.<name> = value`` is allowed later (checked the same way); ``shown``: ``repr`` shows
    it ``"always"``, when ``"changed"`` from the default, or ``"never"``; ``stored``: kept as a
    setting (``device``, ``dtype`` and ``min_losses`` become state instead).
    """

    name: str
    default: Any
    check: Callable[[str, Any, int], Any]
    doc: str
    assignable: bool = False
    shown: str = "changed"
    stored: bool = True


OPTIONS: Final = (
    Option(
        "lr",
        0.025,
        _non_negative,
        "learning rate of the logits' Adam, ≥ 0. Default 0.025 (the paper and the official code).",
        assignable=True,
        shown="always",
    ),
    Option(
        "gamma",
        1e-3,
        _gamma,
        'weight decay on the logits (coupled, as in ``torch.optim.Adam``), ≥ 0, or ``"paper"`` '
        '(1e-3, the default: the paper\'s Algorithm 2, LibMTL and TorchJD) or ``"official"`` '
        "(1e-5, the official code's class default). One update moves a logit by at most about "
        "7.3 ``lr`` (Adam's bound for the default betas), so the logits stay finite; with 0 "
        "nothing pulls them back, and a task whose weight collapsed can stay collapsed long "
        "after its loss stops improving.",
        assignable=True,
        shown="always",
    ),
    Option(
        "min_losses",
        None,
        check_min_losses,
        "lower bounds :math:`b`: ``None`` (zeros), one number for all tasks, or k finite "
        "numbers (sequence or tensor), kept exactly (float64). A loss is usable while "
        ":math:`\\ell - b + \\epsilon > 0`. Assignable (``famo.min_losses = b``) while no "
        "losses are waiting for a logit step.",
        stored=False,
    ),
    Option(
        "eps",
        1e-8,
        _non_negative,
        ":math:`\\epsilon` inside the logarithm, ≥ 0. Default 1e-8 (the official code).",
        assignable=True,
        shown="always",
    ),
    Option(
        "betas",
        (0.9, 0.999),
        _betas,
        "Adam's ``(beta1, beta2)``, each in [0, 1). Default ``(0.9, 0.999)``.",
        assignable=True,
    ),
    Option(
        "adam_eps",
        1e-8,
        _positive,
        "Adam's epsilon, > 0. Default 1e-8 (``torch.optim.Adam``).",
        assignable=True,
    ),
    Option(
        "warmup_steps",
        0,
        _count(0),
        "the first ``warmup_steps`` learning steps (see :meth:`update`) only consume the "
        "recorded losses, as :meth:`discard` would: the weights stay uniform (or as loaded) "
        "while the model's early, fast-changing losses settle. Default 0.",
    ),
    Option(
        "update_every",
        1,
        _count(1),
        "after warm-up, one Adam step on the logits per ``update_every`` learning steps, from "
        "the mean log-improvement of the block (per task, over the steps where it was "
        "present). Default 1 (every step, as published).",
    ),
    Option(
        "validate",
        True,
        _flag,
        "check every loss value (finite, :math:`\\ell - b + \\epsilon > 0`) before using it. "
        "The check costs one host synchronisation per call; ``False`` removes it (GPU, "
        "``torch.compile``), and a bad value then gives NaN weights instead of an error.",
        assignable=True,
    ),
    Option(
        "extra_forward",
        True,
        _flag,
        "``True`` (the published recipe): :meth:`update` receives the losses recomputed on the "
        "same batch after the optimizer step. ``False``: no extra forward pass; a :meth:`loss` "
        "call that follows an optimizer step first takes the logit step, using its own losses "
        'as the "after" losses of the previous step (:math:`\\ell(\\theta_{t+1}; B_{t+1})` '
        "stands in for :math:`\\ell(\\theta_{t+1}; B_t)`, so batch-to-batch noise enters "
        ":math:`\\delta`). Unattached, every recording :meth:`loss` call ends a step; after "
        ":meth:`attach`, the optimizer's real steps do.",
    ),
    Option(
        "allow_missing_tasks",
        False,
        _flag,
        "let a mapping of losses leave tasks out. The present tasks are weighted among "
        "themselves; the logit step uses only the tasks present both before and after, and "
        "the other tasks' logits, Adam moments and step counts do not move.",
    ),
    Option(
        "process_group",
        None,
        _process_group,
        "under ``torch.distributed``, the group whose ranks average their loss values, so that "
        "every rank holds the same state and raises the same errors. ``None``: the default "
        "group whenever one is initialised; ``False``: never communicate (one state per rank; "
        "inside ``DistributedDataParallel`` this needs ``broadcast_buffers=False``).",
        shown="never",
    ),
    Option(
        "device",
        None,
        _device,
        "device of the state (it also follows the losses' device on the first recording call).",
        shown="never",
        stored=False,
    ),
    Option(
        "dtype",
        None,
        _dtype,
        "``torch.float32`` (default) or ``torch.float64``; losses of any floating dtype are "
        "promoted to it.",
        shown="never",
        stored=False,
    ),
)
BY_NAME: Final = {option.name: option for option in OPTIONS}
DEFAULTS: Final = {option.name: option.default for option in OPTIONS}


def check_options(given: Mapping[str, Any], num_tasks: int) -> dict[str, Any]:
    """Every option checked, in declaration order; raises on the first bad one."""
    return {
        option.name: option.check(option.name, given[option.name], num_tasks) for option in OPTIONS
    }


def describe(settings: Mapping[str, Any]) -> list[str]:
    """``name=value`` for ``repr``, for the stored options :data:`OPTIONS` says to show."""
    return [
        f"{option.name}={settings[option.name]!r}"
        for option in OPTIONS
        if option.stored
        and option.shown != "never"
        and (option.shown == "always" or settings[option.name] != option.default)
    ]


def param_docs(width: int = 96) -> str:
    """The ``:param`` entries of every option, for the constructor's docstring."""
    entries = []
    for option in OPTIONS:
        entries.append(
            textwrap.fill(
                f":param {option.name}: {option.doc}",
                width=width,
                subsequent_indent="    ",
                break_long_words=False,
                break_on_hyphens=False,
            )
        )
    return "\n".join(entries)


def setting_doc(option: Option) -> str:
    """The documentation of an option as an attribute: its meaning, default, and whether it may
    be assigned later (for the API reference and ``help()``)."""
    if option.assignable:
        when = (
            f"Assignable: ``famo.{option.name} = value`` is checked as the constructor checks "
            "it and applies from the next call."
        )
    else:
        when = (
            "Read-only: fixed at construction (create a new object and load this one's "
            "``state_dict()`` to change it)."
        )
    return f"The ``{option.name}`` option: {option.doc}\n\n{when}"
