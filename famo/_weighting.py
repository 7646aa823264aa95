"""FAMOWeighting: the task weights, their inner Adam, and everything a checkpoint needs."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Final

import torch
from torch import Tensor, nn

from famo._distributed import active_group, all_reduce_sum_, is_process_group, world_size
from famo._losses import LossVector, describe_bad_values, read_losses

#: Named values of ``gamma``: the paper's Algorithm 2 (also LibMTL and TorchJD) and the class
#: default of the official code (its run scripts pass 1e-3).
GAMMA_PRESETS: Final[Mapping[str, float]] = {"paper": 1e-3, "official": 1e-5}

#: Version of the checkpoint layout written by :meth:`FAMOWeighting.state_dict`.
FORMAT_VERSION: Final = 1

_STATE_BUFFERS: Final = (
    "logits",
    "exp_avg",
    "exp_avg_sq",
    "steps",
    "min_losses",
    "pending_sum",
    "pending_count",
)
_LOW_PRECISION: Final = (torch.float16, torch.bfloat16)


class _WeightedLoss(torch.autograd.Function):
    """Value: the published objective. Gradient with respect to the losses: the weights ``w``.

    Both come from one closed-form computation, so autograd records a single node instead of the
    log/softmax graph of the published code.
    """

    @staticmethod
    def forward(ctx: Any, losses: Tensor, objective: Tensor, weights: Tensor) -> Tensor:
        ctx.save_for_backward(weights)
        ctx.losses_dtype = losses.dtype
        return objective

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (weights,) = ctx.saved_tensors
        return (grad * weights).to(ctx.losses_dtype), None, None


class FAMOWeighting(nn.Module):
    r"""Weights k task losses so that all of them fall at about the same relative rate (FAMO).

    Drop it into an existing multi-task loop: call :meth:`backward` (or :meth:`loss`) instead of
    ``losses.sum().backward()``, step the model's optimizer, then call :meth:`update` with the
    losses recomputed on the same batch. FAMO uses only the loss values: one backward pass per
    step, like a summed loss. The object owns its logits and their Adam; its whole state lives in
    buffers, so ``.to()``, ``state_dict()`` and ``torch.save`` just work, and
    ``.parameters()`` is empty (a model optimizer never steps the logits).

    **Model step.** With logits :math:`\xi` (zero at the start), lower bounds :math:`b`
    (``min_losses``) and :math:`\epsilon` (``eps``):

    .. math::
        z = \operatorname{softmax}(\xi), \qquad D_i = \ell_i - b_i + \epsilon, \qquad
        c = \Big(\sum_i \frac{z_i}{D_i}\Big)^{-1}, \qquad
        L = c \sum_i z_i \log D_i,

    with :math:`z` and :math:`c` held constant, so

    .. math::
        \nabla_\theta L = \sum_i w_i \nabla_\theta \ell_i, \qquad
        w_i = \frac{c\, z_i}{D_i} \ge 0, \qquad \sum_i w_i = 1.

    **Logit step** (:meth:`update`, after the optimizer step, with :math:`\ell'` the losses
    recomputed on the same batch):

    .. math::
        \delta_i = \log(\ell_i - b_i + \epsilon) - \log(\ell'_i - b_i + \epsilon), \qquad
        g = z \odot (\delta - \langle z, \delta \rangle),

    then one ``torch.optim.Adam`` step on :math:`\xi` with gradient :math:`g`, learning rate
    ``lr``, coupled weight decay ``gamma`` (:math:`g \leftarrow g + \gamma \xi` before the
    moments), ``betas`` and ``adam_eps``. :math:`g` is :math:`J_{\mathrm{softmax}}(\xi)^\top
    \delta` in closed form: a task that improved less than the :math:`z`-weighted mean gains
    weight.

    :param tasks: the number of tasks k (an ``int`` ≥ 1) or a sequence of k unique task names,
        which lets losses be passed as a mapping from name to loss.
    :param lr: learning rate of the logits' Adam, ≥ 0. Default 0.025 (paper and official code).
    :param gamma: weight decay on the logits, ≥ 0, or ``"paper"`` (1e-3, the default: the paper's
        Algorithm 2, LibMTL, TorchJD) or ``"official"`` (1e-5, the official code's class
        default). The paper's toy uses 0. Whatever ``gamma``, one update moves a logit by at
        most about 7.3 ``lr`` (Adam's bound for the default betas), so the logits stay finite.
        With 0 nothing pulls them back: a task whose weight has collapsed (to ~1e-8, or to
        exactly 0 in float32) gets almost no gradient and can stay collapsed long after its
        loss stops improving; ``gamma`` > 0 decays the logits towards uniform weights.
    :param min_losses: lower bounds :math:`b`: ``None`` (zeros), one number for all tasks, or k
        finite numbers (sequence or tensor). Every loss must stay strictly above its bound.
    :param eps: :math:`\epsilon` inside the logarithm, ≥ 0. Default 1e-8 (official code).
    :param betas: Adam's ``(beta1, beta2)``, each in [0, 1). Default ``(0.9, 0.999)``.
    :param adam_eps: Adam's epsilon, > 0. Default 1e-8 (``torch.optim.Adam``).
    :param validate: check every loss value (finite, above its bound) before using it. The check
        costs one host synchronisation per call; ``False`` removes it (GPU, ``torch.compile``),
        and a bad value then gives NaN weights instead of an error.
    :param extra_forward: ``True`` (the published recipe): :meth:`update` receives losses
        recomputed on the same batch after the step. ``False``: no extra forward pass; each call
        of :meth:`loss`/:meth:`backward` first updates the logits using its losses as the
        "after" losses of the previous step. This approximates :math:`\ell_i(\theta_{t+1};
        B_t)` by :math:`\ell_i(\theta_{t+1}; B_{t+1})`, so batch-to-batch noise enters
        :math:`\delta`; it assumes one :meth:`loss` call per optimizer step.
    :param allow_missing_tasks: let a mapping of losses leave tasks out. The present tasks are
        weighted among themselves; the logit step uses only the tasks present both before and
        after, and the other tasks' logits and Adam moments do not move.
    :param process_group: under ``torch.distributed``, the group whose ranks average their loss
        values so that every rank holds the same logits. ``None``: the default group whenever
        one is initialised; ``False``: never communicate.
    :param device: device of the state (it also follows the losses' device on first use).
    :param dtype: ``torch.float32`` (default) or ``torch.float64``; losses of any floating dtype
        are promoted to it.

    Example:
        >>> import torch
        >>> from famo import FAMOWeighting
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> famo = FAMOWeighting(["seg", "depth"])
        >>> x, y = torch.randn(16, 4), torch.randn(16, 2)
        >>> def compute_losses():
        ...     return ((model(x) - y) ** 2).mean(dim=0)  # one loss per task
        >>> optimizer.zero_grad()
        >>> famo.backward(compute_losses())
        >>> optimizer.step()
        >>> with torch.no_grad():
        ...     famo.update(compute_losses())
        >>> famo.weights.sum().item()
        1.0
        >>> famo
        FAMOWeighting(tasks=('seg', 'depth'), lr=0.025, gamma=0.001, eps=1e-08)

    References:
        Bo Liu, Yihao Feng, Peter Stone, Qiang Liu. *FAMO: Fast Adaptive Multitask
        Optimization*. NeurIPS 2023 (Algorithm 2). Official code:
        https://github.com/Cranial-XIX/FAMO.
    """

    logits: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    steps: Tensor
    min_losses: Tensor
    pending_sum: Tensor
    pending_count: Tensor

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
        names = _check_tasks(tasks)
        num_tasks = len(names) if names is not None else int(tasks)  # type: ignore[arg-type]
        checked_lr = _check_non_negative("lr", lr)
        checked_gamma = _check_gamma(gamma)
        checked_eps = _check_non_negative("eps", eps)
        checked_betas = _check_betas(betas)
        checked_adam_eps = _check_adam_eps(adam_eps)
        for flag, value in (
            ("validate", validate),
            ("extra_forward", extra_forward),
            ("allow_missing_tasks", allow_missing_tasks),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"`{flag}` should be True or False. Found {value!r}.")
        if not (process_group is None or process_group is False or is_process_group(process_group)):
            raise TypeError(
                "`process_group` should be None (the default group when one is initialised), "
                f"False (no communication) or a torch.distributed ProcessGroup. Found "
                f"{process_group!r}."
            )
        state_dtype = _check_dtype(dtype)
        for name, number in (("lr", checked_lr), ("gamma", checked_gamma), ("eps", checked_eps)):
            _check_representable(name, number, state_dtype)
        bounds = _check_min_losses(min_losses, num_tasks)
        _check_representable("min_losses", float(bounds.abs().max()), state_dtype)

        super().__init__()
        self.task_names: tuple[str, ...] | None = names
        self.num_tasks: int = num_tasks
        self.lr = checked_lr
        self.gamma = checked_gamma
        self.eps = checked_eps
        self.betas = checked_betas
        self.adam_eps = checked_adam_eps
        self.validate = validate
        self.extra_forward = extra_forward
        self.allow_missing_tasks = allow_missing_tasks
        self.process_group = process_group
        for name in _STATE_BUFFERS:
            self.register_buffer(name, torch.zeros(num_tasks, device=device, dtype=state_dtype))
        self.min_losses.copy_(bounds)
        self._pending = False

    # ------------------------------------------------------------------ public API

    @property
    def weights(self) -> Tensor:
        r"""The current task weights :math:`z = \operatorname{softmax}(\xi)`, detached, shape (k,).

        These weight the tasks' *log* losses; the weights on the raw losses' gradients are
        :math:`w_i = c z_i / D_i` (see the class docstring).

        >>> FAMOWeighting(4).weights
        tensor([0.2500, 0.2500, 0.2500, 0.2500])
        """
        return torch.softmax(self.logits.detach(), dim=0)

    def loss(self, losses: Tensor | Sequence[Tensor] | Mapping[str, Tensor]) -> Tensor:
        r"""The scalar to backpropagate instead of ``losses.sum()``; records the losses.

        Returns :math:`L = c \sum_i z_i \log(\ell_i - b_i + \epsilon)` with :math:`z, c`
        constant, so its gradient with respect to :math:`\ell` is the convex combination
        :math:`w` (see the class docstring). Use it where your code calls ``.backward()`` itself
        (``GradScaler``, Lightning, Accelerate). Several calls before one :meth:`update`
        (gradient accumulation) record the mean of their losses.

        :param losses: the k task losses, with autograd history: a 1-D tensor, a sequence of
            scalar tensors, or a mapping from task name to scalar tensor (in any order).
        :raises TypeError: ``losses`` is not one of those forms or not floating point.
        :raises ValueError: wrong count, shape or names; with ``validate=True`` also a loss that
            is not finite or not above its bound.
        :raises RuntimeError: the losses do not require grad.

        >>> famo = FAMOWeighting(2, dtype=torch.float64)
        >>> losses = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> objective = famo.loss(losses)
        >>> objective.backward()
        >>> losses.grad  # w: a convex combination, more weight on the smaller loss
        tensor([0.6667, 0.3333], dtype=torch.float64)
        """
        batch = self._read(losses, "losses", for_backward=True)
        values, mask = self._combine(
            batch, "losses", accumulate=self.extra_forward and self._pending
        )
        with torch.no_grad():
            if not self.extra_forward and self._pending:
                self._learn(values, mask, skip=None)
            weights, objective = self._weights_and_objective(values, mask)
            self._record(values, mask)
        if batch.present is not None:
            weights = torch.stack([weights[task] for task in batch.present])  # no index tensor
        result: Tensor = _WeightedLoss.apply(batch.values, objective, weights)  # type: ignore[no-untyped-call]
        return result

    def backward(
        self, losses: Tensor | Sequence[Tensor] | Mapping[str, Tensor], **kwargs: Any
    ) -> None:
        """Drop-in for ``losses.sum().backward(**kwargs)``; runs ``self.loss(losses).backward()``.

        :param losses: as in :meth:`loss`.
        :param kwargs: passed to :meth:`torch.Tensor.backward` (``retain_graph``, ``inputs``, …).

        If the backward pass itself raises (out of memory, a freed graph), this call records
        nothing, so the step can be retried, for example on a smaller batch.

        >>> famo = FAMOWeighting(3)
        >>> head = torch.nn.Linear(2, 3)
        >>> famo.backward(head(torch.ones(1, 2)).squeeze(0).exp())
        >>> head.weight.grad.shape
        torch.Size([3, 2])
        """
        # Copies only under gradient accumulation: otherwise nothing was recorded before.
        recorded = (self.pending_sum.clone(), self.pending_count.clone()) if self._pending else None
        objective = self.loss(losses)
        try:
            objective.backward(**kwargs)  # type: ignore[no-untyped-call]
        except BaseException:
            # The backward pass failed (out of memory, a freed graph, a hook), so no optimizer
            # step follows: forget what this call recorded, so that a retry is not averaged with
            # it. (With extra_forward=False the logit step from the previous batch stands.)
            if self.extra_forward and recorded is not None:
                self.pending_sum.copy_(recorded[0])
                self.pending_count.copy_(recorded[1])
            else:
                self._clear_pending()
            raise

    def update(
        self,
        new_losses: Tensor | Sequence[Tensor | float] | Mapping[str, Tensor | float],
        *,
        skip: bool | Tensor = False,
    ) -> None:
        r"""One Adam step on the logits from how much each loss fell since :meth:`loss`.

        Call it after the model optimizer's step, with the losses recomputed on the same batch
        (no grad needed). Computes :math:`\delta`, :math:`g = z \odot (\delta - \langle z,
        \delta\rangle)` and the Adam step of the class docstring, then forgets the recorded
        losses.

        :param new_losses: the k losses after the step, in any form :meth:`loss` accepts (plain
            numbers allowed), or a 2-D tensor of shape (micro_batches, k) whose rows are averaged
            (gradient accumulation). Values on another device than the state are moved to it.
        :param skip: ``True`` when the optimizer step did not happen (for example
            ``GradScaler`` found inf/NaN gradients): the recorded losses are dropped and the
            logits do not move. A 0-dim bool tensor does the same without a host sync.
        :raises RuntimeError: no losses were recorded since the last update, or the object was
            created with ``extra_forward=False`` (it updates itself).
        :raises TypeError, ValueError: as in :meth:`loss`.

        >>> famo = FAMOWeighting(2, gamma=0.0)
        >>> _ = famo.loss(torch.tensor([1.0, 1.0], requires_grad=True))
        >>> famo.update([0.5, 0.9])  # task 1 improved less, so it gains weight
        >>> famo.weights
        tensor([0.4875, 0.5125])
        """
        if not self.extra_forward:
            raise RuntimeError(
                "`update` should not be called on a FAMOWeighting created with "
                "extra_forward=False: it learns from the next batch's losses inside `loss` and "
                "`backward`. Call only `backward` (or `loss`) once per step."
            )
        if not self._pending:
            raise RuntimeError(
                "`update` was called with no losses recorded. Call `backward(losses)` or "
                "`loss(losses)` before the optimizer step, then `update(new_losses)` once after "
                "it; `update` consumes the recorded losses."
            )
        skip_mask = _check_skip(skip)
        batch = self._read(new_losses, "new_losses", for_backward=False)
        values, mask = self._combine(batch, "new_losses", follow=False)
        with torch.no_grad():
            if skip is True:
                self._clear_pending()
            else:
                if skip_mask is not None:
                    skip_mask = skip_mask.to(values.device)
                self._learn(values, mask, skip_mask)

    def discard(self) -> None:
        """Forget the recorded losses without learning from them (the step did not happen).

        >>> famo = FAMOWeighting(2)
        >>> _ = famo.loss(torch.tensor([1.0, 2.0], requires_grad=True))
        >>> famo.discard()
        >>> famo.update([1.0, 2.0])
        Traceback (most recent call last):
        ...
        RuntimeError: `update` was called with no losses recorded. ...
        """
        self._clear_pending()

    def reset(self) -> None:
        """Back to the start: zero logits (uniform weights), fresh Adam, nothing recorded.

        Hyper-parameters and ``min_losses`` are kept.

        >>> famo = FAMOWeighting(2)
        >>> _ = famo.logits.fill_(3.0)
        >>> famo.reset()
        >>> famo.weights
        tensor([0.5000, 0.5000])
        """
        with torch.no_grad():
            for name in _STATE_BUFFERS:
                if name != "min_losses":
                    getattr(self, name).zero_()
        self._pending = False

    # ------------------------------------------------------------------ checkpoints

    def get_extra_state(self) -> dict[str, Any]:
        """The non-tensor part of :meth:`state_dict`: format version, tasks, hyper-parameters.

        ``state_dict()`` holds the buffers ``logits``, ``exp_avg``, ``exp_avg_sq``, ``steps``
        (Adam's moments and per-task step counts), ``min_losses``, ``pending_sum`` and
        ``pending_count`` (the recorded losses), plus this dict under ``_extra_state``. All of it
        loads with ``torch.load(..., weights_only=True)``; ``load_state_dict`` checks the whole
        checkpoint (tasks, format version, shapes, finite and representable values) before it
        copies anything, and restores the hyper-parameters, as ``torch.optim`` does.

        >>> import io
        >>> famo = FAMOWeighting(["seg", "depth"])
        >>> famo.backward(torch.tensor([1.0, 2.0], requires_grad=True))  # losses now pending
        >>> buffer = io.BytesIO()
        >>> torch.save(famo.state_dict(), buffer)
        >>> _ = buffer.seek(0)
        >>> restored = FAMOWeighting(["seg", "depth"])
        >>> restored.load_state_dict(torch.load(buffer, weights_only=True))
        <All keys matched successfully>
        >>> restored.update([0.5, 1.5])  # the pending losses came along
        >>> famo.get_extra_state()["format_version"]
        1
        """
        return {
            "format_version": FORMAT_VERSION,
            "tasks": self._tasks_record(),
            "lr": self.lr,
            "gamma": self.gamma,
            "eps": self.eps,
            "betas": list(self.betas),
            "adam_eps": self.adam_eps,
            "extra_forward": self.extra_forward,
            "allow_missing_tasks": self.allow_missing_tasks,
            "pending": self._pending,
        }

    def set_extra_state(self, state: Any) -> None:
        """Restore what :meth:`get_extra_state` wrote (after checking it)."""
        self._check_extra_state(state)
        self.lr = float(state["lr"])
        self.gamma = float(state["gamma"])
        self.eps = float(state["eps"])
        self.betas = (float(state["betas"][0]), float(state["betas"][1]))
        self.adam_eps = float(state["adam_eps"])
        self.extra_forward = bool(state["extra_forward"])
        self.allow_missing_tasks = bool(state["allow_missing_tasks"])
        self._pending = bool(state["pending"])

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
        # Check everything first: torch would copy the buffers before it sees a bad extra state,
        # leaving a half-loaded object behind.
        ours = [key for key in state_dict if key.startswith(prefix)]
        if not ours and not strict:
            return
        extra_key = prefix + "_extra_state"
        if extra_key not in state_dict:
            raise ValueError(
                "The checkpoint should hold a FAMOWeighting state (with its `_extra_state`). "
                f"Found no {extra_key!r} among {len(ours)} keys under prefix {prefix!r}."
            )
        self._check_extra_state(state_dict[extra_key])
        for name in _STATE_BUFFERS:
            value = state_dict.get(prefix + name)
            if not isinstance(value, Tensor) or value.shape != (self.num_tasks,):
                found = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"The checkpoint's `{name}` should be a tensor of shape ({self.num_tasks},). "
                    f"Found {found}."
                )
            dtype = getattr(self, name).dtype  # a float64 checkpoint may not fit float32 state
            if not torch.isfinite(value.to(dtype)).all():
                raise ValueError(
                    f"The checkpoint's `{name}` should be finite in {dtype}. It is not."
                )
        for name in ("exp_avg_sq", "steps", "pending_count"):
            if bool((state_dict[prefix + name] < 0).any()):
                raise ValueError(f"The checkpoint's `{name}` should be ≥ 0. It is not.")
        extra = state_dict[extra_key]
        recorded = state_dict[prefix + "pending_count"] > 0
        if extra["pending"]:
            consistent = bool(recorded.all() or (extra["allow_missing_tasks"] and recorded.any()))
        else:
            consistent = not bool(recorded.any() or state_dict[prefix + "pending_sum"].any())
        if not consistent:
            raise ValueError(
                "The checkpoint's recorded losses (`pending_sum`, `pending_count`) do not match "
                f"its `pending` flag ({extra['pending']}): it was not written by FAMOWeighting."
            )
        if strict:  # torch reports unexpected keys only after copying the buffers
            known = {prefix + name for name in _STATE_BUFFERS} | {extra_key}
            unexpected = [key for key in ours if key not in known]
            if unexpected:
                raise ValueError(
                    f"The checkpoint has keys that no FAMOWeighting state holds: {unexpected}. "
                    "Is it from another model, or saved from a different object?"
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _tasks_record(self) -> list[str] | int:
        """How a checkpoint names the tasks: their names, or their number."""
        return list(self.task_names) if self.task_names is not None else self.num_tasks

    def _check_extra_state(self, state: Any) -> None:
        if not isinstance(state, Mapping) or "format_version" not in state:
            raise ValueError(
                "The checkpoint's FAMOWeighting metadata should be a dict with a "
                f"`format_version`. Found {type(state).__name__}."
            )
        version = state["format_version"]
        if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise ValueError(
                f"The checkpoint has FAMOWeighting format version {version!r}; this famo reads "
                f"versions 1 to {FORMAT_VERSION}. Upgrade famo to load it."
            )
        mine = self._tasks_record()
        if state.get("tasks") != mine:
            raise ValueError(
                f"The checkpoint is for tasks {state.get('tasks')!r}, but this FAMOWeighting has "
                f"tasks {mine!r}. Create it with the same tasks (names and order) to load it."
            )
        required = (
            "lr",
            "gamma",
            "eps",
            "betas",
            "adam_eps",
            "extra_forward",
            "allow_missing_tasks",
            "pending",
        )
        missing = [key for key in required if key not in state]
        if missing:
            raise ValueError(f"The checkpoint's FAMOWeighting metadata lacks {missing}.")
        # Check the values too: torch copies the buffers before `set_extra_state` runs.
        try:
            for key in ("lr", "gamma", "eps"):
                _check_non_negative(key, state[key])
            _check_adam_eps(state["adam_eps"])
            _check_betas(state["betas"])
            for key in ("extra_forward", "allow_missing_tasks", "pending"):
                if not isinstance(state[key], bool):
                    raise TypeError(f"`{key}` should be True or False. Found {state[key]!r}.")
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"The checkpoint's FAMOWeighting metadata is invalid: {error}"
            ) from None

    def _apply(self, fn: Any, recurse: bool = True) -> FAMOWeighting:
        # model.half() / .to(torch.bfloat16) on a model holding this object must not round the
        # logits and Adam moments to 16 bits: keep the precision, follow only the device.
        before = dict(self._buffers)
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        for name, buffer in self._buffers.items():
            old = before.get(name)
            if buffer is not None and old is not None and buffer.dtype in _LOW_PRECISION:
                self._buffers[name] = old.to(device=buffer.device)
        # float64 → float32 (model.float()) must not round state beyond float32's range to inf.
        overflowed = {
            name: buffer.dtype
            for name, buffer in self._buffers.items()
            if buffer is not None
            and (old := before.get(name)) is not None
            and buffer.dtype != old.dtype
            and not bool(torch.isfinite(buffer).all())
        }
        if overflowed:
            target = next(iter(overflowed.values()))
            self._buffers.update(before)
            names = ", ".join(f"`{name}`" for name in overflowed)
            raise ValueError(
                f"FAMO's state ({names}) holds values beyond the range of {target}, so the "
                f"conversion was undone and the state stays {self.logits.dtype}. Call `update` "
                f"or `discard` first, or keep the state in {self.logits.dtype}."
            )
        return self

    def extra_repr(self) -> str:
        tasks = self.task_names if self.task_names is not None else self.num_tasks
        text = f"tasks={tasks!r}, lr={self.lr}, gamma={self.gamma}, eps={self.eps}"
        if self.betas != (0.9, 0.999) or self.adam_eps != 1e-8:
            text += f", betas={self.betas}, adam_eps={self.adam_eps}"
        if not self.extra_forward:
            text += ", extra_forward=False"
        if self.allow_missing_tasks:
            text += ", allow_missing_tasks=True"
        if not self.validate:
            text += ", validate=False"
        return text

    # ------------------------------------------------------------------ internals

    def _read(self, losses: Any, param: str, *, for_backward: bool) -> LossVector:
        batch = read_losses(
            losses,
            param=param,
            num_tasks=self.num_tasks,
            names=self.task_names,
            allow_missing=self.allow_missing_tasks,
            allow_rows=not for_backward,
            allow_numbers=not for_backward,
        )
        if for_backward and not torch.is_grad_enabled():
            raise RuntimeError(
                "`loss` and `backward` should run with autograd enabled: FAMO's loss is "
                "backpropagated into the model. Found them called inside torch.no_grad() or "
                "torch.inference_mode(). Call them outside that block; only `update` (with the "
                "losses recomputed after the step) belongs under no_grad."
            )
        if for_backward and not batch.values.requires_grad:
            raise RuntimeError(
                "`losses` should require grad: FAMO's loss is backpropagated into the model. "
                "Found losses without autograd history. Was the forward pass run under "
                "torch.no_grad() or torch.inference_mode(), were the losses detached "
                "(.detach(), .item()), or are all the model's parameters frozen "
                "(requires_grad=False)? Losses recomputed after the step go to `update`."
            )
        return batch

    def _combine(
        self, batch: LossVector, param: str, *, accumulate: bool = False, follow: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """Checked loss values in the state's dtype and device, averaged over ranks.

        ``accumulate``: the values will be added to the recorded losses (their sum is checked).
        ``follow``: the state moves to the values' device (``loss``: the losses live with the
        model); otherwise the values move to the state's (``update``: plain numbers, CPU values).

        Returns a (k,) vector and, where tasks may be missing, the mask of present tasks
        (its other entries are meaningless).
        """
        given = batch.values.detach()
        if not follow and given.device != self.logits.device:
            given = given.to(self.logits.device)
        values = given.to(self.logits.dtype) if given.dtype != self.logits.dtype else given
        present = batch.present
        if self.validate:
            if values.device.type == "meta":
                raise ValueError(
                    f"`{param}` are on the meta device, which holds no values to check. Create "
                    "FAMOWeighting(..., validate=False) to run on meta tensors."
                )
            bounds = self.min_losses if present is None else self.min_losses[list(present)]
            bounds = bounds.to(values.device)
            # One host sync checks everything the math needs in the state's dtype: a finite
            # loss − bound + eps above 0 and, where losses accumulate, a finite running sum.
            good = torch.isfinite(values - bounds + self.eps) & (values > bounds)
            recorded = None
            if accumulate:
                recorded = self.pending_sum if present is None else self.pending_sum[list(present)]
                recorded = recorded.to(values.device)
                good &= torch.isfinite(recorded + values)
            if not bool(good.all()):
                raise ValueError(
                    describe_bad_values(
                        given, values, bounds, self.eps, recorded, present, param, self.task_names
                    )
                )
        if self.logits.device != values.device:
            self.to(values.device)  # the state follows the losses (a copy, nothing changes)
        group = active_group(self.process_group)
        if not self.allow_missing_tasks:
            if group is not None:
                values = all_reduce_sum_(values.clone(), group).div_(world_size(group))
            return values, None
        k = self.num_tasks
        packed = values.new_zeros(2, k)
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

    def _weights_and_objective(self, values: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        logits = self.logits if mask is None else self.logits.masked_fill(~mask, -math.inf)
        shifted = torch.sub(values, self.min_losses).add_(self.eps)
        if mask is not None:
            shifted = torch.where(mask, shifted, 1.0)
        log_shifted = shifted.log()
        # w = c z / D = softmax(ξ − log D): in log space, z / D cannot overflow when D is tiny
        # (eps = 0, a loss at 1e-40). And w_i D_i = c z_i, so L = Σ w_i D_i log D_i.
        weights = torch.softmax(torch.sub(logits, log_shifted), dim=0)
        objective = torch.dot(shifted.mul_(weights), log_shifted)
        return weights, objective

    def _record(self, values: Tensor, mask: Tensor | None) -> None:
        if mask is None:
            self.pending_sum.add_(values)
            self.pending_count.add_(1.0)
        else:
            self.pending_sum.add_(torch.where(mask, values, 0.0))
            self.pending_count.add_(mask.to(self.pending_count.dtype))
        self._pending = True

    def _clear_pending(self) -> None:
        self.pending_sum.zero_()
        self.pending_count.zero_()
        self._pending = False

    def _learn(self, after: Tensor, after_mask: Tensor | None, skip: Tensor | None) -> None:
        """The logit step from the recorded losses to ``after``; then forget the recorded ones."""
        bounds, eps = self.min_losses, self.eps
        # δ = log(before − b + ε) − log(after − b + ε), in place on temporaries (a hot path).
        delta = torch.div(self.pending_sum, self.pending_count).sub_(bounds).add_(eps).log_()
        delta.sub_(torch.sub(after, bounds).add_(eps).log_())
        mask = after_mask
        if self.allow_missing_tasks:
            both = self.pending_count > 0
            mask = both if mask is None else mask & both
        if skip is not None:
            mask = ~skip if mask is None else mask & ~skip
        if mask is None:
            z = torch.softmax(self.logits, dim=0)
        else:
            delta = torch.where(mask, delta, 0.0)
            z = torch.softmax(self.logits.masked_fill(~mask, -math.inf), dim=0)
            z = torch.where(mask, z, 0.0)  # also clears the NaN of a softmax over no task
        # Any shift of δ leaves g unchanged; centring on one entry makes tied improvements give
        # exactly g = 0 (instead of rounding noise that Adam would blow up to a step of ~lr).
        delta = delta - delta[0]
        grad = delta.sub_(torch.dot(z, delta)).mul_(z)
        self._adam_step(grad, mask)
        self._clear_pending()

    def _adam_step(self, grad: Tensor, mask: Tensor | None) -> None:
        """``torch.optim.Adam`` (coupled weight decay), with a step count per task.

        Only the tasks in ``mask`` (all when None) move. Without a mask the buffers are updated
        in place; the arithmetic is the same either way.
        """
        beta1, beta2 = self.betas
        if mask is None:
            steps, exp_avg, exp_avg_sq = self.steps, self.exp_avg, self.exp_avg_sq
            steps.add_(1.0)
        else:
            steps, exp_avg, exp_avg_sq = (
                self.steps + 1.0,
                self.exp_avg.clone(),
                self.exp_avg_sq.clone(),
            )
        if self.gamma != 0.0:
            grad = grad.add_(self.logits, alpha=self.gamma)
        exp_avg.lerp_(grad, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        # Without a mask every task has taken the same number of steps: one entry will do.
        count = steps[:1] if mask is None else steps
        bias_correction1 = torch.pow(beta1, count).neg_().add_(1.0)
        bias_correction2_sqrt = torch.pow(beta2, count).neg_().add_(1.0).sqrt_()
        denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(self.adam_eps)
        step = bias_correction1.reciprocal_().mul_(self.lr).mul(exp_avg).div_(denom)
        if mask is None:
            self.logits.sub_(step)
            return
        logits = self.logits - step
        for buffer, new in (
            (self.steps, steps),
            (self.exp_avg, exp_avg),
            (self.exp_avg_sq, exp_avg_sq),
            (self.logits, logits),
        ):
            buffer.copy_(torch.where(mask, new, buffer))


# ---------------------------------------------------------------------- constructor checks


def _check_tasks(tasks: Any) -> tuple[str, ...] | None:
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
        if not isinstance(name, str) or not name:
            raise TypeError(f"`tasks` should hold non-empty strings. Found {name!r}.")
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"`tasks` should be unique names. Found {duplicates} more than once.")
    return names


def _check_non_negative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` should be a number. Found {value!r}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` should be a finite number ≥ 0. Found `{name} = {value}`.")
    return float(value)


def _check_adam_eps(adam_eps: Any) -> float:
    checked = _check_non_negative("adam_eps", adam_eps)
    if checked == 0.0:
        raise ValueError(
            "`adam_eps` should be > 0: with 0, a step whose gradient is zero divides 0 by 0 "
            "and turns the logits into NaN. Found `adam_eps = 0.0`."
        )
    return checked


def _check_gamma(gamma: Any) -> float:
    if isinstance(gamma, str):
        if gamma not in GAMMA_PRESETS:
            raise ValueError(
                f"`gamma` should be a number ≥ 0 or one of {sorted(GAMMA_PRESETS)}. "
                f"Found {gamma!r}."
            )
        return GAMMA_PRESETS[gamma]
    return _check_non_negative("gamma", gamma)


def _check_betas(betas: Any) -> tuple[float, float]:
    if not isinstance(betas, Sequence) or len(betas) != 2:
        raise TypeError(f"`betas` should be a pair (beta1, beta2). Found {betas!r}.")
    checked = tuple(_check_non_negative("betas", beta) for beta in betas)
    if any(beta >= 1.0 for beta in checked):
        raise ValueError(f"`betas` should each be in [0, 1). Found {tuple(betas)}.")
    return checked[0], checked[1]


def _check_dtype(dtype: Any) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(
            "`dtype` should be torch.float32 or torch.float64 (FAMO's own math never runs in 16 "
            f"bits; losses of any floating dtype are promoted). Found {dtype}."
        )
    return dtype  # type: ignore[no-any-return]


def _check_min_losses(min_losses: Any, num_tasks: int) -> Tensor:
    # On the CPU whatever the default device (`with torch.device("meta"):` included): these are
    # checked here in Python, then copied into the state's buffers.
    if min_losses is None:
        return torch.zeros(num_tasks, dtype=torch.float64, device="cpu")
    if isinstance(min_losses, bool):
        raise TypeError(f"`min_losses` should be numbers. Found {min_losses!r}.")
    if isinstance(min_losses, (int, float)):
        bounds = torch.full((num_tasks,), float(min_losses), dtype=torch.float64, device="cpu")
    else:
        if isinstance(min_losses, Tensor):
            min_losses = min_losses.detach()  # a bound is a constant, never part of a graph
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
    return bounds


def _check_representable(name: str, value: float, dtype: torch.dtype) -> None:
    if value > torch.finfo(dtype).max:
        raise ValueError(
            f"`{name}` should be representable in the state's dtype {dtype} (at most "
            f"{torch.finfo(dtype).max:.3g}). Found {value!r}; pass dtype=torch.float64."
        )


def _check_skip(skip: Any) -> Tensor | None:
    if isinstance(skip, bool):
        return None
    if isinstance(skip, Tensor) and skip.numel() == 1 and skip.dtype == torch.bool:
        return skip.reshape(())
    raise TypeError(f"`skip` should be a bool or a one-element bool tensor. Found {skip!r}.")
