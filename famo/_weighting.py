"""FAMOWeighting: the bookkeeping around FAMO's arithmetic (:mod:`famo._functional`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import torch
from torch import Tensor, nn

from famo import _checkpoint, _functional
from famo._distributed import active_group, all_reduce_sum_, is_process_group, world_size
from famo._losses import LossVector, describe_bad_values, read_losses
from famo._settings import (
    HYPERPARAMETERS,
    Setting,
    check,
    check_dtype,
    check_flag,
    check_min_losses,
    check_representable,
    check_skip,
    check_tasks,
    describe,
)

Losses = Tensor | Sequence[Tensor] | Mapping[str, Tensor]
_LOW_PRECISION: Final = (torch.float16, torch.bfloat16)
# The tensors of the state, as attributes (not buffers: DDP would broadcast buffers from rank 0
# over each rank's own state, and a checkpoint needs a layout of its own anyway).
_STATE: Final = ("_logits", "_exp_avg", "_exp_avg_sq", "_min_losses", "_offset", "_step")
_RECORDED: Final = ("sum", "count", "log")
_PUBLIC_NAMES: Final = {"_recorded.sum": "pending_sum", "_recorded.log": "pending_sum"}


class FAMOWeighting(nn.Module):
    r"""Weights k task losses so that all of them fall at about the same relative rate (FAMO).

    Drop it into an existing multi-task loop: call :meth:`backward` (or :meth:`loss`) instead of
    ``losses.sum().backward()``, step the model's optimizer, then call :meth:`update` with the
    losses recomputed on the same batch (or let :meth:`attach` and ``extra_forward=False`` do
    that bookkeeping). FAMO uses only the loss values: one backward pass per step, like a summed
    loss. The object owns its logits and their Adam; ``.parameters()`` is empty (a model
    optimizer never steps the logits), ``.to()`` moves the state, and ``state_dict()`` holds it
    as tensors only.

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

    then one ``torch.optim.Adam`` step on :math:`\xi` with gradient :math:`g`, learning rate
    ``lr``, coupled weight decay ``gamma``, ``betas`` and ``adam_eps``. A task that improved
    less than the :math:`z`-weighted mean gains weight.

    :param tasks: the number of tasks k (an ``int`` ≥ 1) or a sequence of k unique task names,
        which lets losses be passed as a mapping from name to loss.
    :param lr: learning rate of the logits' Adam, ≥ 0. Default 0.025 (paper and official code).
    :param gamma: weight decay on the logits, ≥ 0, or ``"paper"`` (1e-3, the default: the paper's
        Algorithm 2, LibMTL, TorchJD) or ``"official"`` (1e-5, the official code's class
        default). One update moves a logit by at most about 7.3 ``lr`` (Adam's bound for the
        default betas), so the logits stay finite; with 0 nothing pulls them back, and a task
        whose weight collapsed can stay collapsed long after its loss stops improving.
    :param min_losses: lower bounds :math:`b`: ``None`` (zeros), one number for all tasks, or k
        finite numbers (sequence or tensor). A loss is usable while
        :math:`\ell - b + \epsilon > 0`.
    :param eps: :math:`\epsilon` inside the logarithm, ≥ 0. Default 1e-8 (official code).
    :param betas: Adam's ``(beta1, beta2)``, each in [0, 1). Default ``(0.9, 0.999)``.
    :param adam_eps: Adam's epsilon, > 0. Default 1e-8 (``torch.optim.Adam``).
    :param validate: check every loss value (finite, :math:`\ell - b + \epsilon > 0`) before
        using it. The check costs one host synchronisation per call; ``False`` removes it (GPU,
        ``torch.compile``), and a bad value then gives NaN weights instead of an error.
    :param extra_forward: ``True`` (the published recipe): :meth:`update` receives losses
        recomputed on the same batch after the step. ``False``: no extra forward pass; a
        :meth:`loss` call that follows an optimizer step first takes the logit step, using its
        own losses as the "after" losses of the previous step (:math:`\ell(\theta_{t+1};
        B_{t+1})` stands in for :math:`\ell(\theta_{t+1}; B_t)`, so batch-to-batch noise enters
        :math:`\delta`). Unattached, every :meth:`loss` call ends a step; after :meth:`attach`,
        the optimizer's real steps do.
    :param allow_missing_tasks: let a mapping of losses leave tasks out. The present tasks are
        weighted among themselves; the logit step uses only the tasks present both before and
        after, and the other tasks' logits, Adam moments and step counts do not move.
    :param process_group: under ``torch.distributed``, the group whose ranks average their loss
        values so that every rank holds the same logits, and raises the same errors. ``None``:
        the default group whenever one is initialised; ``False``: never communicate (each rank
        keeps its own state, also inside ``DistributedDataParallel``).
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

    _recorded: _Recorded

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
        self._task_names = names
        self._num_tasks = num_tasks
        self._validate = validate
        self._extra_forward = extra_forward
        self._allow_missing_tasks = allow_missing_tasks
        self._process_group = process_group
        self._initial_min_losses = bounds  # float64 on the CPU: what reset_parameters restores
        self._exact_min_losses = bounds  # float64: the bounds survive .float() then .double()
        self._attachment: Attachment | None = None
        state_device = torch.empty(0, device=device).device  # honours `with torch.device(...)`
        self._fused = _functional.fused_adam_available(state_device)
        self._logits = torch.zeros(num_tasks, device=state_device, dtype=state_dtype)
        self._exp_avg = torch.zeros_like(self._logits)
        self._exp_avg_sq = torch.zeros_like(self._logits)
        self._step = self._zero_step()
        self._min_losses = bounds.to(state_device, state_dtype)
        self._offset = self._offset_from(self._min_losses)
        self._recorded = _Recorded()

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
        return self._logits

    @property
    def exp_avg(self) -> Tensor:
        """Adam's first moment of the logits, shape (k,)."""
        return self._exp_avg

    @property
    def exp_avg_sq(self) -> Tensor:
        """Adam's second moment of the logits, shape (k,)."""
        return self._exp_avg_sq

    @property
    def min_losses(self) -> Tensor:
        """The lower bounds :math:`b`, shape (k,), in the state's dtype."""
        return self._min_losses

    @property
    def steps(self) -> Tensor:
        """Adam's step count per task, shape (k,), in the state's dtype (a copy)."""
        step = self._step.to(self._logits.dtype)
        return step.expand(self._num_tasks).clone() if step.dim() == 0 else step.clone()

    @property
    def pending(self) -> bool:
        """Whether losses are recorded and waiting for a logit step (or :meth:`discard`)."""
        return self._recorded.sum is not None

    @property
    def pending_sum(self) -> Tensor:
        """The sum of the losses recorded since the last logit step, shape (k,) (a copy)."""
        if self._recorded.sum is None:
            return torch.zeros_like(self._logits)
        return self._recorded.sum.clone()

    @property
    def pending_count(self) -> Tensor:
        """How many losses were recorded since the last logit step, per task, shape (k,)."""
        count = self._recorded.count
        if isinstance(count, Tensor):
            return count.clone()
        return torch.full_like(self._logits, float(count))

    @property
    def weights(self) -> Tensor:
        r"""The current task weights :math:`z = \operatorname{softmax}(\xi)`, detached, shape (k,).

        These weight the tasks' *log* losses; the weights on the raw losses' gradients are
        :math:`w_i = c z_i / D_i` (see the class docstring).

        >>> FAMOWeighting(4).weights
        tensor([0.2500, 0.2500, 0.2500, 0.2500])
        """
        return torch.softmax(self._logits.detach(), dim=0)

    def weights_dict(self, prefix: str = "famo/", *, as_floats: bool = False) -> dict[str, Any]:
        """The weights :math:`z` as named scalars, for a logger: ``{prefix + task: weight}``.

        Tasks are named by their names, or by their index when the object was given a count.
        By default the values are 0-dim tensors (no host sync, as loggers such as Lightning's
        accept); ``as_floats=True`` returns Python floats (one sync).

        >>> FAMOWeighting(["seg", "depth"]).weights_dict(as_floats=True)
        {'famo/seg': 0.5, 'famo/depth': 0.5}
        """
        weights = self.weights
        names = self._task_names or [str(i) for i in range(self._num_tasks)]
        values: Sequence[Any] = weights.tolist() if as_floats else weights.unbind()
        return {prefix + name: value for name, value in zip(names, values, strict=True)}

    # ------------------------------------------------------------------ the training calls

    def loss(self, losses: Losses) -> Tensor:
        r"""The scalar to backpropagate instead of ``losses.sum()``; records the losses.

        Returns :math:`\sum_i w_i \ell_i`: a convex combination of the task losses (in their
        units, falling as they fall), whose gradient with respect to :math:`\ell` is :math:`w`.
        Use it where your code calls ``.backward()`` itself (``GradScaler``, Lightning,
        Accelerate, the Hugging Face ``Trainer``). Several calls before a logit step (gradient
        accumulation) record the mean of their losses.

        Called under ``torch.no_grad()``/``torch.inference_mode()`` or while this module is in
        eval mode (``model.eval()``), it records nothing: the value for a validation batch, with
        no effect on training.

        :param losses: the k task losses: a 1-D tensor, a sequence of scalar tensors, or a
            mapping from task name to scalar tensor (in any order).
        :raises TypeError: ``losses`` is not one of those forms or not floating point.
        :raises ValueError: wrong count, shape or names; with ``validate=True`` also a loss that
            is not finite or with :math:`\ell - b + \epsilon \le 0`.
        :raises RuntimeError: training, but the losses do not require grad.

        >>> famo = FAMOWeighting(2, dtype=torch.float64)
        >>> losses = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> objective = famo.loss(losses)
        >>> objective.backward()
        >>> losses.grad  # w: a convex combination, more weight on the smaller loss
        tensor([0.6667, 0.3333], dtype=torch.float64)
        >>> objective
        tensor(1.3333, dtype=torch.float64, grad_fn=<DotBackward0>)
        """
        return self._loss(losses, record=self.training and torch.is_grad_enabled())

    def backward(self, losses: Losses, **kwargs: Any) -> None:
        """Drop-in for ``losses.sum().backward(**kwargs)``; runs ``self.loss(losses).backward()``.

        Records the losses whatever the module's mode. If the backward pass itself raises (out
        of memory, a freed graph), this call records nothing, so the step can be retried.

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
        window = None if self._ready_to_learn() else self._recorded.fields()  # for a retry
        objective = self._loss(losses, record=True)
        try:
            objective.backward(**kwargs)  # type: ignore[no-untyped-call]
        except BaseException:
            # No optimizer step follows a failed backward pass: forget what this call recorded,
            # so a retry is not averaged with it. (A logit step it took stands.)
            if window is not None:
                self._recorded.restore(window)
            else:
                self._clear_window()
            raise

    def update(self, new_losses: Any, *, skip: bool | Tensor = False) -> None:
        r"""One Adam step on the logits from how much each loss fell since :meth:`loss`.

        Call it after the model optimizer's step, with the losses recomputed on the same batch
        (no grad needed). Computes :math:`\delta`, :math:`g` and the Adam step of the class
        docstring, then forgets the recorded losses. After :meth:`attach`, a call that follows
        no real optimizer step (a ``GradScaler`` skip, an accumulation micro-step) drops the
        recorded losses instead, as ``skip=True`` does.

        :param new_losses: the k losses after the step, in any form :meth:`loss` accepts (plain
            numbers allowed), or a 2-D tensor of shape (micro_batches, k) whose rows are averaged
            (gradient accumulation). Values on another device than the state are moved to it.
        :param skip: ``True`` when the optimizer step did not happen: the recorded losses are
            dropped and the logits do not move. A 0-dim bool tensor does the same without a host
            sync.
        :raises RuntimeError: no losses were recorded since the last update, or the object was
            created with ``extra_forward=False`` (it updates itself).
        :raises TypeError, ValueError: as in :meth:`loss`; a rejected call changes nothing and
            keeps the recorded losses (call :meth:`discard` to drop them).

        >>> famo = FAMOWeighting(2, gamma=0.0)
        >>> _ = famo.loss(torch.tensor([1.0, 1.0], requires_grad=True))
        >>> famo.update([0.5, 0.9])  # task 1 improved less, so it gains weight
        >>> famo.weights
        tensor([0.4875, 0.5125])
        """
        if not self._extra_forward:
            raise RuntimeError(
                "`update` should not be called on a FAMOWeighting created with "
                "extra_forward=False: it learns from the next batch's losses inside `loss` and "
                "`backward`. Call only `backward` (or `loss`) once per step."
            )
        if self._recorded.sum is None:
            raise RuntimeError(
                "`update` was called with no losses recorded. Call `backward(losses)` or "
                "`loss(losses)` before the optimizer step, then `update(new_losses)` once after "
                "it; `update` consumes the recorded losses."
            )
        skip_tensor = check_skip(skip)
        batch = self._read(new_losses, "new_losses", for_backward=False)
        if skip is True or (self._attachment is not None and not self._recorded.stepped):
            self._clear_window()  # the step did not happen: nothing to learn from
            return
        values, mask = self._values(batch, follow=False)
        with torch.no_grad():
            after = self._log_distance(values, mask, self._offset)
            if self._validate:
                self._check(batch, values, after, mask, "new_losses", accumulate=False)
            if skip_tensor is not None:
                skip_tensor = skip_tensor.to(after.device)
            self._learn(after, mask, skip_tensor)

    def discard(self) -> None:
        """Forget the recorded losses without learning from them (the step did not happen).

        >>> famo = FAMOWeighting(2)
        >>> _ = famo.loss(torch.tensor([1.0, 2.0], requires_grad=True))
        >>> famo.discard()
        >>> famo.pending
        False
        """
        self._clear_window()

    def attach(self, optimizer: torch.optim.Optimizer) -> Attachment:
        """Learn on the optimizer's real steps, through ``register_step_post_hook``.

        An optimizer step that does not happen does not call the hook: a ``GradScaler`` that
        finds inf/NaN gradients skips ``optimizer.step()``, and so does Accelerate on an
        accumulation micro-step. So, once attached:

        * with ``extra_forward=False``, all :meth:`loss` calls between two real steps form one
          window, whose losses are averaged (gradient accumulation; a skipped step just extends
          the window, since the model did not change); the first :meth:`loss` call after a real
          step takes the logit step from the window's mean to its own losses, then opens the
          next window. The integration is ``return famo.loss(losses)``: no :meth:`update`, no
          ``skip``, no :meth:`discard`.
        * with ``extra_forward=True``, :meth:`update` is still called after ``optimizer.step()``
          with the recomputed losses; if no real step happened since the losses were recorded,
          it drops them instead of learning.

        Wrappers that hold the real optimizer as ``.optimizer`` (Accelerate's
        ``AcceleratedOptimizer``, Lightning's) are unwrapped. The hook is not part of the
        checkpoint; whether a real step followed the recorded losses is.

        :returns: a handle whose ``remove()`` detaches (also usable as a context manager).
        :raises RuntimeError: already attached.

        >>> model = torch.nn.Linear(3, 2)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> famo = FAMOWeighting(2, extra_forward=False)
        >>> handle = famo.attach(optimizer)
        >>> for _ in range(3):
        ...     optimizer.zero_grad()
        ...     famo.loss(model(torch.ones(4, 3)).pow(2).mean(0) + 1).backward()
        ...     optimizer.step()
        >>> famo.steps  # two logit steps: the third waits for the next batch's losses
        tensor([2., 2.])
        >>> handle.remove()
        """
        if self._attachment is not None:
            raise RuntimeError(
                "This FAMOWeighting is already attached to an optimizer. Call `remove()` on the "
                "handle that `attach` returned before attaching it again."
            )
        while not hasattr(optimizer, "register_step_post_hook") or isinstance(
            getattr(optimizer, "optimizer", None), torch.optim.Optimizer
        ):
            inner = getattr(optimizer, "optimizer", None)
            if inner is None:
                raise TypeError(
                    "`optimizer` should be a torch.optim.Optimizer (or a wrapper holding one as "
                    f"`.optimizer`). Found {type(optimizer).__name__}."
                )
            optimizer = inner
        self._attachment = Attachment(self, optimizer.register_step_post_hook(self._stepped_hook))
        return self._attachment

    def _stepped_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._recorded.sum is not None:
            self._recorded.stepped = True

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
            for tensor in (self._logits, self._exp_avg, self._exp_avg_sq, self._step):
                tensor.zero_()
        self._clear_window()

    def reset_parameters(self) -> None:
        """The constructor's state, bounds included (after ``to_empty``, for deferred init).

        >>> with torch.device("meta"):
        ...     famo = FAMOWeighting(2, min_losses=[0.0, -1.0])
        >>> _ = famo.to_empty(device="cpu")
        >>> famo.reset_parameters()
        >>> famo.min_losses, famo.logits
        (tensor([ 0., -1.]), tensor([0., 0.]))
        """
        self._set_min_losses(self._initial_min_losses)
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

    # ------------------------------------------------------------------ the calls' steps

    def _loss(self, losses: Losses, *, record: bool) -> Tensor:
        batch = self._read(losses, "losses", for_backward=record)
        # Meta losses (shape tracing) never move a state that holds values: compute on copies.
        scratch = batch.values.device.type == "meta" and self._logits.device.type != "meta"
        values, mask = self._values(batch, follow=None if scratch else True)
        logits, offset = self._logits, self._offset
        if scratch:
            logits, offset, record = logits.to("meta"), offset.to("meta"), False
        with torch.no_grad():
            log_d = self._log_distance(values, mask, offset)
            learn = record and self._ready_to_learn()
            if self._validate:
                accumulate = record and not learn and self._recorded.sum is not None
                self._check(batch, values, log_d, mask, "losses", accumulate=accumulate)
            if learn:
                self._learn(log_d, mask, None)
            if mask is not None:
                logits = logits.masked_fill(~mask, -math.inf)
            weights = _functional.loss_weights(logits, log_d)
            if record:
                self._record(values, log_d, mask)
        if batch.present is not None:
            weights = torch.stack([weights[task] for task in batch.present])  # no index tensor
        given = batch.values
        if given.dtype != weights.dtype:
            given = given.to(weights.dtype)
        return torch.dot(given, weights)

    def _read(self, losses: Any, param: str, *, for_backward: bool) -> LossVector:
        batch = read_losses(
            losses,
            param=param,
            num_tasks=self._num_tasks,
            names=self._task_names,
            allow_missing=self._allow_missing_tasks,
            allow_rows=not for_backward,
            allow_numbers=param == "new_losses",
        )
        if for_backward and not batch.values.requires_grad:
            raise RuntimeError(
                "`losses` should require grad: FAMO's loss is backpropagated into the model. "
                "Found losses without autograd history. Was the forward pass run under "
                "torch.no_grad() or torch.inference_mode(), were the losses detached "
                "(.detach(), .item()), or are all the model's parameters frozen "
                "(requires_grad=False)? Losses recomputed after the step go to `update`; for a "
                "validation batch, call `loss` under torch.no_grad() or in eval mode."
            )
        return batch

    def _values(self, batch: LossVector, *, follow: bool | None) -> tuple[Tensor, Tensor | None]:
        """The loss values in the state's dtype and device, averaged over ranks.

        ``follow``: the state moves to the values' device (``loss``: the losses live with the
        model); ``False``: the values move to the state's (``update``: plain numbers, CPU
        values); ``None``: nothing moves (meta losses, computed on copies). Returns a (k,)
        vector and, with ``allow_missing_tasks``, the mask of the tasks
        present on some rank (the vector holds 0 for the others).
        """
        given = batch.values.detach() if batch.values.requires_grad else batch.values
        state = self._logits
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
        values = given.to(state.dtype) if given.dtype != state.dtype else given
        group = active_group(self._process_group)
        if not self._allow_missing_tasks:
            if group is not None:
                values = all_reduce_sum_(values.clone(), group).div_(world_size(group))
            return values, None
        packed = values.new_zeros(2, self._num_tasks)
        if batch.present is None:
            packed[0] = values
            packed[1] = 1.0
        else:
            # Python indices, not an index tensor: that would be a blocking host→device copy.
            for position, task in enumerate(batch.present):
                packed[0, task] = values[position]
                packed[1, task] = 1.0
        if group is not None:
            all_reduce_sum_(packed, group)
        sums, counts = packed
        return sums / counts.clamp_min(1.0), counts > 0

    @staticmethod
    def _log_distance(values: Tensor, mask: Tensor | None, offset: Tensor) -> Tensor:
        if mask is None:
            return _functional.log_distance(values, offset)
        return torch.where(mask, torch.add(values, offset), 1.0).log_()

    def _check(
        self,
        batch: LossVector,
        values: Tensor,
        log_d: Tensor,
        mask: Tensor | None,
        param: str,
        *,
        accumulate: bool,
    ) -> None:
        """Raise a clear ValueError for a loss FAMO's math cannot use (one host sync)."""
        if values.device.type == "meta":
            raise ValueError(
                f"`{param}` are on the meta device, which holds no values to check. Create "
                "FAMOWeighting(..., validate=False) to run on meta tensors."
            )
        good = torch.isfinite(log_d).all()
        if accumulate:
            assert self._recorded.sum is not None
            good &= torch.isfinite(self._recorded.sum + values).all()
        if bool(good):
            return
        present = batch.present
        across_ranks = active_group(self._process_group) is not None
        index = slice(None) if present is None else list(present)
        message = describe_bad_values(
            values[index] if across_ranks else batch.values.detach(),
            values[index],
            self._offset[index],
            self._min_losses[index],
            self.eps,
            self._recorded.sum[index] if accumulate and self._recorded.sum is not None else None,
            present,
            param,
            self._task_names,
            across_ranks,
        )
        if param == "new_losses":
            message += (
                " The losses recorded for this step are kept: call `discard()` to drop them, "
                "or `update` again with usable values."
            )
        raise ValueError(message)

    def _ready_to_learn(self) -> bool:
        """With ``extra_forward=False``: a ``loss`` call now takes the pending logit step."""
        return (
            not self._extra_forward
            and self._recorded.sum is not None
            and (self._attachment is None or self._recorded.stepped)
        )

    def _record(self, values: Tensor, log_d: Tensor, mask: Tensor | None) -> None:
        # By reference: `values` is a fresh (or detached) tensor that nothing else writes to.
        count: int | Tensor = 1 if mask is None else mask.to(values.dtype)
        if self._recorded.sum is None:
            self._recorded.sum, self._recorded.count = values, count
            self._recorded.log = log_d if mask is None else None
        else:
            self._recorded.sum = self._recorded.sum + values
            self._recorded.count = self._recorded.count + count
            self._recorded.log = None

    def _learn(self, after: Tensor, after_mask: Tensor | None, skip: Tensor | None) -> None:
        """The logit step from the recorded losses to ``after`` (log D); then forget them."""
        window_sum, count, before = self._recorded.sum, self._recorded.count, self._recorded.log
        assert window_sum is not None
        settings = self._settings
        adam = {
            "lr": settings["lr"],
            "gamma": settings["gamma"],
            "betas": settings["betas"],
            "eps": settings["adam_eps"],
        }
        if not isinstance(count, Tensor):
            if before is None:  # several calls: log of their mean
                before = torch.add(self._offset, window_sum, alpha=1.0 / count).log_()
            delta = _functional.centred_improvement(before, after)
            grad = _functional.logit_gradient(self._logits, delta)
            _functional.adam_step_(
                self._logits,
                grad,
                self._exp_avg,
                self._exp_avg_sq,
                self._step,
                fused=self._fused,
                skip=skip,
                **adam,
            )
        else:
            recorded = count > 0
            mean = window_sum / count.clamp_min(1.0)
            before = torch.where(recorded, torch.add(mean, self._offset), 1.0).log_()
            mask = recorded if after_mask is None else recorded & after_mask
            grad = _functional.masked_logit_gradient(self._logits, before - after, mask)
            if skip is not None:
                mask = mask & ~skip
            _functional.masked_adam_step_(
                self._logits, grad, self._exp_avg, self._exp_avg_sq, self._step, mask, **adam
            )
        self._clear_window()

    # ------------------------------------------------------------------ small state helpers

    def _clear_window(self) -> None:
        recorded = self._recorded
        recorded.sum, recorded.count, recorded.log, recorded.stepped = None, 0, None, False

    def _zero_step(self) -> Tensor:
        """Adam's step count: one 0-dim count, or one per task when tasks may be missing."""
        logits = self._logits
        if self._allow_missing_tasks:
            return torch.zeros_like(logits)
        dtype = torch.float32 if self._fused else logits.dtype  # the fused kernel's step dtype
        return torch.zeros((), device=logits.device, dtype=dtype)

    def _offset_from(self, min_losses: Tensor) -> Tensor:
        r""":math:`\epsilon - b`, computed once: then :math:`D = \ell + (\epsilon - b)`."""
        return min_losses.neg().add_(self.eps)

    def _set_min_losses(self, exact: Tensor) -> None:
        self._exact_min_losses = exact.detach().to("cpu", torch.float64, copy=True)
        self._min_losses = exact.to(self._logits.device, self._logits.dtype, copy=True)
        self._offset = self._offset_from(self._min_losses)

    def _setting_changed(self, name: str, value: Any) -> None:
        if name in ("lr", "gamma", "eps"):
            check_representable(name, value, self._logits.dtype)
        self._settings[name] = value
        if name == "eps":
            self._offset = self._offset_from(self._min_losses)

    def __getstate__(self) -> dict[str, Any]:
        # A copy (deepcopy for an EMA model, pickling) is not attached to the optimizer.
        state = dict(super().__getstate__())  # type: ignore[no-untyped-call]
        state["_attachment"] = None
        return state

    # ------------------------------------------------------------------ devices and dtypes

    def _apply(self, fn: Any, recurse: bool = True) -> FAMOWeighting:
        """``.to()``, ``.double()``, ``to_empty()``… applied to the state tensors.

        ``.half()``/``.bfloat16()`` on a parent model keep FAMO's precision (only the device
        follows). Converting to float64 takes the bounds from their exact float64 copy.
        Converting float64 to float32 is undone, with an error, where a value would overflow.
        """
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        recorded = self._recorded
        before = {name: getattr(self, name) for name in _STATE}
        before.update({f"_recorded.{name}": getattr(recorded, name) for name in _RECORDED})
        old_dtype = self._logits.dtype
        after: dict[str, Any] = {}
        for name, tensor in before.items():
            if not isinstance(tensor, Tensor):
                after[name] = tensor
                continue
            new = fn(tensor)
            fused_step = name == "_step" and tensor.dim() == 0 and self._fused  # stays float32
            if new.dtype in _LOW_PRECISION or fused_step:
                new = tensor.to(new.device)
            after[name] = new
        new_dtype = after["_logits"].dtype
        if new_dtype != old_dtype:
            overflowed = [
                _PUBLIC_NAMES.get(name, name.lstrip("_"))
                for name, tensor in after.items()
                if isinstance(tensor, Tensor)
                and bool(torch.isfinite(before[name]).all())
                and not bool(torch.isfinite(tensor).all())
            ]
            if overflowed:
                raise ValueError(
                    f"FAMO's state ({', '.join(f'`{n}`' for n in overflowed)}) holds values "
                    f"beyond the range of {new_dtype}, so the conversion was undone and the "
                    f"state stays {old_dtype}. Call `update` or `discard` first, or keep the "
                    f"state in {old_dtype}."
                )
            exact = self._exact_min_losses.to(after["_min_losses"].device, new_dtype)
            after["_min_losses"] = exact
            after["_offset"] = self._offset_from(exact)
        for name, value in after.items():
            if name.startswith("_recorded."):
                setattr(recorded, name.removeprefix("_recorded."), value)
            else:
                setattr(self, name, value)
        self._fused = _functional.fused_adam_available(self._logits.device)
        if self._step.dim() == 0:
            step_dtype = torch.float32 if self._fused else self._logits.dtype
            self._step = self._step.to(step_dtype)
        return self

    # ------------------------------------------------------------------ checkpoints

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        """Write the layout of :mod:`famo._checkpoint`: tensors only, no hyper-parameters."""
        tensors = {
            "logits": self._logits,
            "exp_avg": self._exp_avg,
            "exp_avg_sq": self._exp_avg_sq,
            "steps": self.steps,
            "min_losses": self._min_losses,
            "pending_sum": self.pending_sum,
            "pending_count": self.pending_count,
            "pending_stepped": torch.tensor(self._recorded.stepped),
            "task_names": _checkpoint.encode_task_names(self._task_names),
            "format_version": torch.tensor(_checkpoint.FORMAT_VERSION),
        }
        for key, value in tensors.items():
            destination[prefix + key] = value.detach()

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
            dtype=self._logits.dtype,
        )
        missing_keys.extend(prefix + key for key in found.missing)
        unexpected_keys.extend(prefix + key for key in found.unexpected)
        if found.error is not None:
            error_msgs.append(found.error)
        if found.state is None:
            return
        tensors = found.state.tensors
        if not local_metadata.get("assign_to_params_buffers", False):
            device = self._logits.device
            tensors = {key: value.to(device, copy=True) for key, value in tensors.items()}
        self._logits = tensors["logits"]
        self._exp_avg = tensors["exp_avg"]
        self._exp_avg_sq = tensors["exp_avg_sq"]
        self._set_min_losses(tensors["min_losses"])
        self._fused = _functional.fused_adam_available(self._logits.device)
        steps = tensors["steps"]
        if self._allow_missing_tasks:
            self._step = steps
        else:
            self._step = steps[0].to(torch.float32 if self._fused else steps.dtype).clone()
        self._clear_window()
        counts = tensors["pending_count"]
        if bool((counts > 0).any()):
            self._recorded.sum = tensors["pending_sum"]
            self._recorded.count = counts if self._allow_missing_tasks else int(counts[0].item())
            self._recorded.stepped = found.state.stepped


