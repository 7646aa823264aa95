r"""FAMO's arithmetic as pure functions, in the way ``torch.optim``'s functional ``adam`` is public.

:class:`~famo.FAMOWeighting` keeps the bookkeeping (what was recorded, the learning schedule,
devices, ranks, checkpoints) and calls these; use them directly to write FAMO into a training
framework of your own or to check a value. Every function works on tensors of one task axis,
shape (k,), and none of them makes the host wait for the device.

With logits :math:`\xi`, lower bounds :math:`b` (``min_losses``) and :math:`\epsilon` (``eps``),
the published method (Liu et al., NeurIPS 2023, Algorithm 2) is:

.. math::
    z = \operatorname{softmax}(\xi), \qquad D_i = \ell_i - b_i + \epsilon, \qquad
    w_i = \frac{z_i / D_i}{\sum_j z_j / D_j} = \operatorname{softmax}(\xi - \log D)_i,

    L = \Big(\sum_j \frac{z_j}{D_j}\Big)^{-1} \sum_i z_i \log D_i, \qquad
    \frac{\partial L}{\partial \ell} = w,

    \delta_i = \log D_i^{\text{before}} - \log D_i^{\text{after}}, \qquad
    g = z \odot (\delta - \langle z, \delta \rangle) = J_{\operatorname{softmax}}(\xi)^\top \delta,

then one ``torch.optim.Adam`` step (coupled weight decay :math:`\gamma`) on :math:`\xi` with
gradient :math:`g`.

>>> import torch
>>> from famo import functional
>>> logits = torch.zeros(2, dtype=torch.float64)
>>> functional.published_objective(logits, torch.tensor([1.0, 2.0], dtype=torch.float64))
tensor(0.4621, dtype=torch.float64)

References:
    Bo Liu, Yihao Feng, Peter Stone, Qiang Liu. *FAMO: Fast Adaptive Multitask Optimization*.
    NeurIPS 2023.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "adam_step_",
    "log_improvement",
    "logit_gradient",
    "loss_weights",
    "published_objective",
]

Bounds = float | Tensor


def _offset(min_losses: Bounds, eps: float, like: Tensor) -> Tensor | float:
    r""":math:`\epsilon - b`, so that :math:`D = \ell + (\epsilon - b)`."""
    if isinstance(min_losses, Tensor):
        return min_losses.to(like.dtype).neg().add_(eps)
    return eps - float(min_losses)


def log_distance(losses: Tensor, offset: Tensor | float, mask: Tensor | None = None) -> Tensor:
    r""":math:`\log D = \log(\ell + (\epsilon - b))` from the offset :math:`\epsilon - b`.

    Finite exactly when the loss is usable (:math:`D > 0` and finite), so one
    ``torch.isfinite(...).all()`` checks every loss. Tasks outside ``mask`` get 0.
    """
    if mask is None:
        return torch.add(losses, offset).log_()
    return torch.where(mask, torch.add(losses, offset), 1.0).log_()


def loss_weights(
    logits: Tensor, losses: Tensor, min_losses: Bounds = 0.0, eps: float = 1e-8
) -> Tensor:
    r"""The weights :math:`w = \operatorname{softmax}(\xi - \log D)` on the task losses' gradients.

    Equal to :math:`c\, z / D` with :math:`c = (\sum_j z_j / D_j)^{-1}`, computed in log space so
    that it cannot overflow when some :math:`D` is tiny: non-negative, summing to 1. The model is
    trained on :math:`\sum_i w_i \ell_i` with :math:`w` held constant.

    :param logits: :math:`\xi`, shape (k,).
    :param losses: :math:`\ell`, shape (k,), each above its bound.
    :param min_losses: :math:`b`: a number or a tensor of shape (k,).
    :param eps: :math:`\epsilon`.

    >>> loss_weights(torch.zeros(2), torch.tensor([1.0, 2.0]))  # more weight on the smaller loss
    tensor([0.6667, 0.3333])
    """
    return weights_from_log_distance(logits, log_distance(losses, _offset(min_losses, eps, logits)))


def weights_from_log_distance(logits: Tensor, log_d: Tensor) -> Tensor:
    r""":func:`loss_weights` from :math:`\log D`. Tasks whose logit is :math:`-\infty` get 0."""
    return torch.softmax(torch.sub(logits, log_d), dim=0)


def published_objective(
    logits: Tensor, losses: Tensor, min_losses: Bounds = 0.0, eps: float = 1e-8
) -> Tensor:
    r"""The published objective :math:`L = (\sum_j z_j / D_j)^{-1} \sum_i z_i \log D_i`.

    Its gradient with respect to :math:`\ell` (with :math:`z` and the normaliser constant) is
    :math:`w`. :meth:`FAMOWeighting.loss <famo.FAMOWeighting.loss>` returns
    :math:`\sum_i w_i \ell_i` instead: the same gradient, and a value in the losses' units that
    falls as they fall (:math:`L` is negative once the losses are below 1). This function gives
    the published value, for comparison with the official code.

    >>> published_objective(torch.zeros(2, dtype=torch.float64),
    ...                     torch.tensor([1.0, 2.0], dtype=torch.float64)).item()
    0.4620981342241145
    """
    shifted = torch.add(losses, _offset(min_losses, eps, logits))
    z = torch.softmax(logits, dim=0)
    return torch.dot(z, shifted.log()) / torch.dot(z, shifted.reciprocal())


def log_improvement(
    before: Tensor, after: Tensor, min_losses: Bounds = 0.0, eps: float = 1e-8
) -> Tensor:
    r""":math:`\delta = \log(\ell - b + \epsilon) - \log(\ell' - b + \epsilon)`: how much each loss
    fell, in log space (positive: it fell).

    >>> log_improvement(torch.tensor([1.0, 1.0]), torch.tensor([0.5, 1.0]), eps=0.0)
    tensor([0.6931, 0.0000])
    """
    offset = _offset(min_losses, eps, before)
    return torch.sub(log_distance(before, offset), log_distance(after, offset))


def logit_gradient(logits: Tensor, improvement: Tensor, mask: Tensor | None = None) -> Tensor:
    r""":math:`g = z \odot (\delta - \langle z, \delta\rangle)`: softmax's vector-Jacobian product.

    One kernel, ``softmax``'s own backward, applied to :math:`\delta` shifted so that its first
    entry is zero: :math:`g` does not change when :math:`\delta` moves by a constant, and tied
    improvements then give exactly :math:`g = 0` (rather than rounding noise, which Adam would
    scale up to a step of about ``lr``). A task that improved less than the :math:`z`-weighted
    mean gets :math:`g_i < 0`; Adam descends :math:`g`, so its logit, and its weight, grow.

    With ``mask`` (bool, (k,)), the softmax and the centring run over the tasks in ``mask``; the
    others get :math:`g = 0` (with no task in ``mask``, :math:`g = 0`).

    >>> logit_gradient(torch.zeros(2), torch.tensor([0.0, -0.2]))  # task 1 improved less
    tensor([ 0.0500, -0.0500])
    """
    if mask is None:
        z = torch.softmax(logits, dim=0)
        return torch._softmax_backward_data(improvement - improvement[0], z, 0, z.dtype)
    anchor = torch.where(mask, improvement, math.inf).amin()
    centred = torch.where(mask, improvement - anchor, 0.0)
    z = torch.softmax(logits.masked_fill(~mask, -math.inf), dim=0)
    z = torch.where(mask, z, 0.0)  # also clears the NaN of a softmax over no task
    return torch._softmax_backward_data(centred, z, 0, z.dtype)


# ------------------------------------------------------------------------------ the Adam step


def fused_adam_available(device: torch.device) -> bool:
    """Whether ``torch._fused_adam_`` runs on ``device`` (CPU from torch 2.4, CUDA, XPU, MPS)."""
    return hasattr(torch, "_fused_adam_") and device.type in ("cpu", "cuda", "xpu", "mps")


# torch.compiler.is_compiling from torch 2.3; False where it does not exist.
is_compiling: Callable[[], bool] = getattr(
    getattr(torch, "compiler", None), "is_compiling", lambda: False
)


def use_fused_adam(device: torch.device) -> bool:
    """Whether the logits' Adam runs the fused kernel: on an accelerator, or on one CPU thread.

    On the CPU, ``torch._fused_adam_`` opens an OpenMP parallel region whatever the size of the
    tensors, so with several threads a step for k = 2 logits waits for every thread to wake up;
    on a machine busy with other work that costs more than the kernel saves (a whole QM9
    training step, 11 tasks: equal on one thread, 12% slower on two threads shared with other
    jobs). Under ``torch.compile`` the formulas run op by op (inductor fuses them).
    """
    if is_compiling() or not fused_adam_available(device):
        return False
    return device.type != "cpu" or torch.get_num_threads() == 1


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
    fused: bool | None = None,
    mask: Tensor | None = None,
) -> None:
    r"""One ``torch.optim.Adam`` step on ``logits`` in place (coupled weight decay ``gamma``).

    .. math::
        t &\leftarrow t + 1, \qquad g \leftarrow g + \gamma \xi, \\
        m &\leftarrow \beta_1 m + (1 - \beta_1) g, \qquad
        v \leftarrow \beta_2 v + (1 - \beta_2) g^2, \\
        \xi &\leftarrow \xi - \frac{\eta}{1 - \beta_1^t}\,
            \frac{m}{\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon_{\text{Adam}}}.

    A dispatcher, as ``torch.optim.adam.adam`` is: ``fused=True`` runs ``torch._fused_adam_``,
    bit-identical to ``torch.optim.Adam(fused=True)`` (``step`` a float32 tensor of one
    element); ``fused=False`` runs the formulas above op by op (the one place they are
    written), bit-identical to ``torch.optim.Adam(foreach=False)`` up to the last digit;
    ``None`` picks as :func:`use_fused_adam` does. Neither synchronises with the host.

    :param step: the step count :math:`t`: 0-dim (one for all tasks), or per task, shape (k,).
    :param mask: bool, 0-dim or (k,): where False, nothing changes (the step count included). A
        0-dim mask on the fused path is the kernel's own ``found_inf``.
    :param grad: may be overwritten.

    >>> logits, grad = torch.zeros(2), torch.tensor([0.05, -0.05])
    >>> exp_avg, exp_avg_sq, step = torch.zeros(2), torch.zeros(2), torch.zeros(())
    >>> adam_step_(logits, grad, exp_avg, exp_avg_sq, step, lr=0.025, gamma=0.0,
    ...            betas=(0.9, 0.999), eps=1e-8)
    >>> logits
    tensor([-0.0250,  0.0250])
    """
    if fused is None:
        fused = use_fused_adam(logits.device)
    if fused and step.numel() == 1 and (mask is None or mask.dim() == 0):
        _fused_adam_(logits, grad, exp_avg, exp_avg_sq, step, lr, gamma, betas, eps, mask)
    elif mask is None:
        _single_tensor_adam_(logits, grad, exp_avg, exp_avg_sq, step, lr, gamma, betas, eps)
    else:
        # The same formulas on copies, kept where `mask` holds.
        state = (logits, exp_avg, exp_avg_sq, step)
        new = [tensor.clone() for tensor in state]
        _single_tensor_adam_(new[0], grad, new[1], new[2], new[3], lr, gamma, betas, eps)
        for old, value in zip(state, new, strict=True):
            where = mask if old.dim() > 0 or mask.dim() == 0 else mask.any()
            old.copy_(torch.where(where, value, old))


def _fused_adam_(
    logits: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    lr: float,
    gamma: float,
    betas: tuple[float, float],
    eps: float,
    mask: Tensor | None,
) -> None:
    found_inf = None if mask is None else torch.logical_not(mask).to(torch.float32).reshape(1)
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
        beta1=betas[0],
        beta2=betas[1],
        weight_decay=gamma,
        eps=eps,
        maximize=False,
        grad_scale=None,
        found_inf=found_inf,
    )
    if found_inf is not None:
        torch._foreach_sub_([step], [found_inf.reshape(step.shape)])


def _single_tensor_adam_(
    logits: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    lr: float,
    gamma: float,
    betas: tuple[float, float],
    eps: float,
) -> None:
    beta1, beta2 = betas
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
