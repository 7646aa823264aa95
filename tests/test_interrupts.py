"""A call is all or nothing: an interrupt at any point of it leaves FAMO as it was or as the call
leaves it, never in between (issue #25).

Ctrl-C, or a scheduler's SIGINT/SIGTERM handler that raises, lands as a ``KeyboardInterrupt``
between two bytecodes; CPython delivers a signal that arrived during a torch operation right
after that operation returns. So the *interrupt points* of a call are the moments right after
each torch call that famo's code makes (everything that reaches ``__torch_function__``: ATen
ops, but also ``.shape``, ``.dtype``, ``._version``). :class:`InterruptAfter`, a torch function
mode, raises ``KeyboardInterrupt`` at one chosen point; the calls the test itself makes (and an
optimizer's own step) are not counted, only those made while a frame of the ``famo`` package is
on the stack.

For every scenario (a path through famo: explicit ``update``, attached, ``extra_forward`` True
and False, accumulation, a learning schedule, missing tasks, ``skip``, ``discard``, new bounds,
a checkpoint load, float64, the fused and the op-by-op Adam) and for every point of its call:

* the interrupt reaches the caller (famo does not swallow it);
* the object's whole state (every ``state_dict`` entry, bit for bit, with its dtype and shape)
  and its public views (``pending``, ``steps``, ``weights``, ``min_losses``, ``loss_weights``)
  are either all those before the call or all those the uninterrupted call leaves;
* training goes on exactly: a user who finds the state as before retries the call, one who
  finds it as after goes on with the next call, and either way the calls that follow return
  the same objectives and end in the same state, bit for bit, as the run that was never
  interrupted. That holds for the interrupted object itself (whose Python-side bookkeeping
  must agree with its buffers) and for a fresh object loaded from its ``state_dict()`` (the
  checkpoint a training script saves when it catches the interrupt).

``loss_weights`` is a view of the last recording call: a call that leaves the state as before
recorded nothing, so it leaves ``loss_weights`` as before too. (It is not in the checkpoint, so
the objects loaded from one are compared without it.)

Two more tests: real ``SIGALRM`` signals at random moments of hundreds of ``update`` and
learning ``loss`` calls (where a signal lands between two bytecodes of famo's Python, not only
after a torch call), and two gloo ranks of which one is interrupted at every point of its call,
before and after its all-reduce (``tests/_scripts/interrupt_ranks.py``).
"""

from __future__ import annotations

import copy
import functools
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

import famo
from famo import FAMOWeighting
from tests._scripts.launch import run_script

K = 3
FAMO_DIR = os.path.join(Path(famo.__file__).resolve().parent, "")

# The losses of successive batches (before a step, after it), for k = 3 tasks.
LOSSES = [
    [1.0, 2.0, 3.0],
    [0.8, 1.9, 2.5],
    [0.7, 1.85, 2.0],
    [0.65, 1.5, 1.9],
    [0.5, 1.45, 1.2],
    [0.45, 1.4, 1.0],
    [0.42, 1.1, 0.9],
    [0.4, 1.0, 0.85],
]


def called_from_famo() -> bool:
    """Whether a frame of the ``famo`` package is on the stack of this torch call."""
    frame = sys._getframe(2)  # the caller of __torch_function__
    while frame is not None:
        if frame.f_code.co_filename.startswith(FAMO_DIR):
            return True
        frame = frame.f_back
    return False


class InterruptAfter(TorchFunctionMode):
    """Raises ``KeyboardInterrupt`` right after famo's torch call number ``point`` (from 0)
    returns; with ``point=None`` it only counts famo's torch calls."""

    def __init__(self, point: int | None = None) -> None:
        super().__init__()
        self.point = point
        self.points = 0
        self.fired = False

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None
    ) -> Any:
        result = func(*args, **(kwargs or {}))
        if called_from_famo():
            point, self.points = self.points, self.points + 1
            if point == self.point:
                self.fired = True
                raise KeyboardInterrupt
        return result


# ---------------------------------------------------------------------------------- one run


