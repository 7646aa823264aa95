"""``validate=False``: ``loss``, ``backward`` and ``update`` make no host synchronisation, and a
training step that calls them compiles with ``torch.compile`` and matches eager."""

from __future__ import annotations

import runpy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode

from famo import FAMOWeighting

aten = torch.ops.aten
SCRIPTS = Path(__file__).resolve().parent / "_scripts"

#: Operators that make the host wait for the device: reading a value into Python, or a result
#: whose shape depends on the data.
SYNCING_OPS = {
    aten._local_scalar_dense.default,
    aten.item.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
}


class HostSyncError(AssertionError):
    pass


class FailOnHostSync(TorchDispatchMode):
    """Raises on every operator that synchronises, and on device→host copies."""

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in SYNCING_OPS:
            raise HostSyncError(f"{func} synchronises with the host")
        result = func(*args, **kwargs)
        if func in (aten._to_copy.default, aten.copy_.default):
            sources = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
            on_host = isinstance(result, Tensor) and result.device.type == "cpu"
            if on_host and any(source.device.type not in ("cpu", "meta") for source in sources):
                raise HostSyncError(f"{func} copies from the device to the host")
        return result


@contextmanager
def no_host_sync() -> Iterator[None]:
    with FailOnHostSync():
        yield


def test_the_detector_catches_a_sync() -> None:
    # The default `validate=True` checks the values in Python: one sync per call, caught here.
    famo = FAMOWeighting(2)
    with pytest.raises(HostSyncError), no_host_sync():
        famo.loss(torch.tensor([1.0, 2.0], requires_grad=True))
    with pytest.raises(HostSyncError), no_host_sync():
        float(torch.ones(()))


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ),
    ],
)
def test_loss_backward_and_update_make_no_host_sync(device: str) -> None:
    famo = FAMOWeighting(3, validate=False, device=device)
    head = nn.Linear(4, 3).to(device)
    x = torch.randn(5, 4, device=device)
    for _ in range(3):
        with no_host_sync():
            famo.backward(head(x).pow(2).mean(dim=0) + 0.5)
            with torch.no_grad():
                famo.update(head(x).pow(2).mean(dim=0) + 0.4)
            famo.backward(head(x).pow(2).mean(dim=0) + 0.45)
            skip = torch.rand((), device=device) > 2  # False, but known only on the device
            famo.update(torch.rand(2, 3, device=device) + 0.1, skip=skip)
            _ = famo.weights
    assert famo.steps.tolist() == [6.0] * 3


