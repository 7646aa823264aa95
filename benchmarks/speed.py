"""Speed: what does FAMO cost per step next to a summed loss, torchjd and the published code?

Part 1 (overhead): per-step time of loss + backward + update for k = 2 … 100,000 losses that
are elementwise functions of one parameter vector, single thread, all methods interleaved in
one process; reported as ratios to the floor (the same forward, then `losses.sum().backward()`),
with the ATen operations of one step beside them (counted under a dispatch mode: the cost that
does not depend on the machine). famo runs with `validate=False` (no host synchronisation) and,
in a second column, with the default checks. The leaf-loss floor (`leaf.sum().backward()` on a
leaf tensor of losses) is the bare cost of combining k numbers and backpropagating to them. The
straight-line reference (`benchmarks/straight_line.py`) is FAMO's step written as bare eager
PyTorch with the same ATen operations as famo's fast path and no checks or bookkeeping: what
eager PyTorch allows; famo / straight-line is the cost of famo's own Python.

Named dict: losses passed as a dict of k named 0-d tensors (`{"task0": loss_0, …}`, views of one
forward, built outside the timed call) for k = 100, 10,000 and 100,000: famo's `backward(dict)` +
`update(dict)` against summing the same dict (`sum(d.values()).backward()`) and against
`torch.stack(list(d.values())).sum().backward()`, interleaved.

Part 2 (training steps): a whole optimisation step (forward, backward, Adam, and FAMO's extra
forward where used) on the MultiMNIST model (k = 2), the QM9 model (k = 11), and the QM9 trunk
with k = 2 … 128 heads, for the summed loss, famo with and without the extra forward, torchjd's
FAMO, and Jacobian methods from torchjd (MGDA, PCGrad via `mtl_backward`).

    python -m benchmarks.speed               # writes benchmarks/results/speed.{json,png}
    python -m benchmarks.speed --quick       # a fast look (fewer k, rounds, shorter blocks)
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks import methods
from benchmarks.common import out_dir, parser, write_json
from benchmarks.models import multimnist_net, qm9_net
from benchmarks.opcount import count
from benchmarks.published import PublishedFAMO
from benchmarks.straight_line import StraightLineFAMO

OVERHEAD_KS = [2, 10, 100, 1_000, 10_000, 100_000]
NAMED_KS = [100, 10_000, 100_000]
STEP_KS = [2, 8, 32, 128]
FLOOR, STRAIGHT = "sum (floor)", "straight-line"
DICT_SUM, DICT_STACK = "sum(d.values())", "stack, sum"
TARGET_KS = (2, 100, 1_000)  # the k for the per-step targets
Step = Callable[[], None]


def _overhead_steps(k: int) -> dict[str, Step]:
    """One closure per method doing forward + loss + backward + update for k elementwise losses."""
    from torchjd.scalarization import FAMO as TorchJDFAMO

    from famo import FAMOWeighting

    torch.manual_seed(0)
    param = torch.randn(k, requires_grad=True)
    target = torch.randn(k)
    new_losses = ((param.detach() - target) ** 2 + 1.0) * 0.99

    def forward() -> Tensor:
        param.grad = None
        return (param - target) ** 2 + 1.0

    def floor() -> None:
        forward().sum().backward()

    leaf = (forward().detach() + 0.0).requires_grad_()

    def leaf_floor() -> None:
        leaf.grad = None
        leaf.sum().backward()

    reference = StraightLineFAMO(k)

    def straight_line() -> None:
        reference.backward(forward())
        reference.update(new_losses)

    fast = FAMOWeighting(k, validate=False)
    checked = FAMOWeighting(k)

    def famo_fast() -> None:
        fast.backward(forward())
        fast.update(new_losses)

    def famo_checked() -> None:
        checked.backward(forward())
        checked.update(new_losses)

    tjd = TorchJDFAMO(k)

    def torchjd() -> None:
        tjd(forward()).backward()
        tjd.update(new_losses)

    published = PublishedFAMO(k)

    def published_code() -> None:
        published.backward(forward())
        published.update(new_losses)

    return {
        FLOOR: floor,
        "sum (leaf losses)": leaf_floor,
        STRAIGHT: straight_line,
        "famo": famo_fast,
        "famo (validate=True)": famo_checked,
        "torchjd FAMO": torchjd,
        "published code": published_code,
    }


def _time_interleaved(
    steps: dict[str, Step], rounds: int, target_seconds: float
) -> dict[str, float]:
    """Median over `rounds` of the mean seconds per call; methods alternate within each round."""
    for step in steps.values():  # warm up, and size the blocks so a block lasts ~target_seconds
        for _ in range(5):
            step()
    reps: dict[str, int] = {}
    for name, step in steps.items():
        start = time.perf_counter()
        n = 0
        while time.perf_counter() - start < target_seconds / 4:
            step()
            n += 1
        per_call = (time.perf_counter() - start) / n
        reps[name] = max(3, int(target_seconds / per_call))
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(reps[name]):
                step()
            samples[name].append((time.perf_counter() - start) / reps[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def overhead(ks: list[int], rounds: int, target_seconds: float, progress: bool) -> dict[str, Any]:
    from tqdm import tqdm

    rows = {}
    for k in tqdm(ks, desc="overhead", disable=not progress, leave=False):
        steps = _overhead_steps(k)
        for step in steps.values():
            step()  # warm: first-call work (famo's cached offset, say) is not a step's cost
        ops = {name: len(count(step).ops) for name, step in steps.items()}
        seconds = _time_interleaved(steps, rounds, target_seconds)
        floor = seconds[FLOOR]
        rows[str(k)] = {
            "seconds": seconds,
            "ops": ops,
            "ratio_to_floor": {name: s / floor for name, s in seconds.items()},
            "published_over_famo": seconds["published code"] / seconds["famo"],
            "famo_over_straight_line": seconds["famo"] / seconds[STRAIGHT],
        }
    return rows


def ops_per_step(k: int = 2) -> dict[str, int]:
    """ATen operations of FAMO's own step (loss, its backward, update) on a leaf tensor of losses,
    counted as ``tests/test_op_count.py`` does: famo (``validate=False``) and the straight-line
    reference; ``losses.sum().backward()`` for comparison."""
    from famo import FAMOWeighting

    before, after = torch.rand(k) + 0.5, torch.rand(k) + 0.5
    leaf = before.clone().requires_grad_()
    famo = FAMOWeighting(k, validate=False)
    reference = StraightLineFAMO(k)

    def famo_step() -> None:
        famo.loss(leaf).backward()
        with torch.no_grad():
            famo.update(after)

    def straight_line_step() -> None:
        reference.loss(leaf).backward()
        with torch.no_grad():
            reference.update(after)

    def summed() -> None:
        leaf.sum().backward()

    counted = {"famo": famo_step, STRAIGHT: straight_line_step, "losses.sum().backward()": summed}
    for step in counted.values():
        step()  # warm: first-call work is not what a step costs
    return {name: len(count(step).ops) for name, step in counted.items()}


# ------------------------------------------------------------------------------ named dict

DictStep = Callable[[dict[str, Tensor]], None]


def _named_dict_steps(k: int) -> tuple[Callable[[], dict[str, Tensor]], dict[str, DictStep]]:
    """A maker of one step's dict of k named 0-d losses (views of one forward), and one closure
    per method that combines the dict, backpropagates and (famo) updates from a fixed dict."""
    from famo import FAMOWeighting

    torch.manual_seed(0)
    names = [f"task{i}" for i in range(k)]
    param = torch.randn(k, requires_grad=True)
    target = torch.randn(k)
    after = dict(zip(names, (((param.detach() - target) ** 2 + 1.0) * 0.99).unbind(), strict=True))

    def make() -> dict[str, Tensor]:
        param.grad = None
        return dict(zip(names, ((param - target) ** 2 + 1.0).unbind(), strict=True))

    def summed(losses: dict[str, Tensor]) -> None:
        sum(losses.values()).backward()  # type: ignore[union-attr]

    def stacked(losses: dict[str, Tensor]) -> None:
        torch.stack(list(losses.values())).sum().backward()

    famo = FAMOWeighting(names, validate=False)

    def famo_step(losses: dict[str, Tensor]) -> None:
        famo.backward(losses)
        famo.update(after)

    return make, {DICT_SUM: summed, DICT_STACK: stacked, "famo": famo_step}


def _time_prepared(
    make: Callable[[], dict[str, Tensor]],
    steps: dict[str, DictStep],
    rounds: int,
    target_seconds: float,
) -> dict[str, float]:
    """Like `_time_interleaved`, but each call gets a fresh input from `make`, built (and freed)
    outside the timed region; median over `rounds` of the mean seconds per call."""

    def timed(step: DictStep, calls: int) -> float:
        total = 0.0
        for _ in range(calls):
            losses = make()
            start = time.perf_counter()
            step(losses)
            total += time.perf_counter() - start
            del losses
        return total / calls

    reps = {}
    for name, step in steps.items():
        timed(step, 2)  # warm up
        reps[name] = max(1, min(1_000, int(target_seconds / timed(step, 1))))
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            gc.collect()  # every block starts from the same heap (untimed)
            samples[name].append(timed(step, reps[name]))
    return {name: statistics.median(values) for name, values in samples.items()}


def named_dict(ks: list[int], rounds: int, target_seconds: float, progress: bool) -> dict[str, Any]:
    from tqdm import tqdm

    rows = {}
    for k in tqdm(ks, desc="named dict", disable=not progress, leave=False):
        make, steps = _named_dict_steps(k)
        seconds = _time_prepared(make, steps, rounds, target_seconds)
        rows[str(k)] = {
            "seconds": seconds,
            "ratio_to_sum": {name: s / seconds[DICT_SUM] for name, s in seconds.items()},
            "famo_over_stack": seconds["famo"] / seconds[DICT_STACK],
        }
    return rows


# ------------------------------------------------------------------------------ training steps

STEP_METHODS = ["sum", "famo", "famo_no_extra", "torchjd_famo", "mgda", "pcgrad"]


def _training_steps(model_name: str, k: int, batch_size: int) -> dict[str, Step]:
    steps: dict[str, Step] = {}
    for name in STEP_METHODS:
        torch.manual_seed(0)
        if model_name == "multimnist":
            model = multimnist_net(k)
            x = torch.rand(batch_size, 1, 36, 36)
            y = torch.randint(0, 10, (batch_size, k))

            def loss_fn(outputs: list[Tensor], y: Tensor = y) -> list[Tensor]:
                return [F.cross_entropy(o, y[:, i]) for i, o in enumerate(outputs)]

        else:
            model = qm9_net(k)
            x = torch.randn(batch_size, 35)
            y = torch.randn(batch_size, k)

            def loss_fn(outputs: list[Tensor], y: Tensor = y) -> list[Tensor]:
                return [F.mse_loss(o[:, 0], y[:, i]) for i, o in enumerate(outputs)]

        method = methods.make(name, model, k, lr=1e-4, validate=False)

        def compute(
            model: torch.nn.Module = model, x: Tensor = x, loss_fn: Any = loss_fn
        ) -> tuple[Tensor, list[Tensor]]:
            features, outputs = model(x)
            return features, loss_fn(outputs)

        def step(method: methods.Method = method, compute: Any = compute) -> None:
            method.step(compute)

        steps[name] = step
    return steps


def training_steps(
    rounds: int, target_seconds: float, progress: bool, ks: list[int], multimnist: bool = True
) -> dict[str, Any]:
    """Whole training steps: the QM9 model (k = 11), the MultiMNIST model (k = 2) unless
    ``multimnist=False``, and the QM9 trunk with k heads for each k in ``ks``."""
    from tqdm import tqdm

    settings = [("multimnist", 2, 256)] if multimnist else []
    settings += [("qm9", 11, 128)] + [("qm9", k, 128) for k in ks]
    rows = {}
    for model_name, k, batch in tqdm(
        settings, desc="training steps", disable=not progress, leave=False
    ):
        key = f"{model_name} k={k}"
        if key in rows:
            continue
        seconds = _time_interleaved(_training_steps(model_name, k, batch), rounds, target_seconds)
        floor = seconds["sum"]
        rows[key] = {
            "model": model_name,
            "k": k,
            "batch_size": batch,
            "seconds": seconds,
            "ratio_to_sum": {name: s / floor for name, s in seconds.items()},
        }
    return rows


def plot(payload: dict[str, Any], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    rows = payload["overhead"]
    ks = [int(k) for k in rows]
    for name in next(iter(rows.values()))["seconds"]:
        ax1.plot(ks, [rows[str(k)]["seconds"][name] * 1e6 for k in ks], marker="o", label=name)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xticks(ks, [f"{k:,}" for k in ks])
    _plain_log_axes(ax1)
    ax1.set_xlabel("number of tasks k")
    ax1.set_ylabel("µs per step (loss + backward + update)")
    ax1.set_title("FAMO's own cost, 1 thread")
    ax1.legend(fontsize=8)

    steps = {key: row for key, row in payload["training_steps"].items() if row["model"] == "qm9"}
    step_ks = sorted({row["k"] for row in steps.values()})
    for name in STEP_METHODS:
        ax2.plot(
            step_ks,
            [steps[f"qm9 k={k}"]["seconds"][name] * 1e3 for k in step_ks],
            marker="o",
            label=name,
        )
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xticks(step_ks, [str(k) for k in step_ks])
    _plain_log_axes(ax2)
    ax2.set_xlabel("number of tasks k (QM9 MLP, one head per task)")
    ax2.set_ylabel("ms per training step")
    ax2.set_title("whole training step, 1 thread")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plain_log_axes(ax: Any) -> None:
    """Log axes labelled 1, 2, 5, 10, … instead of powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    ax.xaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def _ratio(value: float) -> str:
    return f"{value:.2f}×"