class Run:
    """A FAMOWeighting built with a scenario's options, attached or not to a real SGD, and the
    objectives its ``loss`` calls returned."""

    def __init__(self, options: dict[str, Any], attached: bool) -> None:
        self.options = options
        self.famo = FAMOWeighting(options.get("tasks", K), **without(options, "tasks"))
        self.dtype = self.famo.weights.dtype
        # The model is not what is tested: one parameter, so that the hook runs on a real step.
        self.parameter = torch.zeros(2, requires_grad=True)
        self.optimizer = torch.optim.SGD([self.parameter], lr=0.1)
        if attached:
            self.famo.attach(self.optimizer)
        self.objectives: list[Tensor] = []

    def losses(self, values: Sequence[float], *, grad: bool = False) -> Any:
        names = self.famo.task_names
        if names is None:
            return torch.tensor(values, dtype=self.dtype, requires_grad=grad)
        # A mapping; a NaN marks a missing task.
        return {
            name: torch.tensor(value, dtype=self.dtype, requires_grad=grad)
            for name, value in zip(names, values, strict=True)
            if value == value
        }

    def loss(self, values: Sequence[float]) -> None:
        """``famo.loss`` on the losses of a batch, then the caller's ``backward``."""
        objective = self.famo.loss(self.losses(values, grad=True))
        objective.backward()
        self.objectives.append(objective.detach())

    def backward(self, values: Sequence[float]) -> None:
        self.famo.backward(self.losses(values, grad=True))

    def update(self, values: Sequence[float], **kwargs: Any) -> None:
        self.famo.update(self.losses(values), **kwargs)

    def step(self) -> None:
        """The model optimizer's step (with a gradient, so that it moves the parameter)."""
        self.parameter.grad = torch.ones(2)
        self.optimizer.step()


def without(options: dict[str, Any], *names: str) -> dict[str, Any]:
    return {key: value for key, value in options.items() if key not in names}


Script = Callable[[Run], None]


@dataclass(frozen=True)
class Scenario:
    """A path through famo: ``history`` brings a fresh object to where ``call`` starts (the call
    that is interrupted), ``rest`` are the calls a training loop makes after it."""

    history: Script
    call: Script
    rest: Script
    options: dict[str, Any] = field(default_factory=dict)
    attached: bool = False
    threads: int = 2

    def start(self) -> Run:
        run = Run(self.options, self.attached)
        self.history(run)
        return run

    def fresh(self) -> Run:
        return Run(self.options, self.attached)


def steps(*pairs: tuple[int, int]) -> Script:
    """Explicit steps: backward on ``LOSSES[i]``, the optimizer step, update with ``LOSSES[j]``."""

    def script(run: Run) -> None:
        for before, after in pairs:
            run.backward(LOSSES[before])
            run.step()
            run.update(LOSSES[after])

    return script


def then(*scripts: Script) -> Script:
    def script(run: Run) -> None:
        for part in scripts:
            part(run)

    return script


def loss(i: int) -> Script:
    return lambda run: run.loss(LOSSES[i])


def backward(i: int) -> Script:
    return lambda run: run.backward(LOSSES[i])


def update(i: int, **kwargs: Any) -> Script:
    return lambda run: run.update(LOSSES[i], **kwargs)


def optimizer_step(run: Run) -> None:
    run.step()


def discard(run: Run) -> None:
    run.famo.discard()


def assign_bounds(run: Run) -> None:
    run.famo.min_losses = [0.1, 0.0, 0.3]


def learning_losses(first: int, count: int) -> Script:
    """``extra_forward=False``, unattached: each ``loss`` call learns from the one before."""
    return then(*(loss(i) for i in range(first, first + count)))


def attached_losses(first: int, count: int) -> Script:
    """``extra_forward=False``, attached: ``loss``, then the optimizer's step, per batch."""
    return then(*(then(loss(i), optimizer_step) for i in range(first, first + count)))


MISSING = [float("nan"), 1.5, 2.5]  # task "a" is absent from this batch
NAMES = ["a", "b", "c"]


@functools.cache
def a_later_checkpoint() -> dict[str, Any]:
    """A valid checkpoint of another run, 3 steps further, with losses waiting."""
    other = Run({}, False)
    steps((0, 1), (1, 2), (2, 3))(other)
    other.backward(LOSSES[3])
    return copy.deepcopy(other.famo.state_dict())


