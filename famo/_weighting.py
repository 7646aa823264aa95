"""FAMOWeighting's training calls: the bookkeeping around :mod:`famo._functional`'s arithmetic.

Construction, settings, state, devices and checkpoints are in :mod:`famo._module`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from famo import _functional
from famo._attach import Attachment
from famo._distributed import active_group
from famo._losses import LossVector, average_over_ranks, check_values, read_losses
from famo._module import StateModule
from famo._settings import check_skip

Losses = Tensor | Sequence[Tensor] | Mapping[str, Tensor]


class FAMOWeighting(StateModule):
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

    @property
    def weights(self) -> Tensor:
        r"""The current task weights :math:`z = \operatorname{softmax}(\xi)`, detached, shape (k,).

        These weight the tasks' *log* losses; the weights on the raw losses' gradients are
        :math:`w_i = c z_i / D_i` (see the class docstring).

        >>> FAMOWeighting(4).weights
        tensor([0.2500, 0.2500, 0.2500, 0.2500])
        """
        return torch.softmax(self._state.logits.detach(), dim=0)

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
        window = None if self._ready_to_learn() else self._state.recorded.fields()  # for a retry
        objective = self._loss(losses, record=True)
        try:
            objective.backward(**kwargs)  # type: ignore[no-untyped-call]
        except BaseException:
            # No optimizer step follows a failed backward pass: forget what this call recorded,
            # so a retry is not averaged with it. (A logit step it took stands.)
            if window is not None:
                self._state.recorded.restore(window)
            else:
                self._state.recorded.clear()
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
        if self._state.recorded.sum is None:
            raise RuntimeError(
                "`update` was called with no losses recorded. Call `backward(losses)` or "
                "`loss(losses)` before the optimizer step, then `update(new_losses)` once after "
                "it; `update` consumes the recorded losses."
            )
        skip_tensor = check_skip(skip)
        batch = self._read(new_losses, "new_losses", for_backward=False)
        if skip is True or (self._attachment is not None and not self._state.recorded.stepped):
            self._state.recorded.clear()  # the step did not happen: nothing to learn from
            return
        # No autograd context is needed: the values are detached and the state needs no grad.
        values, mask = self._values(batch, follow=False)
        after = _functional.log_distance(values, mask, self._state.offset)
        if self._validate:
            self._check(batch, values, after, "new_losses", accumulate=False)
        if skip_tensor is not None:
            skip_tensor = skip_tensor.to(after.device)
        self._state.learn(after, mask, skip_tensor, self._adam)

    def discard(self) -> None:
        """Forget the recorded losses without learning from them (the step did not happen).

        >>> famo = FAMOWeighting(2)
        >>> _ = famo.loss(torch.tensor([1.0, 2.0], requires_grad=True))
        >>> famo.discard()
        >>> famo.pending
        False
        """
        self._state.recorded.clear()

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
        self._attachment = Attachment(optimizer, self._state.recorded, self._detached)
        return self._attachment

    def _detached(self, attachment: Attachment) -> None:
        if self._attachment is attachment:
            self._attachment = None

    # ------------------------------------------------------------------ the calls' steps

    def _loss(self, losses: Losses, *, record: bool) -> Tensor:
        batch = self._read(losses, "losses", for_backward=record)
        # Meta losses (shape tracing) never move a state that holds values: compute on copies.
        scratch = batch.values.device.type == "meta" and self._state.logits.device.type != "meta"
        values, mask = self._values(batch, follow=None if scratch else True)
        logits, offset = self._state.logits, self._state.offset
        if scratch:
            logits, offset, record = logits.to("meta"), offset.to("meta"), False
        # Detached values and a state without grad: the weights are constants for autograd.
        log_d = _functional.log_distance(values, mask, offset)
        learn = record and self._ready_to_learn()
        if self._validate:
            accumulate = record and not learn and self._state.recorded.sum is not None
            self._check(batch, values, log_d, "losses", accumulate=accumulate)
        if learn:
            self._state.learn(log_d, mask, None, self._adam)
        if mask is not None:
            logits = logits.masked_fill(~mask, -math.inf)
        weights = _functional.loss_weights(logits, log_d)
        if record:
            self._state.record(values, log_d, mask)
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
        state = self._state.logits
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
        return average_over_ranks(
            values,
            batch.present,
            active_group(self._process_group),
            num_tasks=self._num_tasks,
            masked=self._allow_missing_tasks,
        )

    def _check(
        self, batch: LossVector, values: Tensor, log_d: Tensor, param: str, *, accumulate: bool
    ) -> None:
        check_values(
            batch,
            values,
            log_d,
            self._state,
            param=param,
            eps=self.eps,
            names=self._task_names,
            accumulate=accumulate,
            across_ranks=active_group(self._process_group) is not None,
        )

    def _ready_to_learn(self) -> bool:
        """With ``extra_forward=False``: a ``loss`` call now takes the pending logit step."""
        return (
            not self._extra_forward
            and self._state.recorded.sum is not None
            and (self._attachment is None or self._state.recorded.stepped)
        )