def drive_every_form(device: str) -> tuple[FAMOWeighting, FAMOWeighting, FAMOWeighting]:
    """Tensors, sequences, mappings, tasks left out, ``extra_forward=False``: two rounds each."""
    full = FAMOWeighting(2, validate=False, device=device)
    names = FAMOWeighting(["a", "b"], validate=False, allow_missing_tasks=True, device=device)
    automatic = FAMOWeighting(2, validate=False, extra_forward=False, device=device)
    leaf = torch.rand(4, device=device, requires_grad=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        with no_host_sync():
            for _ in range(2):
                full.backward((leaf * 2 + 1)[:2])
                full.update((leaf * 2 + 1)[2:].detach())
                losses = leaf * 2 + 1
                names.loss({"a": losses[0], "b": losses[1]}).backward()
                names.update({"a": losses[2].detach()})
                names.loss({"b": (leaf * 2 + 1)[3]}).backward()
                after = (leaf * 2 + 1).detach()
                names.update({"a": after[2], "b": after[3]})
                automatic.backward(list(leaf * 2 + 1)[:2])
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    return full, names, automatic


def test_other_forms_make_no_host_sync() -> None:
    full, names, automatic = drive_every_form("cpu")
    assert full.steps.tolist() == [2.0, 2.0]
    assert names.steps.tolist() == [2.0, 2.0]
    assert automatic.steps.tolist() == [1.0, 1.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_cuda_synchronisation_in_any_form() -> None:
    # CUDA's own detector also sees blocking host→device copies (an index tensor made from a
    # Python list, say), which a dispatch mode cannot.
    full, names, automatic = drive_every_form("cuda")
    assert full.steps.tolist() == names.steps.tolist() == [2.0, 2.0]
    assert automatic.steps.tolist() == [1.0, 1.0]


# ---------------------------------------------------------------------- torch.compile

# Raised by torch itself, not by famo, and only when warnings are errors: dynamo instantiates
# torch.autograd.Function while tracing any custom autograd.Function (inside a
# catch_warnings(record=True) meant to hide it), and inductor's CPU backend touches
# torch.jit.script_method.
ignore_autograd_function_warning = pytest.mark.filterwarnings(
    "ignore:.*should not be instantiated:DeprecationWarning"
)
ignore_script_method_warning = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)


def make_setup(
    extra_forward: bool = True,
) -> tuple[nn.Module, FAMOWeighting, torch.optim.Optimizer, list[tuple[Tensor, Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    famo = FAMOWeighting(3, validate=False, extra_forward=extra_forward)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scale = torch.tensor([1.0, 10.0, 100.0])
    data = [(torch.randn(32, 6), torch.randn(32, 3) * scale) for _ in range(4)]
    return model, famo, optimizer, data


def task_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return ((model(x) - y) ** 2).mean(dim=0)


def run(
    setup: tuple[nn.Module, FAMOWeighting, torch.optim.Optimizer, list[tuple[Tensor, Tensor]]],
    compile_fn: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> tuple[nn.Module, FAMOWeighting]:
    """The README's compiled loop: the forward + ``loss`` and the ``update`` compile whole."""
    model, famo, optimizer, data = setup

    def forward_loss(x: Tensor, y: Tensor) -> Tensor:
        return famo.loss(task_losses(model, x, y))

    @torch.no_grad()
    def update(x: Tensor, y: Tensor) -> None:
        famo.update(task_losses(model, x, y))

    forward_loss, update = compile_fn(forward_loss), compile_fn(update)
    for x, y in data:
        optimizer.zero_grad()
        forward_loss(x, y).backward()
        optimizer.step()
        if famo.extra_forward:
            update(x, y)
    return model, famo


def assert_close_runs(
    a: tuple[nn.Module, FAMOWeighting], b: tuple[nn.Module, FAMOWeighting]
) -> None:
    # Compiled kernels may fuse and reorder float32 arithmetic: equal up to rounding.
    for pa, pb in zip(a[0].parameters(), b[0].parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    for name in ("logits", "exp_avg", "exp_avg_sq", "steps", "pending_sum"):
        torch.testing.assert_close(getattr(a[1], name), getattr(b[1], name), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra_forward", [True, False])
@ignore_autograd_function_warning
def test_loss_and_update_compile_without_graph_breaks(extra_forward: bool) -> None:
    # fullgraph=True fails on any graph break; aot_eager traces forward and backward (through
    # FAMO's autograd.Function) like the default backend, without generating C++.
    torch._dynamo.reset()
    eager = run(make_setup(extra_forward), lambda fn: fn)
    counters: list[Any] = []

    def compile_counted(fn: Callable[..., Any]) -> Callable[..., Any]:
        counters.append(CompileCounterWithBackend("aot_eager"))
        return torch.compile(fn, fullgraph=True, backend=counters[-1])

    compiled = run(make_setup(extra_forward), compile_counted)
    # No recompiles: one graph for `loss` and one for `update` (without the extra forward there
    # is no `update`); compiled, famo decides from tensors, never from Python-side counts.
    assert [counter.frame_count for counter in counters] == ([1, 1] if extra_forward else [1, 0])
    assert_close_runs(eager, compiled)
    assert compiled[1].steps.tolist() == ([4.0] * 3 if extra_forward else [3.0] * 3)
    assert compiled[1].logits.abs().min() > 1e-3


def no_compile(model: Any = None, **options: Any) -> Any:
    """Stands in for ``torch.compile``: the same code, run eagerly."""
    return model if model is not None else (lambda fn: fn)


@pytest.mark.slow
@ignore_autograd_function_warning
@ignore_script_method_warning
def test_the_readme_loop_compiles_with_inductor_and_matches_eager(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The README's torch.compile example, verbatim, with the default backend (inductor).
    torch._dynamo.reset()
    torch.manual_seed(0)
    compiled = runpy.run_path(str(SCRIPTS / "readme_compile.py"), run_name="readme_compile")
    monkeypatch.setattr(torch, "compile", no_compile)
    torch.manual_seed(0)
    eager = runpy.run_path(str(SCRIPTS / "readme_compile.py"), run_name="readme_eager")
    assert_close_runs((compiled["model"], compiled["famo"]), (eager["model"], eager["famo"]))
    assert compiled["famo"].steps.tolist() == [20.0, 20.0]
    assert compiled["famo"].logits.abs().min() > 1e-3