def load_a_later_checkpoint(run: Run) -> None:
    run.famo.load_state_dict(a_later_checkpoint())


ONE_STEP = steps((0, 1))
TWO_STEPS = steps((2, 3), (3, 4))
F64 = {"dtype": torch.float64}
SCHEDULE = {"warmup_steps": 1, "update_every": 2}
MISSING_TASKS = {"tasks": NAMES, "allow_missing_tasks": True}

SCENARIOS = {
    # extra_forward=True, the explicit loop: backward, optimizer step, update.
    "update": Scenario(then(ONE_STEP, backward(1)), update(2), TWO_STEPS),
    "update, one thread (fused Adam)": Scenario(
        then(ONE_STEP, backward(1)), update(2), TWO_STEPS, threads=1
    ),
    "update, float64": Scenario(then(ONE_STEP, backward(1)), update(2), TWO_STEPS, options=F64),
    "update, float64, one thread": Scenario(
        then(ONE_STEP, backward(1)), update(2), TWO_STEPS, options=F64, threads=1
    ),
    "update of a list": Scenario(
        then(ONE_STEP, backward(1)), lambda run: run.famo.update(LOSSES[2]), TWO_STEPS
    ),
    "first update": Scenario(backward(0), update(1), TWO_STEPS),
    "backward": Scenario(ONE_STEP, backward(1), then(update(2), TWO_STEPS)),
    "loss, then the caller's backward": Scenario(ONE_STEP, loss(1), then(update(2), TWO_STEPS)),
    # Gradient accumulation: two recording calls, then the update of their mean.
    "second loss of a window": Scenario(
        then(ONE_STEP, loss(1)), loss(2), then(update(3), TWO_STEPS)
    ),
    "update after accumulation": Scenario(then(ONE_STEP, loss(1), loss(2)), update(3), TWO_STEPS),
    "update after accumulation, one thread": Scenario(
        then(ONE_STEP, loss(1), loss(2)), update(3), TWO_STEPS, threads=1
    ),
    "update of micro-batch rows": Scenario(
        then(ONE_STEP, loss(1)),
        lambda run: run.famo.update(torch.tensor([LOSSES[2], LOSSES[3]])),
        TWO_STEPS,
    ),
    # Skips, discard, new bounds, a checkpoint load.
    "update(skip=True)": Scenario(then(ONE_STEP, backward(1)), update(2, skip=True), TWO_STEPS),
    "update(skip=tensor(True))": Scenario(
        then(ONE_STEP, backward(1)), update(2, skip=torch.tensor(True)), TWO_STEPS
    ),
    "update(skip=tensor(False))": Scenario(
        then(ONE_STEP, backward(1)), update(2, skip=torch.tensor(False)), TWO_STEPS
    ),
    "discard": Scenario(then(ONE_STEP, backward(1)), discard, TWO_STEPS),
    "min_losses assignment": Scenario(ONE_STEP, assign_bounds, TWO_STEPS),
    "reset": Scenario(then(ONE_STEP, backward(1)), lambda run: run.famo.reset(), TWO_STEPS),
    "reset_parameters": Scenario(
        then(ONE_STEP, backward(1)), lambda run: run.famo.reset_parameters(), TWO_STEPS
    ),
    "load_state_dict": Scenario(
        then(ONE_STEP, backward(1)),
        load_a_later_checkpoint,
        then(update(4), TWO_STEPS),
    ),
    # A learning schedule: the warm-up update, the update that opens a block, the one that
    # fills it (and takes the Adam step).
    "update in warm-up": Scenario(backward(0), update(1), TWO_STEPS, options=SCHEDULE),
    "update opening a block": Scenario(
        then(ONE_STEP, backward(1)), update(2), TWO_STEPS, options=SCHEDULE
    ),
    "update filling a block": Scenario(
        then(steps((0, 1), (1, 2)), backward(2)), update(3), TWO_STEPS, options=SCHEDULE
    ),
    "update filling a block, one thread": Scenario(
        then(steps((0, 1), (1, 2)), backward(2)),
        update(3),
        TWO_STEPS,
        options=SCHEDULE,
        threads=1,
    ),
    # Missing tasks: a mapping without task "a".
    "loss with a task missing": Scenario(
        ONE_STEP,
        lambda run: run.loss(MISSING),
        then(update(2), TWO_STEPS),
        options=MISSING_TASKS,
    ),
    "update with a task missing": Scenario(
        then(ONE_STEP, backward(1)),
        lambda run: run.update(MISSING),
        TWO_STEPS,
        options=MISSING_TASKS,
    ),
    # extra_forward=False: the loss call that takes the pending logit step.
    "learning loss": Scenario(
        learning_losses(0, 2), loss(2), learning_losses(3, 2), options={"extra_forward": False}
    ),
    "learning loss, one thread": Scenario(
        learning_losses(0, 2),
        loss(2),
        learning_losses(3, 2),
        options={"extra_forward": False},
        threads=1,
    ),
    "learning loss with a schedule": Scenario(
        learning_losses(0, 3),
        loss(3),
        learning_losses(4, 3),
        options={"extra_forward": False, **SCHEDULE},
    ),
    # Attached to a real torch.optim.SGD: its step hook, update, loss.
    "attached: the optimizer's step hook": Scenario(
        then(ONE_STEP, backward(1)), optimizer_step, then(update(2), TWO_STEPS), attached=True
    ),
    "attached: update": Scenario(
        then(ONE_STEP, backward(1), optimizer_step), update(2), TWO_STEPS, attached=True
    ),
    "attached: update with no step": Scenario(
        then(ONE_STEP, backward(1)), update(2), TWO_STEPS, attached=True
    ),
    "attached, extra_forward=False: the step hook": Scenario(
        then(attached_losses(0, 1), loss(1)),
        optimizer_step,
        attached_losses(2, 2),
        options={"extra_forward": False},
        attached=True,
    ),
    "attached, extra_forward=False: learning loss": Scenario(
        attached_losses(0, 2),
        loss(2),
        then(optimizer_step, attached_losses(3, 2)),
        options={"extra_forward": False},
        attached=True,
    ),
    "attached, extra_forward=False: loss with no step": Scenario(
        then(attached_losses(0, 1), loss(1)),
        loss(2),
        then(optimizer_step, attached_losses(3, 2)),
        options={"extra_forward": False},
        attached=True,
    ),
}


