"""A two-head model whose second loss is 1000× the first: FAMO balances, a summed loss does not."""

from __future__ import annotations

import math

import torch

from famo import FAMOWeighting


def improvement_factors(use_famo: bool, seed: int, steps: int = 500) -> tuple[float, float]:
    """log(first / last) of each task's loss after ``steps`` Adam steps."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=generator)
    a, b = torch.randn(8, 1, generator=generator), torch.randn(8, 1, generator=generator)
    y1, y2 = torch.tanh(x @ a / 3), torch.tanh(x @ b / 3)
    torch.manual_seed(seed)
    trunk = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh())
    heads = torch.nn.ModuleList([torch.nn.Linear(32, 1), torch.nn.Linear(32, 1)])
    optimizer = torch.optim.Adam([*trunk.parameters(), *heads.parameters()], lr=3e-3)

    def losses() -> torch.Tensor:
        hidden = trunk(x)
        small = ((heads[0](hidden) - y1) ** 2).mean()
        large = 1000 * ((heads[1](hidden) - y2) ** 2).mean()  # same task shape, 1000× the scale
        return torch.stack([small, large])

    famo = FAMOWeighting(["small", "large"])
    first = losses().detach()
    for _ in range(steps):
        optimizer.zero_grad()
        if use_famo:
            famo.backward(losses())
            optimizer.step()
            with torch.no_grad():
                famo.update(losses())
        else:
            losses().sum().backward()
            optimizer.step()
    last = losses().detach()
    small, large = torch.log(first / last).tolist()
    return small, large


def balance(factors: tuple[float, float]) -> float:
    """1 when both losses fell by the same factor, near 0 when only one fell."""
    return min(factors) / max(factors)


def test_famo_makes_both_losses_fall_by_similar_factors_and_a_sum_does_not() -> None:
    seeds = range(3)
    famo_runs = [improvement_factors(True, seed) for seed in seeds]
    summed_runs = [improvement_factors(False, seed) for seed in seeds]
    assert all(min(run) > math.log(10) for run in famo_runs)  # both really trained
    famo_balance = sum(map(balance, famo_runs)) / len(seeds)
    summed_balance = sum(map(balance, summed_runs)) / len(seeds)
    assert famo_balance > 0.8
    assert summed_balance < 0.6
