r"""FAMO's step as straight-line eager PyTorch: the speed benchmark's reference for "no overhead".

The same arithmetic as ``famo.FAMOWeighting`` (``validate=False``, every task present, no
accumulation), with the same ATen operations as its fast path and nothing else: no checks, no
dispatch on the input's form, no device or dtype handling, no ranks, no checkpoint state. What
famo costs beyond this is the Python around its operations, not the operations themselves.

A step, for k losses :math:`\ell` with lower bounds :math:`b` (offset :math:`\epsilon - b`
computed once):

* ``backward(losses)``: ``detach``; :math:`\log D = \log(\ell + (\epsilon - b))` (``add``,
  ``log_``); :math:`w = \operatorname{softmax}(\xi - \log D)` (``sub``, ``softmax``); the
  objective :math:`\langle \ell, w \rangle` (``dot``), then its backward.
* ``update(after)``: :math:`\log D'` (``add``, ``log_``); :math:`\delta = \log D - \log D'`
  centred on its first entry (``sub``, ``select``, ``sub``); :math:`g = z \odot (\delta -
  \langle z, \delta \rangle)` as softmax's backward (``softmax``, ``_softmax_backward_data``);
  one ``torch.optim.Adam`` step: ``_foreach_add_`` on a 0-dim float32 step count and
  ``_fused_adam_`` on one CPU thread (or an accelerator), the same formulas op by op otherwise.

    >>> ref = StraightLineFAMO(2, gamma=0.0)
    >>> ref.backward(torch.tensor([1.0, 1.0], requires_grad=True))
    >>> ref.update(torch.tensor([0.5, 0.9]))
    >>> torch.softmax(ref.logits, 0)
    tensor([0.4875, 0.5125])
"""

from __future__ import annotations

import torch
from torch import Tensor


def fused_adam_runs(device: torch.device) -> bool:
    """Where famo runs torch's fused Adam kernel: an accelerator, or a CPU on one thread."""
    if not hasattr(torch, "_fused_adam_") or device.type not in ("cpu", "cuda", "xpu", "mps"):
        return False
    return device.type != "cpu" or torch.get_num_threads() == 1


class StraightLineFAMO:
    """FAMO's loss, backward and logit update as straight-line code (see the module docstring).

    ``fused`` is decided once, here (famo's default hyper-parameters otherwise). The losses
    must be a 1-D tensor of the state's dtype and device; nothing is checked.
    """

    def __init__(
        self,
        k: int,
        *,
        lr: float = 0.025,
        gamma: float = 1e-3,
        min_losses: Tensor | None = None,
        eps: float = 1e-8,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        fused: bool | None = None,
    ) -> None:
        device = torch.device(device)
        self.fused = fused_adam_runs(device) if fused is None else fused
        self.logits = torch.zeros(k, dtype=dtype, device=device)
        self.exp_avg = torch.zeros_like(self.logits)
        self.exp_avg_sq = torch.zeros_like(self.logits)
        step_dtype = torch.float32 if self.fused else dtype
        self.step = torch.zeros((), dtype=step_dtype, device=device)
        bounds = torch.zeros_like(self.logits) if min_losses is None else min_losses
        self.offset = bounds.to(device, dtype).neg().add_(eps)  # ε − b
        self.lr, self.gamma, self.betas, self.adam_eps = lr, gamma, betas, adam_eps
        self.before: Tensor | None = None  # log D of the recorded losses

    def loss(self, losses: Tensor) -> Tensor:
        """Σ wᵢ ℓᵢ, w = softmax(ξ − log D); records log D for the next ``update``."""
        log_d = torch.add(losses.data, self.offset).log_()  # read only: no op
        weights = torch.softmax(torch.sub(self.logits, log_d), 0)
        self.before = log_d
        return torch.dot(losses, weights)

    def backward(self, losses: Tensor) -> None:
        self.loss(losses).backward()

    def update(self, after: Tensor) -> None:
        """One Adam step on the logits from the recorded losses to ``after``."""
        after_log_d = torch.add(after, self.offset).log_()
        delta = torch.sub(self.before, after_log_d)  # type: ignore[arg-type]
        delta = delta - delta[0]
        z = torch.softmax(self.logits, 0)
        grad = torch._softmax_backward_data(delta, z, 0, z.dtype)
        beta1, beta2 = self.betas
        if self.fused:
            torch._foreach_add_([self.step], 1)
            torch._fused_adam_(
                [self.logits],
                [grad],
                [self.exp_avg],
                [self.exp_avg_sq],
                [],
                [self.step],
                amsgrad=False,
                lr=self.lr,
                beta1=beta1,
                beta2=beta2,
                weight_decay=self.gamma,
                eps=self.adam_eps,
                maximize=False,
                grad_scale=None,
                found_inf=None,
            )
            return
        step = self.step.add_(1.0)
        if self.gamma != 0.0:
            grad = grad.add_(self.logits, alpha=self.gamma)
        self.exp_avg.lerp_(grad, 1.0 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        bias_correction1 = torch.pow(beta1, step).neg_().add_(1.0)
        bias_correction2_sqrt = torch.pow(beta2, step).neg_().add_(1.0).sqrt_()
        denom = self.exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(self.adam_eps)
        self.logits.sub_(bias_correction1.reciprocal_().mul_(self.lr).mul(self.exp_avg).div_(denom))
