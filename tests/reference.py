"""The method of ``docs/design.md`` §1 written as plainly as possible, as the published code does.

Autograd through the softmax for the logit gradient and a real ``torch.optim.Adam`` on the
logits. Nothing here is shared with ``famo``: the lockstep tests compare the two.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

DTYPE = torch.float64


class ReferenceFAMO:
    def __init__(
        self,
        num_tasks: int,
        *,
        lr: float = 0.025,
        gamma: float = 1e-3,
        min_losses: Sequence[float] | None = None,
        eps: float = 1e-8,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
    ) -> None:
        self.logits = torch.zeros(num_tasks, dtype=DTYPE, requires_grad=True)
        self.optimizer = torch.optim.Adam(
            [self.logits], lr=lr, betas=betas, eps=adam_eps, weight_decay=gamma, foreach=False
        )
        bounds = [0.0] * num_tasks if min_losses is None else list(min_losses)
        self.min_losses = torch.tensor(bounds, dtype=DTYPE)
        self.eps = eps
        self.before: Tensor | None = None

    def objective(self, losses: Tensor) -> Tensor:
        """The published objective c · Σ z_i log(ℓ_i − b_i + ε), with z and c constants."""
        self.before = losses.detach().clone()
        z = torch.softmax(self.logits, dim=-1).detach()
        shifted = losses - self.min_losses + self.eps
        c = 1.0 / (z / shifted).sum().detach()
        return c * (z * shifted.log()).sum()

    def loss_weights(self, losses: Sequence[float]) -> Tensor:
        """∂objective/∂ℓ, by autograd."""
        leaf = torch.tensor(list(losses), dtype=DTYPE, requires_grad=True)
        self.objective(leaf).backward()
        assert leaf.grad is not None
        return leaf.grad

    def update(self, after: Sequence[float]) -> None:
        assert self.before is not None, "objective() first"
        after_t = torch.tensor(list(after), dtype=DTYPE)
        delta = (self.before - self.min_losses + self.eps).log() - (
            after_t - self.min_losses + self.eps
        ).log()
        self.optimizer.zero_grad()
        (grad,) = torch.autograd.grad(
            torch.softmax(self.logits, dim=-1), self.logits, grad_outputs=delta
        )
        self.logits.grad = grad
        self.optimizer.step()
        self.before = None
