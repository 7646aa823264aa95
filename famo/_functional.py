r"""FAMO's arithmetic as pure functions, in the style of ``torch.optim``'s functional Adam.

:class:`~famo.FAMOWeighting` keeps the bookkeeping (what was recorded, devices, ranks,
checkpoints) and calls these. Every function works on tensors of one task axis, shape (k,), and
never synchronises with the host. Notation: logits :math:`\xi`, lower bounds :math:`b`,
:math:`\epsilon` inside the logarithm, and the *offset* :math:`\epsilon - b`, computed once so
that :math:`D = \ell + (\epsilon - b)`.

The published method (Liu et al., NeurIPS 2023, Algorithm 2) in these terms:

.. math::
    z = \operatorname{softmax}(\xi), \qquad D_i = \ell_i - b_i + \epsilon, \qquad
    w_i = \frac{z_i / D_i}{\sum_j z_j / D_j} = \operatorname{softmax}(\xi - \log D)_i,

    L = \Big(\sum_j \frac{z_j}{D_j}\Big)^{-1} \sum_i z_i \log D_i
      = \sum_i w_i D_i \log D_i, \qquad \frac{\partial L}{\partial \ell} = w,

    \delta_i = \log D_i^{\text{before}} - \log D_i^{\text{after}}, \qquad
    g = z \odot (\delta - \langle z, \delta \rangle) = J_{\operatorname{softmax}}(\xi)^\top \delta,

then one ``torch.optim.Adam`` step (coupled weight decay :math:`\gamma`) on :math:`\xi` with
gradient :math:`g`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "adam_step_",
    "centred_improvement",
    "fused_adam_available",
    "log_distance",
    "logit_gradient",
    "loss_weights",
    "masked_adam_step_",
    "masked_logit_gradient",
    "published_objective",
    "use_fused_adam",
]


def log_distance(losses: Tensor, mask: Tensor | None, offset: Tensor) -> Tensor:
    r""":math:`\log D = \log(\ell + (\epsilon - b))`, how far each loss is above its bound.

    Finite exactly when the loss is usable: :math:`D > 0` and finite. So one
    ``torch.isfinite(log_distance(...)).all()`` checks every loss at once. Tasks outside
    ``mask`` (absent) get 0.

    >>> log_distance(torch.tensor([1.0, 2.0]), None, torch.tensor([0.0, -1.0]))
    tensor([0., 0.])
    """
    if mask is None:
        return torch.add(losses, offset).log_()
    return torch.where(mask, torch.add(losses, offset), 1.0).log_()


def loss_weights(logits: Tensor, log_d: Tensor) -> Tensor:
    r"""The weights :math:`w = \operatorname{softmax}(\xi - \log D)` on the raw losses' gradients.

    Equal to :math:`c\, z / D` with :math:`c = (\sum_j z_j / D_j)^{-1}`, computed in log space
    so that it cannot overflow when some :math:`D` is tiny. Non-negative, summing to 1.
    Tasks whose logit is :math:`-\infty` (absent from a batch) get weight 0.

    >>> loss_weights(torch.zeros(2), torch.tensor([1.0, 2.0]).log())  # G1: losses (1, 2), b = 0
    tensor([0.6667, 0.3333])
    """
    return torch.softmax(torch.sub(logits, log_d), dim=0)


def published_objective(weights: Tensor, log_d: Tensor) -> Tensor:
    r"""The published objective :math:`L = \sum_i w_i D_i \log D_i` (with :math:`w, D` constant).

    :class:`~famo.FAMOWeighting.loss` returns :math:`\sum_i w_i \ell_i` instead: the same
    gradient with respect to the losses, and a value in the losses' units. This function gives
    the published value, for comparison with the official code.

    >>> log_d = torch.tensor([1.0, 2.0], dtype=torch.float64).log()
    >>> published_objective(loss_weights(torch.zeros(2, dtype=torch.float64), log_d), log_d)
    tensor(0.4621, dtype=torch.float64)
    """
    return torch.dot(weights * log_d.exp(), log_d)


def centred_improvement(before_log_d: Tensor, after_log_d: Tensor) -> Tensor:
    r""":math:`\delta - \delta_0`: the log-improvements, shifted so that the first is zero.

    :math:`g` does not change when :math:`\delta` is shifted by a constant; centring on one entry
    makes tied improvements give exactly :math:`g = 0` (rather than rounding noise that Adam would
    scale up to a step of about ``lr``).
    """
    delta = torch.sub(before_log_d, after_log_d)
    return delta - delta[0]


def logit_gradient(logits: Tensor, delta: Tensor) -> Tensor:
    r""":math:`g = z \odot (\delta - \langle z, \delta\rangle)`: softmax's vector-Jacobian product.

    One kernel: ``softmax``'s own backward, applied to :math:`\delta`.

    >>> logit_gradient(torch.zeros(2), torch.tensor([0.0, -0.2]))  # task 1 improved less
    tensor([ 0.0500, -0.0500])
    """
    z = torch.softmax(logits, dim=0)
    return torch._softmax_backward_data(delta, z, 0, z.dtype)


def masked_logit_gradient(logits: Tensor, delta: Tensor, mask: Tensor) -> Tensor:
    r""":math:`g` over the tasks in ``mask`` only; the others get :math:`g = 0`.

    The softmax runs over the tasks in ``mask``; :math:`\delta` is centred on its smallest entry
    among them (a present task), so tied improvements give exactly zero. With no task in
    ``mask``, :math:`g = 0`.
    """
    anchor = torch.where(mask, delta, math.inf).amin()
    centred = torch.where(mask, delta - anchor, 0.0)
    z = torch.softmax(logits.masked_fill(~mask, -math.inf), dim=0)
    z = torch.where(mask, z, 0.0)  # also clears the NaN of a softmax over no task
    return torch._softmax_backward_data(centred, z, 0, z.dtype)


def fused_adam_available(device: torch.device) -> bool:
    """Whether ``torch._fused_adam_`` runs on ``device`` (CPU from torch 2.4, CUDA, XPU, MPS)."""
    return hasattr(torch, "_fused_adam_") and device.type in _FUSED_DEVICES


_FUSED_DEVICES = ("cpu", "cuda", "xpu", "mps")


def use_fused_adam(device: torch.device) -> bool:
    """Whether the logits' Adam runs the fused kernel now: on an accelerator, or on one CPU thread.

    On the CPU, ``torch._fused_adam_`` opens an OpenMP parallel region whatever the size of the
    tensors, so with several threads a step for k = 2 logits waits for every thread to wake up;
    on a machine busy with other work that costs more than the kernel saves. Measured on two
    cores shared with other jobs, a whole training step of the QM9 model (11 tasks, batch 128):
    3.3 ms either way on one thread, and 12% slower with the fused kernel on two threads.
    """
    if _compiling() or not fused_adam_available(device):
        return False  # functionalization cannot trace the fused kernel; inductor fuses anyway
    return device.type != "cpu" or torch.get_num_threads() == 1


# torch.compiler.is_compiling from torch 2.3; False where it does not exist.
_compiling: Callable[[], bool] = getattr(
    getattr(torch, "compiler", None), "is_compiling", lambda: False
)


def adam_step_(
    logits: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    *,
    lr: float,
    gamma: float,
    betas: tuple[float, float],
    eps: float,
    fused: bool,
    skip: Tensor | None = None,
) -> None:
    r"""One ``torch.optim.Adam`` step on ``logits`` in place, with a 0-dim step count ``step``.

    .. math::
        t &\leftarrow t + 1, \qquad g \leftarrow g + \gamma \xi, \\
        m &\leftarrow \beta_1 m + (1 - \beta_1) g, \qquad
        v \leftarrow \beta_2 v + (1 - \beta_2) g^2, \\
        \xi &\leftarrow \xi - \frac{\eta}{1 - \beta_1^t}\,
            \frac{m}{\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon_{\text{Adam}}}.

    ``fused=True`` runs ``torch._fused_adam_``, bit-identical to ``torch.optim.Adam(fused=True)``
    (two kernels; ``step`` must be float32). ``fused=False`` runs the same formulas op by op from
    the step tensor (float32 or the logits' dtype), with no host synchronisation: for torch
    versions or devices without the fused kernel, for a multi-threaded CPU (see
    :func:`use_fused_adam`), and under ``torch.compile`` (which fuses them anyway). ``skip`` (a
    0-dim bool tensor): where True, nothing changes, step included.
    ``grad`` may be overwritten.
    """
    beta1, beta2 = betas
    if fused:
        found_inf = None if skip is None else skip.to(torch.float32).reshape(1)
        torch._foreach_add_([step], 1)
        torch._fused_adam_(
            [logits],
            [grad],
            [exp_avg],
            [exp_avg_sq],
            [],
            [step],
            amsgrad=False,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=gamma,
            eps=eps,
            maximize=False,
            grad_scale=None,
            found_inf=found_inf,
        )
        if found_inf is not None:
            torch._foreach_sub_([step], [found_inf.reshape(())])
        return
    if skip is not None:
        steps = step.to(logits.dtype).expand_as(logits).clone()
        masked_adam_step_(
            logits,
            grad,
            exp_avg,
            exp_avg_sq,
            steps,
            ~skip.reshape(1),
            lr=lr,
            gamma=gamma,
            betas=betas,
            eps=eps,
        )
        step.copy_(steps[0])
        return
    step.add_(1.0)
    count = step if step.dtype == logits.dtype else step.to(logits.dtype)  # exact in float64
    if gamma != 0.0:
        grad = grad.add_(logits, alpha=gamma)
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    bias_correction1 = torch.pow(beta1, count).neg_().add_(1.0)
    bias_correction2_sqrt = torch.pow(beta2, count).neg_().add_(1.0).sqrt_()
    denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)
    logits.sub_(bias_correction1.reciprocal_().mul_(lr).mul(exp_avg).div_(denom))


def masked_adam_step_(
    logits: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    steps: Tensor,
    mask: Tensor,
    *,
    lr: float,
    gamma: float,
    betas: tuple[float, float],
    eps: float,
) -> None:
    """:func:`adam_step_` for the tasks in ``mask`` only, with a step count per task (k,).

    The other tasks' logits, moments and step counts do not change. All tensors are updated in
    place.
    """
    beta1, beta2 = betas
    new_steps = steps + 1.0
    if gamma != 0.0:
        grad = grad.add(logits, alpha=gamma)
    new_exp_avg = exp_avg.lerp(grad, 1.0 - beta1)
    new_exp_avg_sq = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    bias_correction1 = torch.pow(beta1, new_steps).neg_().add_(1.0)
    bias_correction2_sqrt = torch.pow(beta2, new_steps).neg_().add_(1.0).sqrt_()
    denom = new_exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)
    new_logits = logits - bias_correction1.reciprocal_().mul_(lr).mul(new_exp_avg).div_(denom)
    for state, new in (
        (steps, new_steps),
        (exp_avg, new_exp_avg),
        (exp_avg_sq, new_exp_avg_sq),
        (logits, new_logits),
    ):
        state.copy_(torch.where(mask, new, state))