def test_the_interrupt_points_are_the_torch_calls_famo_makes() -> None:
    """The check of the checks: famo's calls are counted (else every scenario would pass with
    no point), the test's own are not, and the interrupt lands at the chosen one."""
    run = SCENARIOS["update"].start()
    with InterruptAfter() as counter:
        assert torch.ones(K).add(1.0).shape == (K,)  # the test's own calls: not points
        assert counter.points == 0
        run.famo.update(torch.tensor(LOSSES[2]))
    assert counter.points > 10
    run = SCENARIOS["update"].start()
    interrupt = InterruptAfter(counter.points - 1)
    with pytest.raises(KeyboardInterrupt), interrupt:
        run.famo.update(torch.tensor(LOSSES[2]))
    assert interrupt.fired  # (a rollback may make more calls after it)


# ---------------------------------------------------------------------------------- the state


def state_of(famo: FAMOWeighting, *, views: bool = True) -> dict[str, Any]:
    """Everything a user can observe of the object's state, copied: each ``state_dict`` entry
    and (``views``) the public views."""
    state: dict[str, Any] = {
        key: value.clone() if isinstance(value, Tensor) else copy.deepcopy(value)
        for key, value in famo.state_dict().items()
    }
    state["pending"] = famo.pending
    state["steps"] = famo.steps
    state["weights"] = famo.weights
    state["min_losses"] = famo.min_losses
    if views:
        state["loss_weights"] = famo.loss_weights
    return state


