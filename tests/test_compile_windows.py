"""``torch.compile(fullgraph=True)`` with gradient accumulation: one graph per compiled function,
whatever the window length and the number of steps.

The README's compiled one-line integration (``famo.attach(optimizer)``, ``extra_forward=False``;
the compiled function returns ``famo.loss(losses)``) used to recompile for every micro-batch of a
window (a guard on a Python int count) and, at 9 or more micro-batches, to stop with
``FailOnRecompileLimitHit``. Counted with ``CompileCounterWithBackend("aot_eager")`` over windows
of 1, 3 and 12 micro-batches and several optimizer steps, and compared with eager. Beyond the
named case: the unattached ``extra_forward=True`` loop, with ``loss`` and ``update`` (one row
per micro-batch) compiled, under the same windows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend

from famo import FAMOWeighting

# Raised by torch itself while dynamo traces any custom autograd.Function (see test_compile.py).
pytestmark = pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")

STEPS = 4
Run = tuple[nn.Module, FAMOWeighting]


def task_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return ((model(x) - y) ** 2).mean(dim=0)


def setup(window: int, extra_forward: bool) -> tuple[nn.Module, FAMOWeighting, Any, list[Any]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    famo = FAMOWeighting(3, validate=False, extra_forward=extra_forward)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scale = torch.tensor([1.0, 10.0, 100.0])
    data = [(torch.randn(8, 6), torch.randn(8, 3) * scale) for _ in range(STEPS * window)]
    return model, famo, optimizer, data


def attached(window: int, compile_fn: Callable[[Callable[..., Any]], Any]) -> Run:
    """The README's compiled loop with accumulation: the only FAMO call is ``famo.loss``."""
    model, famo, optimizer, data = setup(window, extra_forward=False)
    famo.attach(optimizer)

    def step_loss(x: Tensor, y: Tensor) -> Tensor:
        return famo.loss(task_losses(model, x, y))

    step_loss = compile_fn(step_loss)
    for step in range(STEPS):
        optimizer.zero_grad()
        for x, y in data[step * window : (step + 1) * window]:
            (step_loss(x, y) / window).backward()
        optimizer.step()
    return model, famo


def with_update(window: int, compile_fn: Callable[[Callable[..., Any]], Any]) -> Run:
    """The published recipe with accumulation: ``loss`` per micro-batch, one ``update``."""
    model, famo, optimizer, data = setup(window, extra_forward=True)

    def step_loss(x: Tensor, y: Tensor) -> Tensor:
        return famo.loss(task_losses(model, x, y))

    @torch.no_grad()
    def update(xs: Tensor, ys: Tensor) -> None:
        famo.update(torch.stack([task_losses(model, x, y) for x, y in zip(xs, ys, strict=True)]))

    step_loss, update = compile_fn(step_loss), compile_fn(update)
    for step in range(STEPS):
        window_data = data[step * window : (step + 1) * window]
        optimizer.zero_grad()
        for x, y in window_data:
            (step_loss(x, y) / window).backward()
        optimizer.step()
        update(torch.stack([x for x, _ in window_data]), torch.stack([y for _, y in window_data]))
    return model, famo


def assert_close_runs(compiled: Run, eager: Run) -> None:
    # Compiled kernels may reorder float32 arithmetic: equal up to rounding.
    for a, b in zip(compiled[0].parameters(), eager[0].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for name in ("logits", "exp_avg", "exp_avg_sq", "steps", "pending_sum", "pending_count"):
        torch.testing.assert_close(
            getattr(compiled[1], name), getattr(eager[1], name), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("loop", [attached, with_update], ids=["attached", "update"])
@pytest.mark.parametrize("window", [1, 3, 12])
def test_one_graph_per_compiled_function_for_any_window(loop: Any, window: int) -> None:
    torch._dynamo.reset()
    counters: list[CompileCounterWithBackend] = []

    def compile_counted(fn: Callable[..., Any]) -> Any:
        counters.append(CompileCounterWithBackend("aot_eager"))
        return torch.compile(fn, fullgraph=True, backend=counters[-1])

    compiled = loop(window, compile_counted)  # FailOnRecompileLimitHit would raise here
    # One frame per function, however many calls: STEPS * window of `loss`, STEPS of `update`.
    assert [counter.frame_count for counter in counters] == [1] * len(counters)
    eager = loop(window, lambda fn: fn)
    assert_close_runs(compiled, eager)
    learned = STEPS if loop is with_update else STEPS - 1  # attached: the last window waits
    assert compiled[1].steps.tolist() == [float(learned)] * 3
    assert compiled[1].logits.abs().min() > 1e-3
