"""Training-step strategies, one class per method, so every benchmark runs them the same way.

`step(compute)` does one optimisation step; `compute()` runs the model on the current batch and
returns (shared features, list of k scalar losses). Every method calls `compute` once, except
FAMO and torchjd's FAMO with the extra forward, which call it again after the step (that is their
cost, and it is counted in the wall times).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.models import MultiTaskNet

Compute = Callable[[], tuple[Tensor, list[Tensor]]]

# name -> short description, in the order of the tables
#: The methods of the quality benchmarks (MultiMNIST, QM9), in table order.
QUALITY_METHODS = [
    "stl",
    "sum",
    "famo",
    "famo_official",
    "famo_no_extra",
    "uw",
    "dwa",
    "rlw",
    "mgda",
]

DESCRIPTIONS = {
    "stl": "single-task models (Δm% reference)",
    "sum": "summed loss",
    "famo": "famo, paper γ = 1e-3, extra forward",
    "famo_official": "famo, official γ = 1e-5, extra forward",
    "famo_no_extra": "famo, γ = 1e-3, no extra forward",
    "torchjd_famo": "torchjd.scalarization.FAMO",
    "uw": "torchjd UW (uncertainty weighting)",
    "dwa": "torchjd DWA (T = 2)",
    "rlw": "torchjd Random (random loss weighting)",
    "mgda": "torchjd MGDA (Jacobian, mtl_backward)",
    "pcgrad": "torchjd PCGrad (Jacobian, mtl_backward)",
}


class Method:
    """One way of turning k losses into a model update."""

    def __init__(self, model: nn.Module, n_tasks: int, lr: float) -> None:
        self.model = model
        self.n_tasks = n_tasks
        self.optimizer = torch.optim.Adam(self.parameters(), lr=lr)

    def parameters(self) -> list[Tensor]:
        return list(self.model.parameters())

    def step(self, compute: Compute) -> Tensor:
        _, losses = compute()
        stacked = torch.stack(losses)
        self.optimizer.zero_grad()
        self.backward(stacked)
        self.optimizer.step()
        return stacked.detach()

    def backward(self, losses: Tensor) -> None:
        losses.sum().backward()

    def end_epoch(self) -> None:
        pass

    def weights(self) -> Tensor | None:
        return None


class Sum(Method):
    pass


class Famo(Method):
    def __init__(self, model: nn.Module, n_tasks: int, lr: float, **famo_kwargs: Any) -> None:
        from famo import FAMOWeighting

        super().__init__(model, n_tasks, lr)
        self.famo = FAMOWeighting(n_tasks, **famo_kwargs)
        self.extra_forward = famo_kwargs.get("extra_forward", True)

    def step(self, compute: Compute) -> Tensor:
        _, losses = compute()
        stacked = torch.stack(losses)
        self.optimizer.zero_grad()
        self.famo.backward(stacked)
        self.optimizer.step()
        if self.extra_forward:
            with torch.no_grad():
                _, new_losses = compute()
                self.famo.update(torch.stack(new_losses))
        return stacked.detach()

    def weights(self) -> Tensor | None:
        return self.famo.weights.clone()


class Scalarizer(Method):
    """A torchjd scalarizer; its own parameters (UW) join the model's optimizer."""

    def __init__(self, model: nn.Module, n_tasks: int, lr: float, scalarizer: nn.Module) -> None:
        self.scalarizer = scalarizer
        super().__init__(model, n_tasks, lr)

    def parameters(self) -> list[Tensor]:
        extra = [p for p in self.scalarizer.parameters() if p.requires_grad]
        if type(self.scalarizer).__name__ == "FAMO":
            extra = []  # torchjd's FAMO steps its own logits in `update`
        return [*self.model.parameters(), *extra]

    def backward(self, losses: Tensor) -> None:
        self.scalarizer(losses).backward()

    def end_epoch(self) -> None:
        step = getattr(self.scalarizer, "step", None)
        if step is not None:
            step()


class TorchJDFamo(Scalarizer):
    def step(self, compute: Compute) -> Tensor:
        losses = super().step(compute)
        with torch.no_grad():
            _, new_losses = compute()
            self.scalarizer.update(torch.stack(new_losses))  # type: ignore[operator]
        return losses

    def weights(self) -> Tensor | None:
        return torch.softmax(self.scalarizer._w.detach(), -1)  # type: ignore[operator]


class Jacobian(Method):
    """Jacobian descent with torchjd: `mtl_backward` then `jac_to_grad` with an aggregator."""

    def __init__(self, model: nn.Module, n_tasks: int, lr: float, aggregator: Any) -> None:
        super().__init__(model, n_tasks, lr)
        if not isinstance(model, MultiTaskNet):
            raise TypeError("Jacobian methods need a MultiTaskNet (shared trunk + heads)")
        self.aggregator = aggregator
        self.shared = list(model.shared_parameters())
        self.heads = model.task_parameters()

    def step(self, compute: Compute) -> Tensor:
        from torchjd.autojac import jac_to_grad, mtl_backward

        features, losses = compute()
        self.optimizer.zero_grad()
        mtl_backward(losses, features=features, tasks_params=self.heads, shared_params=self.shared)
        jac_to_grad(self.shared, self.aggregator)
        self.optimizer.step()
        return torch.stack(losses).detach()


def make(name: str, model: nn.Module, n_tasks: int, lr: float, validate: bool = True) -> Method:
    """The method called `name` (see DESCRIPTIONS), with an Adam(lr) on the model."""
    if name in ("sum", "stl"):
        return Sum(model, n_tasks, lr)
    if name == "famo":
        return Famo(model, n_tasks, lr, gamma="paper", validate=validate)
    if name == "famo_official":
        return Famo(model, n_tasks, lr, gamma="official", validate=validate)
    if name == "famo_no_extra":
        return Famo(model, n_tasks, lr, gamma="paper", extra_forward=False, validate=validate)
    if name in ("torchjd_famo", "uw", "dwa", "rlw"):
        from torchjd import scalarization

        if name == "torchjd_famo":
            return TorchJDFamo(model, n_tasks, lr, scalarization.FAMO(n_tasks))
        scalarizer = {
            "uw": lambda: scalarization.UW(n_tasks),
            "dwa": lambda: scalarization.DWA(),
            "rlw": lambda: scalarization.Random(),
        }[name]()
        return Scalarizer(model, n_tasks, lr, scalarizer)
    if name in ("mgda", "pcgrad"):
        # UPGrad would be the natural choice, but its projector needs `qpsolvers` and `quadprog`
        # (torchjd[quadprog_projector]), which the bench extra does not install.
        from torchjd import aggregation

        aggregator = aggregation.MGDA() if name == "mgda" else aggregation.PCGrad()
        return Jacobian(model, n_tasks, lr, aggregator)
    raise ValueError(f"unknown method {name!r}; expected one of {sorted(DESCRIPTIONS)}")
