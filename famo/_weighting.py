"""FAMOWeighting: the object a multi-task training loop uses instead of ``losses.sum()``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from famo import _checkpoint, _steps
from famo import functional as F
from famo._attach import Attachment
from famo._distributed import Group
from famo._losses import LossVector, average_over_ranks, check_values, read_losses
from famo._settings import (
    DEFAULTS,
    Setting,
    check_min_losses,
    check_options,
    check_representable,
    check_skip,
    check_tasks,
    describe,
    param_docs,
)

Losses = Tensor | Sequence[Tensor] | Mapping[str, Tensor]


class FAMOWeighting(nn.Module):
    r"""Weights k task losses so that all of them fall at about the same relative rate (FAMO).

    Drop it into an existing multi-task loop: call :meth:`backward` (or :meth:`loss`) instead of
    ``losses.sum().backward()``, step the model's optimizer, then call :meth:`update` with the
    losses recomputed on the same batch (or let :meth:`attach` and ``extra_forward=False`` do
    that bookkeeping). FAMO uses only the loss values: one backward pass per step, like a summed
    loss. The object owns its logits and their Adam; ``.parameters()`` is empty (a model
    optimizer never steps the logits), and its whole state is registered buffers, so ``.to()``,
    ``state_dict()`` and every tool that handles a module's buffers handle it.

    **Model step.** With logits :math:`\xi` (zero at the start), lower bounds :math:`b`
    (``min_losses``) and :math:`\epsilon` (``eps``):

    .. math::
        z = \operatorname{softmax}(\xi), \qquad D_i = \ell_i - b_i + \epsilon, \qquad
        w_i = \frac{z_i / D_i}{\sum_j z_j / D_j} \ge 0, \qquad \sum_i w_i = 1,

    and the model is trained on :math:`\sum_i w_i \ell_i` with :math:`w` held constant: its
    gradient is :math:`\sum_i w_i \nabla_\theta \ell_i`, exactly the gradient of the published
    objective :math:`L = c \sum_i z_i \log D_i`, :math:`c = (\sum_j z_j / D_j)^{-1}`.

    **Logit step** (after the optimizer step, with :math:`\ell'` the losses recomputed on the
    same batch):

    .. math::
        \delta_i = \log(\ell_i - b_i + \epsilon) - \log(\ell'_i - b_i + \epsilon), \qquad
        g = z \odot (\delta - \langle z, \delta \rangle),

    then one ``torch.optim.Adam`` step on :math:`\xi` with gradient :math:`g`. A task that
    improved less than the :math:`z`-weighted mean gains weight. With ``warmup_steps`` and
    ``update_every``, the first learning steps only consume their losses, and later ones take
    one Adam step per block, from the block's mean :math:`\bar\delta`.

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

    # Every buffer holds a tensor (nn.Module allows None): the layout of famo._checkpoint.
    _buffers: dict[str, Tensor]  # type: ignore[assignment]

    lr = Setting[float]()
    gamma = Setting[float]()
    eps = Setting[float]()
    betas = Setting[tuple[float, float]]()
    adam_eps = Setting[float]()
    warmup_steps = Setting[int]()
    update_every = Setting[int]()
    validate = Setting[bool]()
    extra_forward = Setting[bool]()
    allow_missing_tasks = Setting[bool]()
    process_group = Setting[Any]()

    def __init__(
        self,
        tasks: int | Sequence[str],
        *,
        lr: float = DEFAULTS["lr"],
        gamma: float | str = DEFAULTS["gamma"],
        min_losses: float | Sequence[float] | Tensor | None = DEFAULTS["min_losses"],
        eps: float = DEFAULTS["eps"],
        betas: tuple[float, float] = DEFAULTS["betas"],
        adam_eps: float = DEFAULTS["adam_eps"],
        warmup_steps: int = DEFAULTS["warmup_steps"],
        update_every: int = DEFAULTS["update_every"],
        validate: bool = DEFAULTS["validate"],
        extra_forward: bool = DEFAULTS["extra_forward"],
        allow_missing_tasks: bool = DEFAULTS["allow_missing_tasks"],
        process_group: Any = DEFAULTS["process_group"],
        device: torch.device | str | None = DEFAULTS["device"],
        dtype: torch.dtype | None = DEFAULTS["dtype"],
    ) -> None:
        given = locals()
        names = check_tasks(tasks)
        num_tasks = len(names) if names is not None else int(tasks)  # type: ignore[arg-type]
        checked = check_options(given, num_tasks)
        bounds = checked.pop("min_losses")
        state_device, state_dtype = checked.pop("device"), checked.pop("dtype")
        for name in ("lr", "gamma", "eps"):
            check_representable(name, checked[name], state_dtype)
        check_representable("min_losses", float(bounds.abs().max()), state_dtype)
        super().__init__()
        self._settings = checked
        self._task_names, self._num_tasks = names, num_tasks
        self._initial_min_losses = bounds  # float64 on the CPU: what reset_parameters restores
        self._group = Group(process_group)
        self._attachment: Attachment | None = None
        self._adam = self._build_adam()
        self._offset_key: tuple[Any, ...] | None = None
        self._offset = torch.empty(0)
        self._window = _steps.Window()
        # The common call's path: all tasks, no schedule, the published recipe (see _steps).
        self._fast = (
            not checked["allow_missing_tasks"]
            and checked["warmup_steps"] == 0
            and checked["update_every"] == 1
        )
        self._fused_key: tuple[Any, ...] = ()
        self._fused_now = False
        initial = _checkpoint.initial(
            num_tasks,
            names,
            bounds,
            per_task_steps=allow_missing_tasks,
            device=state_device,
            dtype=state_dtype,
        )
        for key, tensor in initial.items():
            self.register_buffer(key, tensor)
        if process_group is False:  # one state per rank: see _steps._check_own_state
            canary = torch.tensor(self._group.rank(), device=state_device)
            self.register_buffer("rank_canary", canary, persistent=False)
        self._state_replaced()

    __init__.__doc__ = (
        "Create the object; every option below is keyword-only.\n\n"
        ":param tasks: the number of tasks k (an ``int`` ≥ 1) or a sequence of k unique task "
        "names, which lets losses be passed as a mapping from name to loss.\n" + param_docs()
    )

    # ------------------------------------------------------------------ views of the state

    @property
    def task_names(self) -> tuple[str, ...] | None:
        """The task names given to the constructor, or None when it was given a count."""
        return self._task_names

    @property
    def num_tasks(self) -> int:
        return self._num_tasks

    @property
    def weights(self) -> Tensor:
        r"""The task weights :math:`z = \operatorname{softmax}(\xi)`, detached, shape (k,).

        These weight the tasks' *log* losses; the weights on the raw losses' gradients are
        :math:`w_i = c z_i / D_i` (:func:`famo.functional.loss_weights`).

        >>> FAMOWeighting(4).weights
        tensor([0.2500, 0.2500, 0.2500, 0.2500])
        """
        return torch.softmax(self._buffers["logits"].detach(), dim=0)

    def weights_dict(self, prefix: str = "famo/", *, as_floats: bool = False) -> dict[str, Any]:
        """The weights :math:`z` as named scalars for a logger: ``{prefix + task: weight}``.

        Tasks are named by their names, or by their index. The values are 0-dim tensors (no
        host sync, as Lightning's loggers accept), or Python floats with ``as_floats=True``.

        >>> FAMOWeighting(["seg", "depth"]).weights_dict(as_floats=True)
        {'famo/seg': 0.5, 'famo/depth': 0.5}
        """
        weights = self.weights
        names = self._task_names or [str(i) for i in range(self._num_tasks)]
        values: Sequence[Any] = weights.tolist() if as_floats else weights.unbind()
        return {prefix + name: value for name, value in zip(names, values, strict=True)}

    @property
    def min_losses(self) -> Tensor:
        """The lower bounds :math:`b`, shape (k,), in the state's dtype (a copy). Assignable.

        ``famo.min_losses = b`` takes a number, k numbers, a tensor or ``None`` (zeros), checked
        as the constructor checks it; from the next call the object behaves exactly as if it had
        been built with ``b``. Refused while losses are recorded and waiting (:attr:`pending`),
        since their log-distances used the old bounds.

        >>> famo = FAMOWeighting(2)
        >>> famo.min_losses = [0.0, -1.0]
        >>> famo.min_losses
        tensor([ 0., -1.])
        """
        return self._buffers["lower_bounds"].to(self._buffers["logits"].dtype, copy=True)

    @min_losses.setter
    def min_losses(self, value: Any) -> None:
        bounds = check_min_losses("min_losses", value, self._num_tasks)
        check_representable("min_losses", float(bounds.abs().max()), self._buffers["logits"].dtype)
        if self.pending:
            raise RuntimeError(
                "`min_losses` cannot change while losses are recorded and waiting for a logit "
                "step: their log-distances used the old bounds. Call `update` (or `discard`) "
                "first, then assign the new bounds."
            )
        device = self._buffers["logits"].device
        self._buffers["lower_bounds"] = bounds.to(device, _checkpoint.bounds_dtype(device))
        self._initial_min_losses = bounds

    @property
    def steps(self) -> Tensor:
        """Adam's step count per task, shape (k,), in the state's dtype (a copy)."""
        steps = self._buffers["adam_step"].to(self._buffers["logits"].dtype)
        return steps.expand(self._num_tasks).clone() if steps.dim() == 0 else steps.clone()

    @property
    def pending(self) -> bool:
        """Whether losses are recorded and waiting for a logit step (or :meth:`discard`)."""
        if not F.is_compiling():
            _steps.sync(self)
        return self._window.pending

    @property
    def pending_sum(self) -> Tensor:
        """The sum of the losses recorded since the last logit step, shape (k,) (a copy)."""
        return self._buffers["window_sum"].clone()

    @property
    def pending_count(self) -> Tensor:
        """How many losses were recorded since the last logit step, per task (a copy)."""
        return self._buffers["window_count"].clone()

    def reset(self) -> None:
        """Back to the start: zero logits (uniform weights), fresh Adam, nothing recorded, no
        schedule progress. The options and the bounds are kept.

        >>> famo = FAMOWeighting(2)
        >>> _ = famo.logits.fill_(3.0)
        >>> famo.reset()
        >>> famo.weights
        tensor([0.5000, 0.5000])
        """
        fresh = _checkpoint.initial(
            self._num_tasks,
            self._task_names,
            self._buffers["lower_bounds"],
            per_task_steps=self.allow_missing_tasks,
            device=self._buffers["logits"].device,
            dtype=self._buffers["logits"].dtype,
        )
        self._buffers.update(fresh)
        self._state_replaced()

    def reset_parameters(self) -> None:
        """The constructor's state, bounds included (after ``to_empty``, for deferred init).

        >>> with torch.device("meta"):
        ...     famo = FAMOWeighting(2, min_losses=[0.0, -1.0])
        >>> _ = famo.to_empty(device="cpu")
        >>> famo.reset_parameters()
        >>> famo.min_losses, famo.logits
        (tensor([ 0., -1.]), tensor([0., 0.]))
        """
        device = self._buffers["logits"].device
        bounds = self._initial_min_losses.to(device, _checkpoint.bounds_dtype(device))
        self._buffers["lower_bounds"] = bounds
        self.reset()

    # ------------------------------------------------------------------ the training calls

    def loss(self, losses: Losses) -> Tensor:
        r"""The scalar to backpropagate instead of ``losses.sum()``; records the losses.

        Returns :math:`\sum_i w_i \ell_i`: a convex combination of the task losses (in their
        units, falling as they fall), whose gradient with respect to :math:`\ell` is :math:`w`.
        Use it where your code calls ``.backward()`` itself (``GradScaler``, Lightning,
        Accelerate, the Hugging Face ``Trainer``). Several calls before a logit step (gradient
        accumulation) record the mean of their losses.

        Whether a call trains is decided by grad mode, as autograd decides it: under
        ``torch.no_grad()`` or ``torch.inference_mode()`` it records nothing, talks to no other
        rank and changes nothing (the value for a validation batch); ``.eval()`` changes
        nothing. A call that autograd replays during backward (activation checkpointing)
        records once, not twice.

        :param losses: the k task losses: a 1-D tensor, a sequence of scalar tensors, or a
            mapping from task name to scalar tensor (in any order).
        :raises TypeError: ``losses`` is not one of those forms or not floating point.
        :raises ValueError: wrong count, shape or names; with ``validate=True`` also a loss that
            is not finite or with :math:`\ell - b + \epsilon \le 0`.
        :raises RuntimeError: under grad, but the losses do not require grad.

        >>> famo = FAMOWeighting(2, dtype=torch.float64)
        >>> losses = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> objective = famo.loss(losses)
        >>> objective.backward()
        >>> losses.grad  # w: a convex combination, more weight on the smaller loss
        tensor([0.6667, 0.3333], dtype=torch.float64)
        >>> objective
        tensor(1.3333, dtype=torch.float64, grad_fn=<DotBackward0>)
        """
        if self._fast and isinstance(losses, Tensor) and torch.is_grad_enabled():
            objective = _steps.fast_loss(self, losses)
            if objective is not None:
                return objective
        record = torch.is_grad_enabled() and not _steps.replaying()
        batch = self._read(losses, "losses", for_backward=record)
        if self._fast and record and batch.present is None and batch.values is not losses:
            objective = _steps.fast_loss(self, batch.values)  # a list or mapping, stacked
            if objective is not None:
                return objective
        if not record or (batch.values.is_meta and not self._buffers["logits"].is_meta):
            return self._evaluate(batch)  # (meta losses trace shapes: computed on copies)
        compiling = F.is_compiling()
        if not compiling:
            _steps.sync(self)
        values, mask = self._values(batch, follow=True)
        log_d = F.log_distance(values, _steps.offset(self), mask)
        window = self._window
        if self._settings["extra_forward"]:
            learn = False
        elif compiling:
            learn = True  # decided by tensors below
        else:
            learn = window.pending and (self._attachment is None or window.stepped)
        if self._settings["validate"]:
            accumulate = not learn and window.pending
            self._check(batch, values, log_d, "losses", accumulate=accumulate)
        if learn:
            self._learn(log_d, mask, None, in_loss=True, values=values)
        logits = _steps.minus_infinity_outside(self._buffers["logits"], mask)
        weights = F.weights_from_log_distance(logits, log_d)
        if not (learn and compiling):
            _steps.record(self, values, log_d, mask)
        return self._objective(batch, weights)

    def backward(self, losses: Losses, **kwargs: Any) -> None:
        """Drop-in for ``losses.sum().backward(**kwargs)``; runs ``self.loss(losses).backward()``.

        If the backward pass itself raises (out of memory, a freed graph), this call records
        nothing, so the step can be retried.

        :param losses: as in :meth:`loss`.
        :param kwargs: passed to :meth:`torch.Tensor.backward` (``retain_graph``, ``inputs``, …).

        >>> famo = FAMOWeighting(3)
        >>> head = torch.nn.Linear(2, 3)
        >>> famo.backward(head(torch.ones(1, 2)).squeeze(0).exp())
        >>> head.weight.grad.shape
        torch.Size([3, 2])
        """
        if not torch.is_grad_enabled():
            raise RuntimeError(
                "`backward` should run with autograd enabled: FAMO's loss is backpropagated "
                "into the model. Found it called inside torch.no_grad() or "
                "torch.inference_mode(). Call it outside that block; only `update` (with the "
                "losses recomputed after the step) belongs under no_grad."
            )
        window, buffers = self._window, self._buffers
        learns = False  # whether this call takes the pending logit step (extra_forward=False)
        if not self._settings["extra_forward"]:
            _steps.sync(self)
            learns = window.pending and (self._attachment is None or window.stepped)
        before = {"window_sum": buffers["window_sum"], "window_count": buffers["window_count"]}
        objective = self.loss(losses)
        try:
            objective.backward(**kwargs)  # type: ignore[no-untyped-call]
        except BaseException:
            # No optimizer step follows a failed backward pass: forget what this call recorded,
            # so that a retry is not averaged with it. (A logit step it took stands.)
            if learns:
                _steps.clear(self)
            else:
                self._buffers.update(before)
                window.derive(self._buffers)
            raise

    def update(self, new_losses: Any, *, skip: bool | Tensor = False) -> None:
        r"""The logit step from how much each loss fell since :meth:`loss` (a learning step).

        Call it after the model optimizer's step, with the losses recomputed on the same batch
        (no grad needed). Computes :math:`\delta`, :math:`g` and the Adam step of the class
        docstring (or, with ``warmup_steps``/``update_every``, counts this learning step in the
        schedule), then forgets the recorded losses. After :meth:`attach`, a call that follows
        no real optimizer step (a ``GradScaler`` skip, an accumulation micro-step) drops the
        recorded losses instead, as ``skip=True`` does.

        :param new_losses: the k losses after the step, in any form :meth:`loss` accepts (plain
            numbers allowed), or a 2-D tensor of shape (micro_batches, k) whose rows are averaged
            (gradient accumulation). Values on another device than the state are moved to it.
        :param skip: ``True`` when the optimizer step did not happen: the recorded losses are
            dropped and nothing else changes. A 0-dim bool tensor does the same without a host
            sync.
        :raises RuntimeError: no losses were recorded since the last update, or the object was
            created with ``extra_forward=False`` (it learns inside :meth:`loss`).
        :raises TypeError, ValueError: as in :meth:`loss`; a rejected call changes nothing and
            keeps the recorded losses (call :meth:`discard` to drop them).

        >>> famo = FAMOWeighting(2, gamma=0.0)
        >>> _ = famo.loss(torch.tensor([1.0, 1.0], requires_grad=True))
        >>> famo.update([0.5, 0.9])  # task 1 improved less, so it gains weight
        >>> famo.weights
        tensor([0.4875, 0.5125])
        """
        fast = self._fast and skip is False and isinstance(new_losses, Tensor)
        if fast and _steps.fast_update(self, new_losses):
            return
        if not self._settings["extra_forward"]:
            raise RuntimeError(
                "`update` should not be called on a FAMOWeighting created with "
                "extra_forward=False: it learns from the next batch's losses inside `loss` and "
                "`backward`. Call only `backward` (or `loss`) once per step."
            )
        if not self.pending:
            raise RuntimeError(
                "`update` was called with no losses recorded. Call `backward(losses)` or "
                "`loss(losses)` before the optimizer step, then `update(new_losses)` once after "
                "it; `update` consumes the recorded losses."
            )
        skip_tensor = check_skip(skip)
        batch = self._read(new_losses, "new_losses", for_backward=False)
        fast = self._fast and skip is False and batch.present is None
        if fast and batch.values is not new_losses and _steps.fast_update(self, batch.values):
            return  # a list or mapping, stacked
        if skip is True or (self._attachment is not None and not self._window.stepped):
            _steps.clear(self)  # the step did not happen: nothing to learn from
            return
        values, mask = self._values(batch, follow=False)
        after = F.log_distance(values, _steps.offset(self), mask)
        if self._settings["validate"]:
            self._check(batch, values, after, "new_losses", accumulate=False)
        go = None if skip_tensor is None else ~skip_tensor.to(after.device)
        self._learn(after, mask, go)

    def discard(self) -> None:
        """Forget the recorded losses without learning from them (the step did not happen).

        >>> famo = FAMOWeighting(2)
        >>> _ = famo.loss(torch.tensor([1.0, 2.0], requires_grad=True))
        >>> famo.discard()
        >>> famo.pending
        False
        """
        _steps.clear(self)

    def attach(self, optimizer: torch.optim.Optimizer) -> Attachment:
        """Learn on the optimizer's real steps, through ``register_step_post_hook``.

        An optimizer step that does not happen does not call the hook: a ``GradScaler`` that
        finds inf/NaN gradients skips ``optimizer.step()``, and so does Accelerate on an
        accumulation micro-step. So, once attached:

        * with ``extra_forward=False``, all :meth:`loss` calls between two real steps form one
          window, whose losses are averaged (gradient accumulation; a skipped step just extends
          the window); the first :meth:`loss` call after a real step takes the logit step from
          the window's mean to its own losses, then opens the next window. The integration is
          ``return famo.loss(losses)``: no :meth:`update`, no ``skip``, no :meth:`discard`.
        * with ``extra_forward=True``, :meth:`update` is still called after ``optimizer.step()``
          with the recomputed losses; if no real step happened since the losses were recorded,
          it drops them instead of learning.

        Wrappers that hold the real optimizer as ``.optimizer`` (Accelerate's
        ``AcceleratedOptimizer``, Lightning's) are unwrapped. Whether a real step followed the
        recorded losses is part of the checkpoint; the hook is not.

        :returns: a handle whose ``remove()`` detaches (also a context manager that detaches on
            exit).
        :raises RuntimeError: already attached.

        >>> model = torch.nn.Linear(3, 2)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> famo = FAMOWeighting(2, extra_forward=False)
        >>> with famo.attach(optimizer):
        ...     for _ in range(3):
        ...         optimizer.zero_grad()
        ...         famo.loss(model(torch.ones(4, 3)).pow(2).mean(0) + 1).backward()
        ...         optimizer.step()
        >>> famo.steps  # two logit steps: the third waits for the next batch's losses
        tensor([2., 2.])
        """
        if self._attachment is not None:
            raise RuntimeError(
                "This FAMOWeighting is already attached to an optimizer. Call `remove()` on the "
                "handle that `attach` returned before attaching it again."
            )
        self._attachment = Attachment(optimizer, self)
        return self._attachment

    # ------------------------------------------------------------------ the calls' steps

    def _learn(
        self,
        after: Tensor,
        mask: Tensor | None,
        go: Tensor | None,
        *,
        in_loss: bool = False,
        values: Tensor | None = None,
    ) -> None:
        adam = self._adam
        settings = self._settings
        simple = settings["warmup_steps"] == 0 and settings["update_every"] == 1
        fast = go is None and mask is None and simple and not self.allow_missing_tasks
        if fast and not F.is_compiling():
            return _steps.learn(self, after, adam)
        if in_loss and F.is_compiling():
            ready = _steps.ready_tensor(self)
            go = ready if go is None else go & ready
            _steps.learn_scheduled(self, after, mask, go, adam)
            assert values is not None
            return _steps.consume_if(self, ready, values, mask)
        _steps.learn_scheduled(self, after, mask, go, adam)
        _steps.clear(self)
        return None

    def _evaluate(self, batch: LossVector) -> Tensor:
        """The weighted value of local losses, changing nothing (a validation batch)."""
        values, mask = self._values(batch, follow=None)
        logits = self._buffers["logits"]
        offset = _steps.offset(self)
        if values.device != logits.device:
            logits, offset = logits.to(values.device), offset.to(values.device)
        log_d = F.log_distance(values, offset, mask)
        if self._settings["validate"]:
            self._check(batch, values, log_d, "losses", accumulate=False, local=True)
        weights = F.weights_from_log_distance(_steps.minus_infinity_outside(logits, mask), log_d)
        return self._objective(batch, weights)

    @staticmethod
    def _objective(batch: LossVector, weights: Tensor) -> Tensor:
        if batch.present is not None:
            weights = torch.stack([weights[task] for task in batch.present])  # no index tensor
        given = batch.values
        return torch.dot(
            given if given.dtype == weights.dtype else given.to(weights.dtype), weights
        )

    def _read(self, losses: Any, param: str, *, for_backward: bool) -> LossVector:
        batch = read_losses(
            losses,
            param=param,
            num_tasks=self._num_tasks,
            names=self._task_names,
            allow_missing=self._settings["allow_missing_tasks"],
            allow_rows=param == "new_losses",
            allow_numbers=param == "new_losses",
        )
        if for_backward and not batch.values.requires_grad:
            raise RuntimeError(
                "`losses` should require grad: FAMO's loss is backpropagated into the model. "
                "Found losses without autograd history. Was the forward pass run under "
                "torch.no_grad() or torch.inference_mode(), were the losses detached (.detach(), "
                ".item()), or are all the model's parameters frozen (requires_grad=False)? "
                "Losses recomputed after the step go to `update`; for a validation batch, call "
                "`loss` under torch.no_grad()."
            )
        return batch

    def _values(self, batch: LossVector, *, follow: bool | None) -> tuple[Tensor, Tensor | None]:
        """The loss values in the state's dtype and device; averaged over ranks when recording.

        ``follow``: the state moves to the values' device (a recording ``loss``: the losses live
        with the model); ``False``: the values move to the state's (``update``); ``None``:
        nothing moves and no rank is asked (evaluation; the values stay where they are).
        """
        given = batch.values
        if given.requires_grad:
            given = given.data  # read only, never written: no autograd node, no ATen op
        state = self._buffers["logits"]
        if given.device != state.device and follow is not None:
            if follow:
                self.to(given.device)  # the state follows the losses (a copy, nothing changes)
            elif given.device.type == "meta":
                raise ValueError(
                    "`new_losses` are on the meta device, which holds no values, but FAMO's "
                    f"state is on {state.device}. Pass the losses recomputed after the step."
                )
            else:
                given = given.to(state.device)
        if given.dtype != state.dtype:
            given = given.to(state.dtype)
        group = self._group.active() if follow is not None else None
        return average_over_ranks(
            given,
            batch.present,
            group,
            self._group.size,
            num_tasks=self._num_tasks,
            masked=self._settings["allow_missing_tasks"],
        )

    def _check_fast(
        self, values: Tensor, log_d: Tensor, *, accumulate: bool = False, param: str = "losses"
    ) -> None:
        self._check(LossVector(values, None), values, log_d, param, accumulate=accumulate)

    def _check(
        self,
        batch: LossVector,
        values: Tensor,
        log_d: Tensor,
        param: str,
        *,
        accumulate: bool,
        local: bool = False,
    ) -> None:
        buffers = self._buffers
        check_values(
            batch,
            values,
            log_d,
            offset=_steps.offset(self).to(values.device),
            bounds=buffers["lower_bounds"].to(values.device),
            recorded=buffers["window_sum"] if accumulate else None,
            param=param,
            eps=self.eps,
            names=self._task_names,
            across_ranks=not local and self._group.active() is not None,
        )

    def _fused(self, device: torch.device, compiling: bool | None = None) -> bool:
        """:func:`famo.functional.use_fused_adam`, asked again only when its inputs change."""
        if F.is_compiling() if compiling is None else compiling:
            return False
        key = (device, torch.get_num_threads())
        if key != self._fused_key:
            self._fused_now, self._fused_key = F.use_fused_adam(device), key
        return self._fused_now

    def _build_adam(self) -> dict[str, Any]:
        """The logits' Adam settings as :func:`famo.functional.adam_step_` takes them."""
        settings = self._settings
        self._adam = {
            "lr": settings["lr"],
            "gamma": settings["gamma"],
            "betas": settings["betas"],
            "eps": settings["adam_eps"],
        }
        return self._adam

    def _setting_changed(self, name: str, value: Any) -> None:
        if name in ("lr", "gamma", "eps"):
            check_representable(name, value, self._buffers["logits"].dtype)
        self._settings[name] = value
        self._adam = self._build_adam()

    def _state_replaced(self, *, derive: bool = True) -> None:
        """The buffers were set by famo (construction, a load, a move): facts and constants."""
        logits = self._buffers["logits"]
        self._constants = {
            "zero_sum": torch.zeros_like(logits),
            "zero_count": torch.zeros_like(logits),
            "one": torch.ones_like(logits),
            "false": torch.zeros((), dtype=torch.uint8, device=logits.device),
            "true": torch.ones((), dtype=torch.uint8, device=logits.device),
        }
        self._offset_key = None
        window = self._window
        window.version_seen = self._buffers["format_version"]._version
        if derive:
            window.derive(self._buffers)
        else:  # the same values, moved: the facts hold, but not a log-distance computed before
            window.lone_log = None
            window.note(self._buffers)

    # ------------------------------------------------------------------ what torch asks of a module

    def extra_repr(self) -> str:
        tasks = self._task_names if self._task_names is not None else self._num_tasks
        return ", ".join([f"tasks={tasks!r}", *describe(self._settings)])

    def __getstate__(self) -> dict[str, Any]:
        # A copy (deepcopy for an EMA model, pickling) is not attached to the optimizer.
        state = dict(super().__getstate__())  # type: ignore[no-untyped-call]
        state["_attachment"] = None
        return state

    def _apply(self, fn: Any, recurse: bool = True) -> FAMOWeighting:
        """``.to()``, ``.double()``, ``to_empty()``: see :func:`famo._checkpoint.convert`."""
        known = self._window.current(self._buffers)  # or replaced by a tool since famo's call
        self._buffers.update(_checkpoint.convert(self._buffers, fn))
        self._state_replaced(derive=not known)
        return self

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        _checkpoint.save(self._buffers, destination, prefix, keep_vars)

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
        assign = bool(local_metadata.get("assign_to_params_buffers", False))
        _checkpoint.load(
            self, state_dict, prefix, assign, missing_keys, unexpected_keys, error_msgs
        )