class _Recorded:
    """What was recorded since the last logit step (a plain object: cheap to update)."""

    def __init__(self) -> None:
        self.sum: Tensor | None = None  # the sum of the recorded losses
        self.count: int | Tensor = 0  # how many calls recorded them (per task, missing tasks)
        self.log: Tensor | None = None  # log(mean - b + eps), where a lone call knows it
        self.stepped = False  # an attached optimizer really stepped since the first of them

    def fields(self) -> tuple[Any, ...]:
        return self.sum, self.count, self.log, self.stepped

    def restore(self, fields: tuple[Any, ...]) -> None:
        self.sum, self.count, self.log, self.stepped = fields


class Attachment:
    """What :meth:`FAMOWeighting.attach` returns: ``remove()`` detaches from the optimizer."""

    def __init__(self, famo: FAMOWeighting, handle: Any) -> None:
        self._famo = famo
        self._handle = handle

    def remove(self) -> None:
        self._handle.remove()
        if self._famo._attachment is self:
            self._famo._attachment = None  # a real step already taken stays recorded

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def find_weighting(module: nn.Module, attribute: str | None, who: str) -> FAMOWeighting:
    """The FAMOWeighting an integration (``who``) drives: ``module.<attribute>``, or the only one.

    :raises ValueError: the attribute is not a FAMOWeighting, or there is not exactly one.
    """
    if attribute is not None:
        found = getattr(module, attribute, None)
        if not isinstance(found, FAMOWeighting):
            raise ValueError(
                f"`weighting` names {attribute!r}, but {type(module).__name__}.{attribute} is "
                f"{type(found).__name__}, not a FAMOWeighting."
            )
        return found
    candidates = [m for m in module.modules() if isinstance(m, FAMOWeighting)]
    if len(candidates) != 1:
        raise ValueError(
            f"{who} should find one FAMOWeighting in {type(module).__name__}. Found "
            f"{len(candidates)}. Assign one as an attribute of the model (self.famo = "
            "FAMOWeighting(...)), so that the model's checkpoints hold its state, or name it "
            f"with {who}(weighting='attribute')."
        )
    return candidates[0]