def differences(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """The entries where ``found`` is not ``expected`` bit for bit (value, dtype, shape)."""
    if found.keys() != expected.keys():
        return [f"keys {sorted(found.keys() ^ expected.keys())}"]
    return [key for key in expected if not identical(found[key], expected[key])]


def identical(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def outcome(run: Run, scenario: Scenario) -> dict[str, Any]:
    """What the rest of the training returns and leaves (the loaded objects have no
    ``loss_weights`` until their next ``loss``: not part of the checkpoint)."""
    run.objectives = []
    scenario.rest(run)
    return {"objectives": run.objectives, **state_of(run.famo, views=False)}


def go_on(run: Run, scenario: Scenario, *, retry: bool) -> dict[str, Any]:
    if retry:
        scenario.call(run)
    return outcome(run, scenario)


def points_of(scenario: Scenario) -> int:
    run = scenario.start()
    with InterruptAfter() as counter:
        scenario.call(run)
    return counter.points


def torn_points(scenario: Scenario) -> tuple[int, list[str]]:
    """How many interrupt points the scenario's call has, and those where the state is torn or
    training does not go on exactly (none when the call is all or nothing)."""
    before = state_of(scenario.start().famo)
    finished = scenario.start()
    scenario.call(finished)
    after = state_of(finished.famo)
    expected = outcome(finished, scenario)
    # The check itself: resumes from the checkpoints before and after the call go on as the
    # uninterrupted run does.
    for retry, checkpoint in ((True, scenario.start()), (False, scenario.start())):
        if not retry:
            scenario.call(checkpoint)
        resumed = scenario.fresh()
        resumed.famo.load_state_dict(checkpoint.famo.state_dict())
        assert not differences(go_on(resumed, scenario, retry=retry), expected)

    points = points_of(scenario)
    failures = []
    for point in range(points):
        try:
            failures += failures_at(scenario, point, before, after, expected)
        except Exception as error:  # a torn state that famo itself refuses to read or load
            failures.append(f"point {point}: {type(error).__name__}: {str(error)[:200]}")
    return points, failures


def failures_at(
    scenario: Scenario,
    point: int,
    before: dict[str, Any],
    after: dict[str, Any],
    expected: dict[str, Any],
) -> list[str]:
    run = scenario.start()
    with pytest.raises(KeyboardInterrupt), InterruptAfter(point):
        scenario.call(run)
    found = state_of(run.famo)
    as_before, as_after = differences(found, before), differences(found, after)
    if as_before and as_after:
        return [f"point {point}: torn: {as_before} differ from before, {as_after} from after"]
    retry = not as_before  # as before: the user calls again; as after: goes on
    loaded = scenario.fresh()
    loaded.famo.load_state_dict(run.famo.state_dict())
    failures = []
    for name, continued in (("the object", run), ("its checkpoint", loaded)):
        wrong = differences(go_on(continued, scenario, retry=retry), expected)
        if wrong:
            state = "before" if retry else "after"
            failures.append(f"point {point}: state as {state}, but {name} goes on with {wrong}")
    return failures


@pytest.mark.parametrize("name", SCENARIOS)
def test_an_interrupt_at_any_point_of_a_call_leaves_the_state_before_or_after(name: str) -> None:
    scenario = SCENARIOS[name]
    before = torch.get_num_threads()
    torch.set_num_threads(scenario.threads)
    try:
        points, failures = torn_points(scenario)
    finally:
        torch.set_num_threads(before)
    assert not failures, f"{len(failures)} failures at {points} points:\n" + "\n".join(
        failures[:12]
    )


# ---------------------------------------------------------------------------------- real signals


FamoCall = Callable[[FAMOWeighting, Tensor], Any]


@dataclass(frozen=True)
class Signalled:
    """A call that real signals interrupt: ``prepare`` (not interrupted) records the losses it
    needs, ``call`` is interrupted."""

    options: dict[str, Any]
    prepare: FamoCall
    call: FamoCall


SIGNALLED = {
    "update": Signalled(
        {},
        lambda famo, losses: famo.backward(losses + 0.5),
        lambda famo, losses: famo.update(losses),
    ),
    "learning loss": Signalled(
        {"extra_forward": False}, lambda famo, losses: None, lambda famo, losses: famo.loss(losses)
    ),
}


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="no interval timer here")
@pytest.mark.parametrize("threads", [1, 2], ids=["fused Adam", "op-by-op Adam"])
@pytest.mark.parametrize("name", SIGNALLED)
def test_a_real_signal_at_a_random_moment_of_a_call_leaves_the_state_before_or_after(
    name: str, threads: int
) -> None:
    """SIGALRM, whose handler raises ``KeyboardInterrupt``, timed to land at a random moment of
    each of many calls. Where it lands varies from run to run; what is checked does not: the
    state is that before the call (then the retried call ends where the uninterrupted one does)
    or that after it, and the object goes on in lockstep with a twin never interrupted."""
    signalled = SIGNALLED[name]
    generator = random.Random(0)
    armed = False

    def interrupt(signum: int, frame: Any) -> None:
        nonlocal armed
        if armed:
            armed = False
            raise KeyboardInterrupt

    def batch() -> Tensor:
        return torch.tensor([generator.uniform(0.5, 3.0) for _ in range(K)], requires_grad=True)

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    previous_handler = signal.signal(signal.SIGALRM, interrupt)
    try:
        famo = FAMOWeighting(K, **signalled.options)
        duration = 0.0
        for _ in range(100):
            signalled.prepare(famo, batch())
            losses = batch()
            started = time.perf_counter()
            signalled.call(famo, losses)
            duration += (time.perf_counter() - started) / 100
        interrupted = 0
        for _ in range(500):
            signalled.prepare(famo, batch())
            losses = batch()
            twin = copy.deepcopy(famo)
            signalled.call(twin, losses)
            before, after = state_of(famo), state_of(twin)
            try:
                armed = True
                signal.setitimer(signal.ITIMER_REAL, generator.uniform(1e-6, 1.2 * duration))
                signalled.call(famo, losses)
                armed = False
            except KeyboardInterrupt:
                interrupted += 1
            finally:
                armed = False
                signal.setitimer(signal.ITIMER_REAL, 0)
                # A signal that lands inside a context manager's __enter__ (``no_grad`` in
                # ``Tensor.__deepcopy__``, say) leaves torch's grad mode off: not famo's state.
                torch.set_grad_enabled(True)
            found = state_of(famo)
            as_before, as_after = differences(found, before), differences(found, after)
            assert not (as_before and as_after), f"torn: {as_before} / {as_after}"
            if not as_before:
                signalled.call(famo, losses)  # the user retries
            assert not differences(state_of(famo), after)
        assert interrupted > 0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        torch.set_num_threads(previous_threads)
        torch.set_grad_enabled(True)


# ---------------------------------------------------------------------------------- several ranks


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, list[dict[str, Any]]]]:
    out = tmp_path_factory.mktemp("interrupt_ranks") / "ranks.pt"
    run_script(
        Path(__file__).resolve().parent / "_scripts" / "interrupt_ranks.py", str(out), ranks=2
    )
    results: list[dict[str, list[dict[str, Any]]]] = torch.load(out)
    return results


