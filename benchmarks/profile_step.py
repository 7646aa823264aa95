"""Where does a FAMO step's time go? cProfile over N steps, and each call timed on its own.

Runs the step of ``benchmarks/speed.py``'s part 1 (an elementwise forward of k losses, then
``famo.backward`` and ``famo.update`` with fixed after-losses) on one thread:

1. N steps under cProfile: the top functions by cumulative time and by own time (what famo's
   Python costs, call by call);
2. without the profiler, each call timed on its own, step after step, interleaved with the
   straight-line reference (``benchmarks/straight_line.py``: the same ATen operations, no
   bookkeeping) and the summed loss: ``loss``, the autograd backward of its result, ``update``,
   and ``backward`` (loss + its backward in one call), in µs per call.

    python -m benchmarks.profile_step                       # k = 2, 20,000 steps
    python -m benchmarks.profile_step --k 1000 --form dict  # losses as a dict of named tasks
    python -m benchmarks.profile_step --save step.prof      # also keep the raw profile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from benchmarks.straight_line import StraightLineFAMO

FORMS = ("tensor", "list", "dict")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--k", type=int, default=2, help="number of tasks (default 2)")
    p.add_argument("--steps", type=int, default=20_000, help="profiled steps (default 20,000)")
    p.add_argument(
        "--timed-steps", type=int, default=None, help="steps of the per-call timing (default N)"
    )
    p.add_argument("--form", choices=FORMS, default="tensor", help="how the losses are passed")
    p.add_argument("--validate", action="store_true", help="famo with validate=True")
    p.add_argument(
        "--no-extra-forward",
        action="store_true",
        help="famo with extra_forward=False: backward only, it updates itself",
    )
    p.add_argument("--top", type=int, default=25, help="rows of each profile table")
    p.add_argument("--save", default=None, help="write the raw cProfile stats to this file")
    return p


class Setup:
    """The forward, the famo object and its after-losses in the chosen form."""

    def __init__(self, k: int, form: str, *, validate: bool, extra_forward: bool) -> None:
        from famo import FAMOWeighting

        torch.manual_seed(0)
        self.k, self.form, self.extra_forward = k, form, extra_forward
        self.names = [f"task{i}" for i in range(k)]
        self.param = torch.randn(k, requires_grad=True)
        self.target = torch.randn(k)
        after = ((self.param.detach() - self.target) ** 2 + 1.0) * 0.99
        self.after_tensor = after
        self.after = self.as_form(after)
        tasks: Any = self.names if form == "dict" else k
        self.famo = FAMOWeighting(tasks, validate=validate, extra_forward=extra_forward)
        self.reference = StraightLineFAMO(k)

    def as_form(self, losses: Tensor) -> Any:
        if self.form == "list":
            return list(losses.unbind())
        if self.form == "dict":
            return dict(zip(self.names, losses.unbind(), strict=True))
        return losses

    def forward(self) -> Any:
        self.param.grad = None
        return self.as_form((self.param - self.target) ** 2 + 1.0)

    def as_tensor(self, losses: Any) -> Tensor:
        """What the straight-line reference gets: one ``torch.stack`` for a list or a dict."""
        if self.form == "dict":
            return torch.stack(list(losses.values()))
        if self.form == "list":
            return torch.stack(losses)
        return losses  # type: ignore[no-any-return]

    def famo_step(self) -> None:
        self.famo.backward(self.forward())
        if self.extra_forward:
            self.famo.update(self.after)


def profile(setup: Setup, steps: int, top: int, save: str | None) -> str:
    for _ in range(100):
        setup.famo_step()  # warm
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        setup.famo_step()
    profiler.disable()
    if save:
        profiler.dump_stats(save)
    out = io.StringIO()
    for key, title in (("cumulative", "cumulative time"), ("tottime", "own time")):
        out.write(f"\n=== {steps:,} famo steps under cProfile: top {top} by {title} ===\n")
        stats = pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(key)
        stats.print_stats(top)
    return out.getvalue()


def time_calls(setup: Setup, steps: int) -> dict[str, dict[str, float]]:
    """µs per call (median and mean over ``steps``), each call timed on its own; famo, the
    straight-line reference and the summed loss alternate step by step."""
    famo, reference = setup.famo, setup.reference
    after, after_tensor = setup.after, setup.after_tensor
    clock = time.perf_counter
    samples: dict[str, list[float]] = {}

    def add(name: str, seconds: float) -> None:
        samples.setdefault(name, []).append(seconds * 1e6)

    def famo_split() -> None:
        losses = setup.forward()
        t0 = clock()
        objective = famo.loss(losses)
        t1 = clock()
        objective.backward()
        t2 = clock()
        add("famo: loss", t1 - t0)
        add("famo: autograd backward of loss", t2 - t1)
        if setup.extra_forward:
            famo.update(after)
            add("famo: update", clock() - t2)

    def famo_backward() -> None:
        losses = setup.forward()
        t0 = clock()
        famo.backward(losses)
        t1 = clock()
        add("famo: backward (loss + its backward)", t1 - t0)
        if setup.extra_forward:
            famo.update(after)
            add("famo: step (backward + update)", clock() - t0)

    def straight_line() -> None:
        losses = setup.forward()
        t0 = clock()
        objective = reference.loss(setup.as_tensor(losses))
        t1 = clock()
        objective.backward()
        t2 = clock()
        reference.update(after_tensor)
        t3 = clock()
        add("straight-line: loss", t1 - t0)
        add("straight-line: autograd backward of loss", t2 - t1)
        add("straight-line: update", t3 - t2)
        add("straight-line: step", t3 - t0)

    def summed() -> None:
        losses = setup.forward()
        t0 = clock()
        if setup.form == "tensor":
            total = losses.sum()
        else:  # summing the list or dict item by item, as a user would
            total = sum(losses.values() if setup.form == "dict" else losses)
        total.backward()
        add("sum: combine + backward", clock() - t0)

    runs: list[Callable[[], None]] = [famo_split, famo_backward, straight_line, summed]
    for _ in range(100):
        for run in runs:
            run()
    samples.clear()
    for _ in range(steps):
        for run in runs:
            run()
    return {
        name: {"median": statistics.median(values), "mean": statistics.fmean(values)}
        for name, values in samples.items()
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = _parser().parse_args(argv)
    torch.set_num_threads(1)
    setup = Setup(
        args.k, args.form, validate=args.validate, extra_forward=not args.no_extra_forward
    )
    print(
        f"famo step, k = {args.k:,}, losses as a {args.form}, validate={args.validate}, "
        f"extra_forward={not args.no_extra_forward}, torch {torch.__version__}, 1 thread"
    )
    print(profile(setup, args.steps, args.top, args.save))
    timed_steps = args.steps if args.timed_steps is None else args.timed_steps
    times = time_calls(setup, timed_steps)
    print(f"=== µs per call, each call timed on its own over {timed_steps:,} steps ===")
    width = max(len(name) for name in times)
    print(f"{'call':<{width}}  {'median':>9}  {'mean':>9}")
    for name, value in times.items():
        print(f"{name:<{width}}  {value['median']:9.1f}  {value['mean']:9.1f}")
    return times


if __name__ == "__main__":
    main()
