"""FAMOWeighting: the object a multi-task training loop uses instead of ``losses.sum()``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar, overload

import torch
from torch import Tensor, nn

from famo import _checkpoint, _layout
from famo._attach import Attachment
from famo._distributed import register_canary
from famo._losses import LossVector, read_losses, require_grad
from famo._settings import (
    BY_NAME,
    DEFAULTS,
    check_min_losses,
    check_options,
    check_representable,
    check_skip,
    check_tasks,
    describe,
    param_docs,
    setting_doc,
)
from famo._state import State, is_compiling

T = TypeVar("T")
Losses = Tensor | Sequence[Tensor] | Mapping[str, Tensor]


class Setting(Generic[T]):
    """An option of the constructor as an attribute (its documentation is the option's own)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.option = BY_NAME[name]
        self.__doc__ = setting_doc(self.option)

    @overload
    def __get__(self, instance: None, owner: type) -> Setting[T]: ...

    @overload
    def __get__(self, instance: object, owner: type) -> T: ...

    def __get__(self, instance: Any, owner: type) -> Any:
        if instance is None:
            return self
        return instance._state.settings[self.option.name]

    def __set__(self, instance: Any, value: Any) -> None:
        option = self.option
        if not option.assignable:
            raise AttributeError(
                f"`{option.name}` is fixed at construction and cannot be assigned. Create a new "
                f"FAMOWeighting(..., {option.name}=...) and load this one's state_dict into it."
            )
        checked = option.check(option.name, value, 0)
        if option.name in ("lr", "gamma", "eps"):
            check_representable(option.name, checked, instance.logits.dtype)
        instance._state.setting_changed(option.name, checked)


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

    # Every buffer holds a tensor (nn.Module allows None): the layout of famo._layout.
    _buffers: dict[str, Tensor]  # type: ignore[assignment]
    _state: State

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
        per_task = checked["allow_missing_tasks"]
        buffers = _layout.initial(num_tasks, names, bounds, per_task, state_device, state_dtype)
        for key, tensor in buffers.items():
            self.register_buffer(key, tensor)
        if process_group is False:
            register_canary(self, state_device)
        self._state = State(self, self._buffers, checked, num_tasks, names, bounds)
        self._state.replaced()

    __init__.__doc__ = (
        "Create the object; every option below is keyword-only.\n\n"
        ":param tasks: the number of tasks k (an ``int`` ≥ 1) or a sequence of k unique task "
        "names, which lets losses be passed as a mapping from name to loss.\n" + param_docs()
    )

    # ------------------------------------------------------------------ views of the state

    @property
    def task_names(self) -> tuple[str, ...] | None:
        """The task names given to the constructor, or None when it was given a count."""
        return self._state.names

    @property
    def num_tasks(self) -> int:
        return self._state.num_tasks

    @property
    def weights(self) -> Tensor:
        r"""The task weights :math:`z = \operatorname{softmax}(\xi)`, detached, shape (k,).

        These weight the tasks' *log* losses; the weights on the raw losses' gradients are
        :math:`w_i = c z_i / D_i` (:func:`famo.functional.loss_weights`).

        >>> FAMOWeighting(4).weights
        tensor([0.2500, 0.2500, 0.2500, 0.2500])
        """
        return torch.softmax(self._state.view("logits").detach(), dim=0)

    def weights_dict(self, prefix: str = "famo/", *, as_floats: bool = False) -> dict[str, Any]:
        """The weights :math:`z` as named scalars for a logger: ``{prefix + task: weight}``.

        Tasks are named by their names, or by their index. The values are 0-dim tensors (no
        host sync, as Lightning's loggers accept), or Python floats with ``as_floats=True``.

        >>> FAMOWeighting(["seg", "depth"]).weights_dict(as_floats=True)
        {'famo/seg': 0.5, 'famo/depth': 0.5}
        """
        return self._named(self.weights, prefix, as_floats)

    @property
    def loss_weights(self) -> Tensor | None:
        r"""The weights applied to each loss at the last recording call, detached, shape (k,).

        :math:`w = \operatorname{softmax}(\xi - \log D)`, what multiplies each loss's gradient
        in :meth:`loss` and :meth:`backward` (:math:`w_i = c\, z_i / D_i`, summing to 1). A
        task with a small loss gets a large :math:`w_i`; :attr:`weights` (:math:`z`) weight the
        *log* losses instead. ``None`` before the first recording call; evaluation calls (under
        ``torch.no_grad()``) do not change it, and it is not part of the checkpoint.

        >>> famo = FAMOWeighting(2)
        >>> famo.loss_weights is None
        True
        >>> _ = famo.loss(torch.tensor([1.0, 3.0], requires_grad=True))
        >>> famo.loss_weights  # the smaller loss gets the larger weight on its gradient
        tensor([0.7500, 0.2500])
        """
        return self._state.applied

    def loss_weights_dict(
        self, prefix: str = "famo/loss_weight/", *, as_floats: bool = False
    ) -> dict[str, Any]:
        """:attr:`loss_weights` as named scalars for a logger: ``{prefix + task: weight}``.

        Empty before the first recording call. Values as in :meth:`weights_dict`.

        >>> famo = FAMOWeighting(["seg", "depth"])
        >>> _ = famo.loss(torch.tensor([1.0, 1.0], requires_grad=True))
        >>> famo.loss_weights_dict(as_floats=True)
        {'famo/loss_weight/seg': 0.5, 'famo/loss_weight/depth': 0.5}
        """
        weights = self._state.applied
        if weights is None:
            return {}
        return self._named(weights, prefix, as_floats)

    def _named(self, weights: Tensor, prefix: str, as_floats: bool) -> dict[str, Any]:
        names = self.task_names or [str(i) for i in range(self.num_tasks)]
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
        bounds = check_min_losses("min_losses", value, self.num_tasks)
        check_representable("min_losses", float(bounds.abs().max()), self._buffers["logits"].dtype)
        self._state.assign_bounds(bounds)

    @property
    def steps(self) -> Tensor:
        """Adam's step count per task, shape (k,), in the state's dtype (a copy)."""
        steps = self._state.view("adam_step").to(self._buffers["logits"].dtype)
        return steps.expand(self.num_tasks).clone() if steps.dim() == 0 else steps.clone()

    @property
    def pending(self) -> bool:
        """Whether losses are recorded and waiting for a logit step (or :meth:`discard`)."""
        return self._state.sync().pending

    @property
    def pending_sum(self) -> Tensor:
        """The sum of the losses recorded since the last logit step, shape (k,) (a copy)."""
        return self._state.view("window_sum").clone()

    @property
    def pending_count(self) -> Tensor:
        """How many losses were recorded since the last logit step, per task (a copy)."""
        return self._state.view("window_count").clone()

    def reset(self) -> None:
        """Back to the start: zero logits (uniform weights), fresh Adam, nothing recorded, no
        schedule progress. The options and the bounds are kept.

        >>> famo = FAMOWeighting(2)
        >>> _ = famo.logits.fill_(3.0)
        >>> famo.reset()
        >>> famo.weights
        tensor([0.5000, 0.5000])
        """
        self._state.reset(self._buffers["lower_bounds"].clone())

    def reset_parameters(self) -> None:
        """The constructor's state, bounds included (after ``to_empty``, for deferred init).

        >>> with torch.device("meta"):
        ...     famo = FAMOWeighting(2, min_losses=[0.0, -1.0])
        >>> _ = famo.to_empty(device="cpu")
        >>> famo.reset_parameters()
        >>> famo.min_losses, famo.logits
        (tensor([ 0., -1.]), tensor([0., 0.]))
        """
        self._state.reset(self._state.initial_bounds)

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
        state = self._state
        batch = self._read(losses, "losses")
        compiled = is_compiling()
        if (
            not torch.is_grad_enabled()
            or (not compiled and _replaying())
            or _meta_call(batch, self._buffers["logits"])
        ):
            # (Meta losses trace shapes: computed on copies.)
            weights = _without_grad(compiled, state.evaluate, batch, compiled)
            return _weighted_sum(batch, weights)
        require_grad(batch)
        record = state.record_compiled if compiled else state.record
        return _weighted_sum(batch, _without_grad(compiled, record, batch))

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
        batch = self._read(losses, "losses")
        require_grad(batch)
        compiled = is_compiling()
        state = self._state
        prepare = state.prepare_compiled if compiled else state.prepare
        weights, commit = _without_grad(compiled, prepare, batch)
        # Nothing is recorded until the backward pass has run: if it raises (out of memory, a
        # freed graph), the call changed nothing and the step can be retried.
        _weighted_sum(batch, weights).backward(**kwargs)  # type: ignore[no-untyped-call]
        _without_grad(compiled, commit)

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
        state = self._state
        if not state.settings["extra_forward"]:
            raise RuntimeError(
                "`update` should not be called on a FAMOWeighting created with "
                "extra_forward=False: it learns from the next batch's losses inside `loss` and "
                "`backward`. Call only `backward` (or `loss`) once per step."
            )
        compiled = is_compiling()
        facts = None if compiled else state.sync()
        if facts is not None and not facts.pending:
            raise RuntimeError(
                "`update` was called with no losses recorded. Call `backward(losses)` or "
                "`loss(losses)` before the optimizer step, then `update(new_losses)` once after "
                "it; `update` consumes the recorded losses."
            )
        skip_tensor = check_skip(skip)
        batch = self._read(new_losses, "new_losses")
        if skip is True:
            _without_grad(compiled, state.clear)  # the step did not happen: nothing to learn
        elif facts is None:
            _without_grad(True, state.update_compiled, batch, skip_tensor)
        else:
            _without_grad(False, state.update, batch, skip_tensor, facts)

    def discard(self) -> None:
        """Forget the recorded losses without learning from them (the step did not happen).

        >>> famo = FAMOWeighting(2)
        >>> _ = famo.loss(torch.tensor([1.0, 2.0], requires_grad=True))
        >>> famo.discard()
        >>> famo.pending
        False
        """
        _without_grad(False, self._state.clear)

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
        return self._state.attach(optimizer)

    # ------------------------------------------------------------------ internals

    def _read(self, losses: Any, param: str) -> LossVector:
        update = param == "new_losses"
        state = self._state
        return read_losses(
            losses,
            param=param,
            num_tasks=state.num_tasks,
            names=state.names,
            allow_missing=state.settings["allow_missing_tasks"],
            allow_rows=update,
            allow_numbers=update,
        )

    # ------------------------------------------------------------------ what torch asks of a module

    def extra_repr(self) -> str:
        tasks = self.task_names if self.task_names is not None else self.num_tasks
        return ", ".join([f"tasks={tasks!r}", *describe(self._state.settings)])

    def _apply(self, fn: Any, recurse: bool = True) -> FAMOWeighting:
        """``.to()``, ``.double()``, ``to_empty()``: see :func:`famo._layout.convert`."""
        self._state.move(fn)
        return self

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        if not is_compiling():
            self._state.publish()  # the state famo computes from (see famo._state)
        _layout.save(self._buffers, destination, prefix, keep_vars)

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: Mapping[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Check all, then take all (``assign=True``: copies on the checkpoint's device). torch
        passes ``strict=True`` here; the keys reported decide, as for any module."""
        ours = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        layout = _checkpoint.layout_of(ours)
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
        assign = bool(local_metadata.get("assign_to_params_buffers", False))
        try:
            self._state.load(ours, layout, assign)
        except ValueError as error:
            error_msgs.append(str(error))


def _without_grad(compiled: bool, call: Callable[..., T], *args: Any) -> T:
    """``call(*args)`` with autograd off, then grad mode as it was, however the call ends.

    Eager, a switch inside a ``try`` block rather than ``torch.no_grad()``: a context manager's
    protocol costs about a microsecond per call, and an interrupt delivered just after its switch
    could leave autograd off. Compiled, ``torch.no_grad()``, which dynamo traces.
    """
    if compiled:
        with torch.no_grad():
            return call(*args)
    previous = torch._C.is_grad_enabled()
    try:
        torch._C._set_grad_enabled(False)
        return call(*args)
    finally:
        torch._C._set_grad_enabled(previous)


def _weighted_sum(batch: LossVector, weights: Tensor) -> Tensor:
    """Σ wᵢ ℓᵢ over the losses as given (their graph, their dtype promoted)."""
    if batch.present is not None:
        weights = torch.stack([weights[task] for task in batch.present])  # no index tensor
    given = batch.values
    return torch.dot(given if given.dtype == weights.dtype else given.to(weights.dtype), weights)


def _meta_call(batch: LossVector, logits: Tensor) -> bool:
    return batch.values.is_meta and not logits.is_meta


def _replaying() -> bool:
    """Whether autograd is running a forward again inside backward to recompute what it did not
    save (non-reentrant activation checkpointing): such a call has been made and recorded once.

    (Reentrant checkpointing runs its forward under ``torch.no_grad()``, which records nothing,
    and the call it replays inside backward is then the one that records.)
    """
    if torch._C._current_graph_task_id() == -1:
        return False  # (a compiled region is recomputed inside its own graph, not by Python)
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(True)
    return hooks is not None and "_recomputation_hook" in getattr(hooks[0], "__qualname__", "")
