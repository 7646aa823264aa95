"""The published FAMO code's way (``docs/design.md`` §1), reimplemented as the speed baseline.

The official implementation keeps the logits as a tensor with `requires_grad=True`, builds the
objective with the softmax inside the autograd graph (so `backward` also reaches the logits), and
computes the logit gradient in `update` by a second autograd call through the softmax, which a
separate `torch.optim.Adam` then applies. The arithmetic is the same; only the cost differs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


class PublishedFAMO:
    """FAMO as in the published code: autograd through softmax plus a separate Adam."""

    def __init__(
        self,
        n_tasks: int,
        *,
        lr: float = 0.025,
        gamma: float = 1e-3,
        min_losses: Sequence[float] | Tensor | None = None,
        eps: float = 1e-8,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.min_losses = (
            torch.zeros(n_tasks, dtype=dtype)
            if min_losses is None
            else torch.as_tensor(min_losses, dtype=dtype)
        )
        self.eps = eps
        self.w = torch.zeros(n_tasks, dtype=dtype, requires_grad=True)
        self.w_opt = torch.optim.Adam([self.w], lr=lr, weight_decay=gamma)
        self.prev_loss: Tensor | None = None

    def get_weighted_loss(self, losses: Tensor) -> Tensor:
        self.prev_loss = losses.detach()
        z = F.softmax(self.w, -1)
        D = losses - self.min_losses + self.eps
        c = (z / D).sum().detach()
        return (D.log() * z / c).sum()

    def backward(self, losses: Tensor) -> None:
        self.get_weighted_loss(losses).backward()

    def update(self, curr_loss: Tensor) -> None:
        assert self.prev_loss is not None
        delta = (self.prev_loss - self.min_losses + self.eps).log() - (
            curr_loss - self.min_losses + self.eps
        ).log()
        with torch.enable_grad():
            d = torch.autograd.grad(F.softmax(self.w, -1), self.w, grad_outputs=delta.detach())[0]
        self.w_opt.zero_grad()
        self.w.grad = d
        self.w_opt.step()

    @property
    def weights(self) -> Tensor:
        return F.softmax(self.w, -1).detach()