@pytest.mark.skipif(
    not torch.distributed.is_available(), reason="this torch has no torch.distributed"
)
@pytest.mark.parametrize("call", ["update", "learning loss"])
def test_an_interrupt_on_one_rank_leaves_each_ranks_state_before_or_after(
    ranks: list[dict[str, list[dict[str, Any]]]], call: str
) -> None:
    """Two gloo ranks share one state; rank 1's call is interrupted at each of its points while
    rank 0's runs through (see ``tests/_scripts/interrupt_ranks.py``). Rank 1 must be as before
    or as after wherever the interrupt lands, before its all-reduce (then its retry ends as
    after) or after it; rank 0 as after."""
    first, second = ranks[0][call], ranks[1][call]
    assert len(first) == len(second) > 0
    # The points after the all-reduce, where the ranks' calls have already agreed, are tested.
    assert any(record.get("collectives", (0, 0))[0] > 0 for record in second)
    failures = []
    for ran, interrupted in zip(first, second, strict=True):
        point = interrupted["point"]
        if interrupted["state"] not in ("before", "after"):
            failures.append(f"point {point}: rank 1 {interrupted['state']}")
        if interrupted.get("retried", "after") != "after":
            failures.append(f"point {point}: rank 1 retried, then {interrupted['retried']}")
        if not interrupted.get("released") and ran["state"] != "after":
            failures.append(f"point {point}: rank 0 {ran['state']}")
    assert not failures, f"{len(failures)} failures at {len(first)} points:\n" + "\n".join(
        failures[:12]
    )
