"""Behaviours that single-point mutants of ``famo/`` broke without any test noticing.

Each test here fails when its behaviour breaks: an attachment used as a context manager detaches
at exit; what the views and ``state_dict()`` return are copies; one task with a tensor ``skip``
on the op-by-op Adam path; one process in an initialised group communicates with no one. (The
reassigned hyper-parameters are in ``tests/test_settings.py``.)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from famo import FAMOWeighting
from tests.helpers import K, assert_same_state, make_model, snapshot, task_losses

F64 = torch.float64


def leaf(*values: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, requires_grad=True)


def batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    scale = torch.tensor([1.0, 6.0, 40.0], dtype=F64)
    return [
        (
            torch.randn(8, 4, generator=generator, dtype=F64),
            torch.randn(8, K, generator=generator, dtype=F64) * scale,
        )
        for _ in range(count)
    ]


# ---------------------------------------------------------------------- `with famo.attach(...)`


def test_an_attachment_used_as_a_context_manager_detaches_at_exit() -> None:
    """After the block, an update that follows no optimizer step learns again (as unattached),
    an optimizer step marks nothing, and the object can be attached anew."""
    optimizer = torch.optim.SGD(make_model().parameters(), lr=0.05)
    famo, never = FAMOWeighting(K, dtype=F64), FAMOWeighting(K, dtype=F64)
    with famo.attach(optimizer):
        famo.backward(leaf(1.0, 2.0, 3.0, dtype=F64))
        famo.update([0.9, 1.5, 2.9])  # no real step since the losses: dropped
        assert famo.steps.tolist() == [0.0] * K and not famo.pending
    for f in (famo, never):
        f.backward(leaf(1.0, 2.0, 3.0, dtype=F64))
    assert_same_state(famo, snapshot(never))
    optimizer.step()  # after the block: nothing listens, nothing is marked
    assert_same_state(famo, snapshot(never))
    for f in (famo, never):
        f.update([0.9, 1.5, 2.9])
    assert famo.steps.tolist() == [1.0] * K
    assert_same_state(famo, snapshot(never))
    famo.attach(optimizer).remove()  # not "already attached"


def test_without_extra_forward_an_optimizer_step_after_the_block_is_not_listened_to() -> None:
    """Detached, every ``loss`` call with losses waiting learns, as if never attached."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    famo = FAMOWeighting(K, extra_forward=False, dtype=F64)
    never = FAMOWeighting(K, extra_forward=False, dtype=F64)
    data = batches(4)
    with famo.attach(optimizer):
        pass
    for x, y in data:  # no optimizer step at all: unattached objects learn anyway
        for f in (famo, never):
            f.loss(task_losses(model, x, y)).backward()
        assert_same_state(famo, snapshot(never))
    assert famo.steps.tolist() == [3.0] * K
    optimizer.step()
    assert_same_state(famo, snapshot(never))


# ---------------------------------------------------------------------- views are copies


def scribble(tensor: torch.Tensor) -> None:
    """Change every element in place."""
    if tensor.dtype == torch.bool:
        tensor.logical_not_()
    elif tensor.is_floating_point():
        tensor.add_(1.5)
    else:
        tensor.add_(1)


@pytest.mark.parametrize("options", [{}, {"allow_missing_tasks": True}, {"extra_forward": False}])
def test_editing_what_pending_sum_and_state_dict_return_never_changes_the_live_window(
    options: dict[str, Any],
) -> None:
    names = ["a", "b", "c"]
    famo, twin = FAMOWeighting(names, **options), FAMOWeighting(names, **options)
    for f in (famo, twin):
        f.backward(leaf(1.0, 2.0, 3.0))
        if f.extra_forward:
            f.update([0.9, 1.5, 2.9])
        f.backward(leaf(0.8, 1.5, 2.8))  # pending, and a second call of the window
        if f.extra_forward:
            f.backward(leaf(0.9, 1.6, 2.7))
    assert famo.pending
    for view in (famo.pending_sum, famo.pending_count, famo.steps, famo.min_losses):
        scribble(view)
    for value in famo.state_dict().values():
        scribble(value)
    assert_same_state(famo, snapshot(twin))
    for name in ("pending_sum", "pending_count", "steps", "min_losses"):
        assert torch.equal(getattr(famo, name), getattr(twin, name)), name
    for f in (famo, twin):  # and the step taken from the window is the same
        if f.extra_forward:
            f.update([0.7, 1.2, 2.6])
        else:
            f.backward(leaf(0.7, 1.2, 2.6))
    assert_same_state(famo, snapshot(twin))
    assert famo.steps.tolist() == [2.0] * 3