def tables(payload: dict[str, Any]) -> str:
    """Markdown: per-step overhead, the named dict (when measured), whole training steps."""
    rows = payload["overhead"]
    names = list(next(iter(rows.values()))["seconds"])
    straight = STRAIGHT in names
    extra_names = ["famo − floor", "published / famo"]
    if straight:
        extra_names.insert(0, "famo / straight-line")
    lines = [
        "| k | " + " | ".join(names + extra_names) + " |",
        "|---|" + "---|" * (len(names) + len(extra_names)),
    ]
    for k, row in rows.items():
        cells = [
            (
                f"{row['seconds'][n] * 1e6:.0f} µs"
                if n == FLOOR
                else _ratio(row["ratio_to_floor"][n])
            )
            + (f" ({row['ops'][n]} ops)" if "ops" in row else "")
            for n in names
        ]
        if straight:
            cells.append(_ratio(row["seconds"]["famo"] / row["seconds"][STRAIGHT]))
        cells.append(f"{(row['seconds']['famo'] - row['seconds'][FLOOR]) * 1e6:.0f} µs")
        cells.append(f"{row['published_over_famo']:.1f}×")
        lines.append(f"| {int(k):,} | " + " | ".join(cells) + " |")
    lines.append("")
    named = payload.get("named_dict")
    if named:
        lines.append(
            f"| k (named dict) | {DICT_SUM} | {DICT_STACK} | famo | famo / {DICT_SUM} "
            f"| famo / ({DICT_STACK}) |"
        )
        lines.append("|---|---|---|---|---|---|")
        for k, row in named.items():
            sec = row["seconds"]
            lines.append(
                f"| {int(k):,} | {_duration(sec[DICT_SUM])} | {_duration(sec[DICT_STACK])} "
                f"| {_duration(sec['famo'])} | {_ratio(row['ratio_to_sum']['famo'])} "
                f"| {_ratio(row['famo_over_stack'])} |"
            )
        lines.append("")
    step_rows = payload["training_steps"]
    lines.append("| model | " + " | ".join(STEP_METHODS) + " |")
    lines.append("|---|" + "---|" * len(STEP_METHODS))
    for key, row in step_rows.items():
        cells = [
            f"{row['seconds'][n] * 1e3:.2f} ms" if n == "sum" else _ratio(row["ratio_to_sum"][n])
            for n in STEP_METHODS
        ]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds >= 0.1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def check_targets(payload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The targets of issue 19, each with the measured number and whether it is met (``met`` is
    None where this run did not measure it: a smaller run, or a record from before the target).

    Measured on one thread, interleaved in one run: famo within 1.8× of the floor for k ∈ {2,
    100, 1,000}; the published code at least 3× slower than famo (same k); 19 ATen operations
    per step (the straight line's 18 and the commit that makes a step all or nothing); a named
    dict of 100,000 tasks within 2× of summing it; a whole QM9 training step with 11 tasks and
    ``extra_forward=False`` within 3% of a summed loss."""
    overhead = {int(k): row for k, row in payload.get("overhead", {}).items()}
    small = {k: overhead[k] for k in TARGET_KS if k in overhead}
    ks = "k ∈ {" + ", ".join(f"{k:,}" for k in TARGET_KS) + "}"

    def worst(values: dict[int, float], pick: Callable[..., Any]) -> tuple[float | None, str]:
        if not values:
            return None, "not measured"
        k = pick(values, key=values.__getitem__)
        return values[k], f"{values[k]:.2f}× at k = {k:,}"

    famo_ratio, famo_text = worst({k: r["ratio_to_floor"]["famo"] for k, r in small.items()}, max)
    published, published_text = worst({k: r["published_over_famo"] for k, r in small.items()}, min)
    ops = payload.get("ops_per_step", {}).get("famo")
    named = payload.get("named_dict", {}).get("100000")
    dict_ratio = None if named is None else named["ratio_to_sum"]["famo"]
    qm9 = payload.get("training_steps", {}).get("qm9 k=11")
    qm9_ratio = None if qm9 is None else qm9["ratio_to_sum"]["famo_no_extra"]

    def entry(target: str, value: float | None, text: str, met: bool) -> dict[str, Any]:
        return {
            "target": target,
            "value": value,
            "measured": text,
            "met": None if value is None else met,
        }

    return {
        "famo_over_floor": entry(
            f"famo ≤ 1.8× the floor, {ks} (largest)",
            famo_ratio,
            famo_text,
            famo_ratio is not None and famo_ratio <= 1.8,
        ),
        "published_over_famo": entry(
            f"published code ≥ 3× slower than famo, {ks} (smallest)",
            published,
            published_text,
            published is not None and published >= 3.0,
        ),
        "ops_per_step": entry(
            "19 ATen operations per step (loss, backward, update; one is the commit)",
            ops,
            "not measured" if ops is None else f"{ops} operations",
            ops is not None and ops <= 19,
        ),
        "named_dict_100000": entry(
            "named dict of 100,000 tasks ≤ 2× summing it",
            dict_ratio,
            "not measured" if dict_ratio is None else f"{dict_ratio:.2f}×",
            dict_ratio is not None and dict_ratio <= 2.0,
        ),
        "qm9_no_extra_forward": entry(
            "whole QM9 training step, 11 tasks, extra_forward=False, within 3% of a summed loss",
            qm9_ratio,
            "not measured" if qm9_ratio is None else f"{qm9_ratio:.3f}×",
            qm9_ratio is not None and qm9_ratio <= 1.03,
        ),
    }


def details(payload: dict[str, Any]) -> str:
    """What the tables hold and, target by target, whether it is met (for the report)."""
    verdict = {True: "met", False: "not met", None: "not measured"}
    targets = check_targets(payload)  # from the measurements: also right for older records
    met = "\n".join(
        f"- {t['target']}: **{verdict[t['met']]}**"
        + (f" ({t['measured']})" if t["met"] is not None else "")
        for t in targets.values()
    )
    first_row = next(iter(payload["overhead"].values()))
    straight = (
        "; straight-line / floor is what eager PyTorch allows for the same operations, famo / "
        "straight-line what famo's own Python costs beyond them"
        if STRAIGHT in first_row["seconds"]
        else ""
    )
    ops = payload.get("ops_per_step")
    counted = (
        ""
        if not ops
        else " FAMO's own step (loss, backward, update on a leaf tensor of losses) is "
        f"{ops['famo']} ATen operations, the straight-line reference's {ops[STRAIGHT]}, "
        f"`losses.sum().backward()`'s {ops['losses.sum().backward()']}."
    )
    named = (
        " Named-dict table: the time of one call (combine a dict of k named 0-d losses, "
        "backward, and for famo `update` from a dict), then famo as a multiple of each floor."
        if payload.get("named_dict")
        else ""
    )
    return (
        f"{payload['notes']} First table: the floor in µs, the others as multiples of it, with the "
        f"ATen operations of one step (forward included) in brackets{straight}.{counted}{named} "
        "Last table: a whole training step (sum in ms, the others as multiples of it).\n\n"
        f"Targets (one thread, interleaved in one run):\n\n{met}"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__ or "")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seconds", type=float, default=0.15, help="length of one timed block")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a fast look: k ∈ {2, 100, 1,000} and named dicts up to 10,000, 3 rounds of short "
        "blocks, the QM9 model only (about a minute)",
    )
    args = p.parse_args(argv)
    folder = out_dir(args)
    torch.set_num_threads(1)
    ks, named_ks, step_ks = OVERHEAD_KS, NAMED_KS, STEP_KS
    rounds, seconds, models = args.rounds, args.seconds, True
    if args.quick:
        ks, named_ks, step_ks, rounds, seconds, models = (
            [2, 100, 1_000],
            [100, 10_000],
            [],
            3,
            0.05,
            False,
        )
    if args.smoke:
        ks, named_ks, step_ks, rounds, seconds, models = [2, 100], [100], [2], 1, 0.005, True
    payload = {
        "threads": 1,
        "notes": (
            "Part 1: forward (elementwise (p - t)^2 + 1), combine, backward and update; the "
            "after-losses passed to update are a fixed tensor, so no extra forward is timed. "
            "famo runs with validate=False unless stated; straight-line is the same step as bare "
            "eager PyTorch (benchmarks/straight_line.py). Named dict: a dict of k named 0-d "
            "losses, built outside the timed call, combined and backpropagated (famo: "
            "backward(dict) + update(dict), validate=False). Part 2: whole optimisation steps "
            "with Adam; famo's extra forward and torchjd FAMO's are included."
        ),
        "ops_per_step": ops_per_step(),
        "overhead": overhead(ks, rounds, seconds, not args.quiet),
        "named_dict": named_dict(named_ks, rounds, seconds, not args.quiet),
        "training_steps": training_steps(rounds, seconds * 2, not args.quiet, step_ks, models),
    }
    payload["targets"] = check_targets(payload)
    write_json(folder, "speed", payload)
    plot(payload, folder / "speed.png")
    print(tables(payload))
    print()
    print(details(payload))
    return payload


if __name__ == "__main__":
    main()
