"""The cost of a FAMO step, counted in ATen operations under a dispatch mode (deterministic).

``docs/design.md`` §3 describes the common call: with ``validate=False`` and no task missing, a
training step (``loss``, its backward, ``update``) is 19 operations, ``update`` alone 10, and none
of them makes the host wait for the device. One of the 19 is the commit that makes ``update`` all
or nothing (one ``_foreach_copy_`` of the step into the state); recording a call's losses is one
``_foreach_add_`` (a copy, never an alias of the caller's tensor). ``losses.sum().backward()`` is 5
for comparison (``benchmarks/speed.py`` reports both beside its timings). Each extra ``loss`` call
of an accumulation window adds exactly its own operations, and the window's ``update`` two (the
log of the mean).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from benchmarks.opcount import CountOps, count
from famo import FAMOWeighting, functional

FUSED = functional.fused_adam_available(torch.device("cpu"))
# Limits: with torch's fused Adam (on one CPU thread, or an accelerator), and op by op (several
# CPU threads, or a torch without the kernel).
STEP_LIMIT, UPDATE_LIMIT = (19, 10) if FUSED else (38, 29)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Where the fused kernel runs on the CPU (several threads take the op-by-op Adam)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SYNCS = {"aten._local_scalar_dense.default", "aten.item.default"}


def assert_no_host_sync(counter: CountOps) -> None:
    assert not SYNCS & set(counter.names), counter.names
    copies = [op for op in counter.ops if str(op).startswith("aten._to_copy")]
    assert copies == [], copies  # a device-to-host copy would show here


@pytest.mark.parametrize("k", [2, 1000])
def test_a_step_takes_at_most_19_operations_and_update_10(k: int) -> None:
    famo = FAMOWeighting(k, validate=False)
    before, after = torch.rand(k) + 0.5, torch.rand(k) + 0.5

    def loss_and_backward() -> None:
        famo.loss(leaf).backward()

    def update() -> None:
        with torch.no_grad():
            famo.update(after)

    leaf = before.clone().requires_grad_()
    loss_and_backward()
    update()  # warm: first-call work (none expected) is not what a step costs
    forward = count(loss_and_backward)
    learn = count(update)
    total = len(forward.ops) + len(learn.ops)
    print(
        f"k={k}: {total} ops per step ({len(forward.kernels) + len(learn.kernels)} kernels), "
        f"update {len(learn.ops)}: {learn.names}"
    )
    assert total <= STEP_LIMIT, forward.names + learn.names
    assert len(learn.ops) <= UPDATE_LIMIT, learn.names
    for counter in (forward, learn):
        assert_no_host_sync(counter)


def test_each_extra_call_of_an_accumulation_window_costs_only_its_own_operations() -> None:
    famo = FAMOWeighting(3, validate=False)
    losses = torch.tensor([1.0, 2.0, 3.0])

    def window(calls: int) -> Callable[[], None]:
        def run() -> None:
            for _ in range(calls):
                famo.loss(leaves.pop()).backward()
            with torch.no_grad():
                famo.update(losses * 0.9)

        return run

    leaves = [losses.clone().requires_grad_() for _ in range(10)]
    window(1)()  # warm
    lone_call = count(lambda: famo.loss(leaves.pop()).backward())
    famo.discard()
    one, two, three = (len(count(window(n)).ops) for n in (1, 2, 3))
    per_call = len(lone_call.ops)
    assert three - two == per_call  # the running sum and count: the call's one _foreach_add_
    assert two - one == per_call + 2  # ... and, once per window, the log of the mean


def test_without_the_extra_forward_a_step_is_even_cheaper() -> None:
    famo = FAMOWeighting(2, validate=False, extra_forward=False)
    losses = torch.tensor([1.0, 2.0])
    for _ in range(2):
        famo.loss(losses.clone().requires_grad_()).backward()
    leaf = losses.clone().requires_grad_()
    counter = count(lambda: famo.loss(leaf).backward())
    assert len(counter.ops) <= STEP_LIMIT - 2, counter.names
    assert_no_host_sync(counter)


def test_validation_is_the_one_host_sync() -> None:
    famo = FAMOWeighting(2)  # validate=True
    leaf = torch.tensor([1.0, 2.0], requires_grad=True)
    counter = count(lambda: famo.loss(leaf).backward())
    assert counter.names.count("aten._local_scalar_dense.default") == 1


def test_on_several_cpu_threads_the_adam_step_runs_op_by_op() -> None:
    famo = FAMOWeighting(2, validate=False)
    leaf = torch.tensor([1.0, 2.0], requires_grad=True)
    famo.loss(leaf).backward()
    torch.set_num_threads(2)
    learn = count(lambda: famo.update(torch.tensor([0.9, 1.8])))
    assert "aten._fused_adam_.default" not in learn.names
    assert len(learn.ops) <= 29, learn.names
    assert_no_host_sync(learn)
