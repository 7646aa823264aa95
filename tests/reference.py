"""The method of ``docs/design.md`` §1 written as plainly as possible, as the published code does.

Autograd through the softmax for the logit gradient and a real ``torch.optim.Adam`` on the
logits. Nothing here is shared with ``famo``: the lockstep tests compare the two.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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


class ScheduleReference:
    """The learning schedule of ``FAMOWeighting``, written from its contract, in float64.

    A *learning step* is what :meth:`learning_step` is called for: an ``update`` that is not
    skipped, or (``extra_forward=False``) the logit step a ``loss`` call takes. The first
    ``warmup_steps`` learning steps only consume their losses. After them, every block of
    ``update_every`` learning steps ends in one Adam step, from each task's mean log-improvement
    δ̄ᵢ over the block's steps where it was present (before and after): g = z ⊙ (δ̄ − ⟨z, δ̄⟩),
    by autograd through the softmax over the tasks present in the block. A task absent for the
    whole block keeps its logit, Adam moments and step count: one scalar ``torch.optim.Adam``
    per task, as ``tests/test_missing_tasks.py``'s ``PerTaskReference`` has.

    Losses are mappings from task index to value (the present tasks) or full sequences.
    """

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
        warmup_steps: int = 0,
        update_every: int = 1,
    ) -> None:
        self.num_tasks = num_tasks
        self.parameters = [
            torch.zeros(1, dtype=DTYPE, requires_grad=True) for _ in range(num_tasks)
        ]
        self.optimizers = [
            torch.optim.Adam(
                [logit], lr=lr, betas=betas, eps=adam_eps, weight_decay=gamma, foreach=False
            )
            for logit in self.parameters
        ]
        self.min_losses = (
            [0.0] * num_tasks if min_losses is None else [float(b) for b in min_losses]
        )
        self.eps = eps
        self.warmup_steps = warmup_steps
        self.update_every = update_every
        self.learning_steps = 0  # all of them, warm-up included
        self.block_steps = 0  # learning steps in the current block
        self.block_deltas: list[list[float]] = [[] for _ in range(num_tasks)]
        # Set once a logit step had some δ̄ᵢ − ⟨z, δ̄⟩ within 1e-4 of the largest |δ̄|: there,
        # the rounding of two correct implementations differs by more than 1e-12 relative in
        # g, and Adam's normalised step passes that on (at 0, even its sign is arbitrary).
        self.rounding_noise = False

    @staticmethod
    def _present(losses: Mapping[int, float] | Sequence[float]) -> dict[int, float]:
        if isinstance(losses, Mapping):
            return {int(i): float(v) for i, v in losses.items()}
        return {i: float(v) for i, v in enumerate(losses)}

    def _log_distance(self, task: int, loss: float) -> Tensor:
        return torch.tensor(loss - self.min_losses[task] + self.eps, dtype=DTYPE).log()

    def weights(self, losses: Mapping[int, float] | Sequence[float]) -> dict[int, float]:
        """∂L/∂ℓ of the published objective over the present tasks, by autograd."""
        present = self._present(losses)
        tasks = sorted(present)
        leaf = torch.tensor([present[i] for i in tasks], dtype=DTYPE, requires_grad=True)
        z = torch.softmax(torch.cat([self.parameters[i].detach() for i in tasks]), dim=0)
        shifted = leaf - torch.tensor([self.min_losses[i] for i in tasks], dtype=DTYPE) + self.eps
        c = 1.0 / (z / shifted).sum().detach()
        (c * (z * shifted.log()).sum()).backward()
        assert leaf.grad is not None
        return dict(zip(tasks, leaf.grad.tolist(), strict=True))

    def learning_step(
        self,
        before: Mapping[int, float] | Sequence[float],
        after: Mapping[int, float] | Sequence[float],
    ) -> None:
        """One learning step, from the window's (mean) losses ``before`` to ``after``."""
        self.learning_steps += 1
        if self.learning_steps <= self.warmup_steps:
            return  # consumed, as discard() would
        was, now = self._present(before), self._present(after)
        for task in sorted(set(was) & set(now)):
            delta = self._log_distance(task, was[task]) - self._log_distance(task, now[task])
            self.block_deltas[task].append(delta.item())
        self.block_steps += 1
        if self.block_steps == self.update_every:
            self._adam_step()
            self.block_steps = 0
            self.block_deltas = [[] for _ in range(self.num_tasks)]

    def _adam_step(self) -> None:
        tasks = [i for i in range(self.num_tasks) if self.block_deltas[i]]
        if not tasks:
            return
        mean = torch.tensor(
            [sum(self.block_deltas[i]) / len(self.block_deltas[i]) for i in tasks], dtype=DTYPE
        )
        leaves = [self.parameters[i] for i in tasks]
        z = torch.softmax(torch.cat(leaves), dim=0)
        grads = torch.autograd.grad(z, leaves, mean)
        if len(tasks) > 1:  # δ̄ᵢ − ⟨z, δ̄⟩ is a difference: rounding is relative to max |δ̄|
            centred = mean - (z.detach() * mean).sum()
            noise = 1e-4 * (1.0 + mean.abs().max().item())
            self.rounding_noise |= bool((centred.abs() <= noise).any())
        for task, grad in zip(tasks, grads, strict=True):
            self.parameters[task].grad = grad.clone()
            self.optimizers[task].step()

    def _adam_state(self, name: str) -> Tensor:
        values = []
        for logit, optimizer in zip(self.parameters, self.optimizers, strict=True):
            state = optimizer.state.get(logit, {})
            values.append(float(state[name]) if name in state else 0.0)
        return torch.tensor(values, dtype=DTYPE)

    @property
    def logits(self) -> Tensor:
        return torch.cat([logit.detach() for logit in self.parameters])

    @property
    def exp_avg(self) -> Tensor:
        return self._adam_state("exp_avg")

    @property
    def exp_avg_sq(self) -> Tensor:
        return self._adam_state("exp_avg_sq")

    @property
    def steps(self) -> list[float]:
        """Adam's step count of each task's logit."""
        return self._adam_state("step").tolist()
