"""famo at another commit against the working tree: the per-step overhead, before and after.

A change to famo's core should say what it does to speed, measured on one machine in one run.
This takes famo's package at ``--before`` (a git revision: ``git archive`` into a temporary
folder) and the working tree's, and times each in its own process, alternating the processes
round by round (``--rounds``) so that both meet the same machine noise. Each process times the
same step as ``benchmarks.speed``'s part 1 (``loss`` + ``backward`` + ``update`` with
``validate=False`` for k losses that are elementwise functions of one parameter vector, one
thread) interleaved with the floor (the same forward, then ``losses.sum().backward()``) and the
straight-line reference (:mod:`benchmarks.straight_line`), and reports per-step times; the
table gives the median over rounds of each ratio to the floor and to the straight line.

    python -m benchmarks.compare --before HEAD~3            # the working tree against HEAD~3
    python -m benchmarks.compare --before v0.3.0 --k 2 1000 --rounds 9
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def measure(ks: list[int], blocks: int, calls: int) -> dict[int, dict[str, float]]:
    """Median seconds per step of each method, for each k, in this process (one thread)."""
    import torch

    torch.set_num_threads(1)
    return {k: _time_steps(_steps(k), blocks, calls) for k in ks}


def _steps(k: int) -> dict[str, Callable[[], None]]:
    import torch

    from benchmarks.straight_line import StraightLineFAMO
    from famo import FAMOWeighting

    torch.manual_seed(0)
    parameters = torch.randn(k, requires_grad=True)
    target = torch.randn(k)
    after = ((parameters.detach() - target) ** 2 + 1.0) * 0.99

    def forward() -> torch.Tensor:
        parameters.grad = None
        return (parameters - target) ** 2 + 1.0

    def floor() -> None:
        forward().sum().backward()

    def stepper(weighting: Any) -> Callable[[], None]:
        def step() -> None:
            weighting.loss(forward()).backward()
            with torch.no_grad():
                weighting.update(after)

        return step

    return {
        "floor": floor,
        "straight": stepper(StraightLineFAMO(k)),
        "famo": stepper(FAMOWeighting(k, validate=False)),
    }


def _time_steps(steps: dict[str, Callable[[], None]], blocks: int, calls: int) -> dict[str, float]:
    for step in steps.values():  # warm
        for _ in range(calls):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(blocks):
        for name, step in steps.items():
            gc.disable()
            start = time.perf_counter()
            for _ in range(calls):
                step()
            times[name].append((time.perf_counter() - start) / calls)
            gc.enable()
    return {name: statistics.median(values) for name, values in times.items()}


def unpack(revision: str, into: Path) -> None:
    """famo's package as it was at ``revision``, into ``into/famo``."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", revision, "famo"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")


def run_once(
    path: list[Path], ks: list[int], blocks: int, calls: int
) -> dict[str, dict[str, float]]:
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, path)))
    command = [sys.executable, "-m", "benchmarks.compare", "--worker", "--k", *map(str, ks)]
    command += ["--blocks", str(blocks), "--calls", str(calls)]
    # (From the first folder: `-m` puts the working folder first on the path.)
    output = subprocess.run(
        command, cwd=path[0], env=environment, check=True, capture_output=True, text=True
    ).stdout
    found = json.loads(output.splitlines()[-1])
    imported = Path(found.pop("famo")).resolve()
    if not imported.is_relative_to(path[0].resolve() / "famo"):
        raise RuntimeError(f"The worker imported famo from {imported}, not from {path[0]}.")
    return found  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="a git revision of famo to compare against")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 100, 1000])
    parser.add_argument("--rounds", type=int, default=15, help="processes per side")
    parser.add_argument("--blocks", type=int, default=5, help="timed blocks per process")
    parser.add_argument("--calls", type=int, default=300, help="steps per timed block")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import famo

        found = {"famo": famo.__file__, **measure(args.k, args.blocks, args.calls)}
        print(json.dumps(found))
        return
    if not args.before:
        parser.error("--before REVISION is needed (for example HEAD~1)")
    with tempfile.TemporaryDirectory() as folder:
        unpack(args.before, Path(folder))
        sides = {"before": [Path(folder), ROOT], "after": [ROOT]}
        ratios: dict[str, dict[str, dict[str, list[float]]]] = {
            side: {str(k): {"floor": [], "straight": [], "us": []} for k in args.k}
            for side in sides
        }
        for round_ in range(args.rounds):
            order = list(sides) if round_ % 2 == 0 else list(sides)[::-1]
            for side in order:
                found = run_once(sides[side], args.k, args.blocks, args.calls)
                for k, times in found.items():
                    into = ratios[side][k]
                    into["floor"].append(times["famo"] / times["floor"])
                    into["straight"].append(times["famo"] / times["straight"])
                    into["us"].append(times["famo"] * 1e6)
            print(f"round {round_ + 1}/{args.rounds}", file=sys.stderr)
    print(f"famo at {args.before} (before) and the working tree (after), {args.rounds} rounds")
    print("| k | before | after | after / floor | after / straight line | after / before |")
    print("|---|---|---|---|---|---|")
    for k in map(str, args.k):
        before = {key: statistics.median(v) for key, v in ratios["before"][k].items()}
        after = {key: statistics.median(v) for key, v in ratios["after"][k].items()}
        print(
            f"| {int(k):,} | {before['us']:.1f} µs ({before['floor']:.2f}× floor) "
            f"| {after['us']:.1f} µs | {after['floor']:.2f}× (was {before['floor']:.2f}×) "
            f"| {after['straight']:.2f}× (was {before['straight']:.2f}×) "
            f"| {after['floor'] / before['floor']:.3f} |"
        )


if __name__ == "__main__":
    main()