# ---------------------------------------------------------------------- one task, a tensor skip


@contextmanager
def cpu_threads(count: int) -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("missing", [False, True], ids=["shared step", "per-task steps"])
@pytest.mark.parametrize("threads", [2, 1], ids=["op by op", "fused"])
def test_one_task_with_a_tensor_skip_is_the_bool_skip_and_without_it_a_plain_update(
    threads: int, missing: bool
) -> None:
    """k = 1: the logit never moves from a gradient (g = 0), only from weight decay, so it is
    set away from 0 first. ``skip=torch.tensor(b)`` must equal ``skip=b`` bit for bit."""

    def make() -> FAMOWeighting:
        famo = FAMOWeighting(["only"], gamma=0.1, allow_missing_tasks=missing)
        famo.logits.fill_(0.5)
        return famo

    by_tensor, by_bool = make(), make()
    with cpu_threads(threads):
        for skip in (True, False, True, False, False):
            for f in (by_tensor, by_bool):
                f.backward(leaf(1.0))
            by_tensor.update([0.5], skip=torch.tensor(skip))
            by_bool.update([0.5], skip=skip)
            assert_same_state(by_tensor, snapshot(by_bool))
    assert by_bool.steps.tolist() == [3.0]
    assert by_bool.logits.item() < 0.5  # weight decay pulled it towards 0


# ---------------------------------------------------------------------- one process, a group


class Collectives(TorchDispatchMode):
    """Records every torch.distributed collective (the ``c10d`` operators) run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if "c10d" in str(func):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def one_process_group(tmp_path: Path) -> Iterator[None]:
    """An initialised gloo group of one process (``torchrun --nproc_per_node=1``)."""
    if not dist.is_available():
        pytest.skip("this torch has no torch.distributed")
    assert not dist.is_initialized()
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_the_collectives_recorder_sees_an_all_reduce(one_process_group: None) -> None:
    """The recorder below would see famo's collectives: it sees this one."""
    with Collectives() as collectives:
        dist.all_reduce(torch.ones(2))
    assert collectives.seen


def train(famo: FAMOWeighting) -> None:
    """Training calls of every kind, evaluation and a checkpoint round trip."""
    names = famo.task_names
    assert names is not None
    losses = [(1.0, 2.0, 3.0), (0.9, 1.5, 2.9), (0.8, 1.4, 2.8), (0.7, 1.3, 2.5)]
    for before, after in itertools.pairwise(losses):
        famo.backward(leaf(*before))
        if famo.extra_forward:
            famo.update(list(after))
    famo.backward(dict(zip(names[:2], leaf(*losses[0][:2]).unbind(), strict=True)))
    if famo.extra_forward:
        famo.update(dict(zip(names[:2], losses[1][:2], strict=True)))
    with torch.no_grad():
        famo.loss(torch.tensor(losses[0]))
    famo.load_state_dict(famo.state_dict())


@pytest.mark.parametrize("group", ["default", "world"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"extra_forward": False},
        {"warmup_steps": 1, "update_every": 2},
    ],
    ids=["plain", "no extra forward", "schedule"],
)
def test_one_process_in_an_initialised_group_runs_no_collective(
    one_process_group: None, options: dict[str, Any], group: str
) -> None:
    process_group = None if group == "default" else dist.group.WORLD
    famo = FAMOWeighting(
        ["a", "b", "c"], allow_missing_tasks=True, process_group=process_group, **options
    )
    alone = FAMOWeighting(["a", "b", "c"], allow_missing_tasks=True, process_group=False, **options)
    with Collectives() as collectives:
        train(famo)
    train(alone)
    assert collectives.seen == []
    assert_same_state(famo, snapshot(alone))
    assert famo.steps.max() > 0


@pytest.mark.parametrize("missing", [False, True])
@pytest.mark.parametrize(
    "call", ["loss", "update"], ids=["a nan in loss", "a loss below its bound in update"]
)
def test_one_process_in_an_initialised_group_raises_the_errors_of_one_process(
    one_process_group: None, call: str, missing: bool
) -> None:
    """Not "(the mean over the ranks)": there is no other rank."""
    messages = []
    for process_group in (None, False):
        famo = FAMOWeighting(["a", "b"], allow_missing_tasks=missing, process_group=process_group)
        with pytest.raises(ValueError) as refused:
            if call == "loss":
                famo.backward(leaf(1.0, float("nan")))
            else:
                famo.backward(leaf(1.0, 2.0))
                famo.update([-1.0, 1.0])
        messages.append(str(refused.value))
    grouped, alone = messages
    assert "rank" not in grouped
    assert grouped == alone
