"""The ``nn.Module`` side of :class:`~famo.FAMOWeighting`: construction, settings, state.

:class:`StateModule` checks the constructor's arguments, holds the hyper-parameters (checked on
assignment) and the :class:`~famo._state.State`, and answers to what torch asks of any module:
``.to()``/``.double()``/``to_empty()``, ``state_dict``/``load_state_dict`` (tensors only, torch's
``strict`` rules), ``repr``, copies. :class:`~famo.FAMOWeighting` adds the training calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from famo import _checkpoint
from famo._attach import Attachment
from famo._distributed import is_process_group
from famo._settings import (
    HYPERPARAMETERS,
    Setting,
    check,
    check_dtype,
    check_flag,
    check_min_losses,
    check_representable,
    check_tasks,
    describe,
)
from famo._state import State


class StateModule(nn.Module):
    """Construction, hyper-parameters, state, devices and checkpoints of a FAMOWeighting."""

    lr = Setting()
    gamma = Setting()
    eps = Setting()
    betas = Setting()
    adam_eps = Setting()

    def __init__(
        self,
        tasks: int | Sequence[str],
        *,
        lr: float = 0.025,
        gamma: float | str = 1e-3,
        min_losses: float | Sequence[float] | Tensor | None = None,
        eps: float = 1e-8,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        validate: bool = True,
        extra_forward: bool = True,
        allow_missing_tasks: bool = False,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        names = check_tasks(tasks)
        num_tasks = len(names) if names is not None else int(tasks)  # type: ignore[arg-type]
        given = {"lr": lr, "gamma": gamma, "eps": eps, "betas": betas, "adam_eps": adam_eps}
        settings = {h.name: check(h.name, given[h.name]) for h in HYPERPARAMETERS}
        for flag, value in (
            ("validate", validate),
            ("extra_forward", extra_forward),
            ("allow_missing_tasks", allow_missing_tasks),
        ):
            check_flag(flag, value)
        if not (process_group is None or process_group is False or is_process_group(process_group)):
            raise TypeError(
                "`process_group` should be None (the default group when one is initialised), "
                f"False (no communication) or a torch.distributed ProcessGroup. Found "
                f"{process_group!r}."
            )
        state_dtype = check_dtype(dtype)
        for name in ("lr", "gamma", "eps"):
            check_representable(name, settings[name], state_dtype)
        bounds = check_min_losses(min_losses, num_tasks)
        check_representable("min_losses", float(bounds.abs().max()), state_dtype)

        super().__init__()
        self._settings = settings
        self._refresh_adam()
        self._task_names = names
        self._num_tasks = num_tasks
        self._validate = validate
        self._extra_forward = extra_forward
        self._allow_missing_tasks = allow_missing_tasks
        self._process_group = process_group
        self._initial_min_losses = bounds  # float64 on the CPU: what reset_parameters restores
        self._attachment: Attachment | None = None
        self._state = State(
            num_tasks,
            bounds,
            settings["eps"],
            per_task_steps=allow_missing_tasks,
            device=torch.empty(0, device=device).device,  # honours `with torch.device(...)`
            dtype=state_dtype,
        )

    # ------------------------------------------------------------------ read-only state

    @property
    def task_names(self) -> tuple[str, ...] | None:
        """The task names given to the constructor, or None when it was given a count."""
        return self._task_names

    @property
    def num_tasks(self) -> int:
        return self._num_tasks

    @property
    def extra_forward(self) -> bool:
        return self._extra_forward

    @property
    def allow_missing_tasks(self) -> bool:
        return self._allow_missing_tasks

    @property
    def process_group(self) -> Any:
        return self._process_group

    @property
    def validate(self) -> bool:
        """Whether loss values are checked (one host sync per call). Assignable."""
        return self._validate

    @validate.setter
    def validate(self, value: bool) -> None:
        self._validate = check_flag("validate", value)

    @property
    def logits(self) -> Tensor:
        r"""The logits :math:`\xi`, shape (k,)."""
        return self._state.logits

    @property
    def exp_avg(self) -> Tensor:
        """Adam's first moment of the logits, shape (k,)."""
        return self._state.exp_avg

    @property
    def exp_avg_sq(self) -> Tensor:
        """Adam's second moment of the logits, shape (k,)."""
        return self._state.exp_avg_sq

    @property
    def min_losses(self) -> Tensor:
        """The lower bounds :math:`b`, shape (k,), in the state's dtype."""
        return self._state.min_losses

    @property
    def steps(self) -> Tensor:
        """Adam's step count per task, shape (k,), in the state's dtype (a copy)."""
        return self._state.steps

    @property
    def pending(self) -> bool:
        """Whether losses are recorded and waiting for a logit step (or :meth:`discard`)."""
        return self._state.recorded.sum is not None

    @property
    def pending_sum(self) -> Tensor:
        """The sum of the losses recorded since the last logit step, shape (k,) (a copy)."""
        return self._state.pending_sum

    @property
    def pending_count(self) -> Tensor:
        """How many losses were recorded since the last logit step, per task, shape (k,)."""
        return self._state.pending_count

    def reset(self) -> None:
        """Back to the start: zero logits (uniform weights), fresh Adam, nothing recorded.

        Hyper-parameters and ``min_losses`` are kept.

        >>> from famo import FAMOWeighting
        >>> famo = FAMOWeighting(2)
        >>> _ = famo.logits.fill_(3.0)
        >>> famo.reset()
        >>> famo.weights
        tensor([0.5000, 0.5000])
        """
        self._state.reset()

    def reset_parameters(self) -> None:
        """The constructor's state, bounds included (after ``to_empty``, for deferred init).

        >>> from famo import FAMOWeighting
        >>> with torch.device("meta"):
        ...     famo = FAMOWeighting(2, min_losses=[0.0, -1.0])
        >>> _ = famo.to_empty(device="cpu")
        >>> famo.reset_parameters()
        >>> famo.min_losses, famo.logits
        (tensor([ 0., -1.]), tensor([0., 0.]))
        """
        self._state.set_min_losses(self._initial_min_losses, self.eps)
        self.reset()

    def extra_repr(self) -> str:
        tasks = self._task_names if self._task_names is not None else self._num_tasks
        parts = [f"tasks={tasks!r}", *describe(self._settings)]
        for flag, default in (
            ("extra_forward", True),
            ("allow_missing_tasks", False),
            ("validate", True),
        ):
            if getattr(self, flag) != default:
                parts.append(f"{flag}={not default}")
        return ", ".join(parts)

    # ------------------------------------------------------------------ state, devices, checkpoints

    def _setting_changed(self, name: str, value: Any) -> None:
        if name in ("lr", "gamma", "eps"):
            check_representable(name, value, self._state.logits.dtype)
        self._settings[name] = value
        self._refresh_adam()
        if name == "eps":
            self._state.refresh_offset(value)

    def _refresh_adam(self) -> None:
        """The logits' Adam settings as :func:`famo._functional.adam_step_` takes them."""
        settings = self._settings
        self._adam = {
            "lr": settings["lr"],
            "gamma": settings["gamma"],
            "betas": settings["betas"],
            "eps": settings["adam_eps"],
        }

    def __getstate__(self) -> dict[str, Any]:
        # A copy (deepcopy for an EMA model, pickling) is not attached to the optimizer.
        state = dict(super().__getstate__())  # type: ignore[no-untyped-call]
        state["_attachment"] = None
        return state

    def _apply(self, fn: Any, recurse: bool = True) -> StateModule:
        """``.to()``, ``.double()``, ``to_empty()``: see :meth:`famo._state.State.apply`."""
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        self._state.apply(fn, self.eps)
        return self

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        """Write the layout of :mod:`famo._checkpoint`: tensors only, no hyper-parameters."""
        for key, value in self._state.checkpoint(self._task_names).items():
            destination[prefix + key] = value

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # torch calls this with strict=True whatever the user passed; the keys we report decide.
        ours = {
            key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)
        }
        found = _checkpoint.read(
            ours,
            names=self._task_names,
            num_tasks=self._num_tasks,
            allow_missing_tasks=self._allow_missing_tasks,
            dtype=self._state.logits.dtype,
        )
        missing_keys.extend(prefix + key for key in found.missing)
        unexpected_keys.extend(prefix + key for key in found.unexpected)
        if found.error is not None:
            error_msgs.append(found.error)
        if found.state is not None:
            assign = bool(local_metadata.get("assign_to_params_buffers", False))
            self._state.load(found.state, self.eps, assign=assign)
