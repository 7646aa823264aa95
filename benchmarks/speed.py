"""Speed: what does FAMO cost per step next to a summed loss, torchjd and the published code?

Part 1 (overhead): per-step time of loss + backward + update for k = 2 … 100,000 losses that
are elementwise functions of one parameter vector, single thread, all methods interleaved in
one process; reported as ratios to the floor (the same forward, then `losses.sum().backward()`),
with the ATen operations of one step beside them (counted under a dispatch mode: the cost that
does not depend on the machine). famo runs with `validate=False` (no host synchronisation) and,
in a second column, with the default checks. The leaf-loss floor (`leaf.sum().backward()` on a
leaf tensor of losses) is the bare cost of combining k numbers and backpropagating to them.

Part 2 (training steps): a whole optimisation step (forward, backward, Adam, and FAMO's extra
forward where used) on the MultiMNIST model (k = 2), the QM9 model (k = 11), and the QM9 trunk
with k = 2 … 128 heads, for the summed loss, famo with and without the extra forward, torchjd's
FAMO, and Jacobian methods from torchjd (MGDA, PCGrad via `mtl_backward`).

    python -m benchmarks.speed               # writes benchmarks/results/speed.{json,png}
"""

from __future__ import annotations

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

OVERHEAD_KS = [2, 10, 100, 1_000, 10_000, 100_000]
STEP_KS = [2, 8, 32, 128]
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
        "sum (floor)": floor,
        "sum (leaf losses)": leaf_floor,
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
        ops = {name: len(count(step).ops) for name, step in steps.items()}  # warm already
        seconds = _time_interleaved(steps, rounds, target_seconds)
        floor = seconds["sum (floor)"]
        rows[str(k)] = {
            "seconds": seconds,
            "ops": ops,
            "ratio_to_floor": {name: s / floor for name, s in seconds.items()},
            "published_over_famo": seconds["published code"] / seconds["famo"],
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
    rounds: int, target_seconds: float, progress: bool, ks: list[int]
) -> dict[str, Any]:
    from tqdm import tqdm

    settings = [("multimnist", 2, 256), ("qm9", 11, 128)] + [("qm9", k, 128) for k in ks]
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


def tables(payload: dict[str, Any]) -> str:
    rows = payload["overhead"]
    names = list(next(iter(rows.values()))["seconds"])
    lines = [
        "| k | " + " | ".join(names) + " | famo − floor | published / famo |",
        "|---|" + "---|" * (len(names) + 2),
    ]
    for k, row in rows.items():
        cells = [
            (
                f"{row['seconds'][n] * 1e6:.0f} µs"
                if n == "sum (floor)"
                else f"{row['ratio_to_floor'][n]:.2f}×"
            )
            + (f" ({row['ops'][n]} ops)" if "ops" in row else "")
            for n in names
        ]
        extra = (row["seconds"]["famo"] - row["seconds"]["sum (floor)"]) * 1e6
        lines.append(
            f"| {int(k):,} | "
            + " | ".join(cells)
            + f" | {extra:.0f} µs | {row['published_over_famo']:.1f}× |"
        )
    lines.append("")
    step_rows = payload["training_steps"]
    lines.append("| model | " + " | ".join(STEP_METHODS) + " |")
    lines.append("|---|" + "---|" * len(STEP_METHODS))
    for key, row in step_rows.items():
        cells = [
            f"{row['seconds'][n] * 1e3:.2f} ms" if n == "sum" else f"{row['ratio_to_sum'][n]:.2f}×"
            for n in STEP_METHODS
        ]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_targets(payload: dict[str, Any]) -> dict[str, Any]:
    """Our targets, for k ≤ 1,000 interleaved on one thread: famo within 2× of the floor, the
    published way at least 2× slower than famo; and a whole training step without the extra
    forward within 3% of a summed loss on the MultiMNIST and QM9 models."""
    small = [row for k, row in payload["overhead"].items() if int(k) <= 1_000]
    models = [
        row
        for key, row in payload["training_steps"].items()
        if key in ("multimnist k=2", "qm9 k=11")
    ]
    return {
        "famo_within_2x_of_floor_up_to_1000": all(
            row["ratio_to_floor"]["famo"] <= 2.0 for row in small
        ),
        "published_2x_slower_than_famo_up_to_1000": all(
            row["published_over_famo"] >= 2.0 for row in small
        ),
        "no_extra_forward_within_3pc_of_sum": all(
            row["ratio_to_sum"]["famo_no_extra"] <= 1.03 for row in models
        ),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__ or "")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seconds", type=float, default=0.15, help="length of one timed block")
    args = p.parse_args(argv)
    folder = out_dir(args)
    torch.set_num_threads(1)
    ks, step_ks, rounds, seconds = OVERHEAD_KS, STEP_KS, args.rounds, args.seconds
    if args.smoke:
        ks, step_ks, rounds, seconds = [2, 100], [2], 1, 0.005
    payload = {
        "threads": 1,
        "notes": (
            "Part 1: forward (elementwise (p - t)^2 + 1), combine, backward and update; the "
            "after-losses passed to update are a fixed tensor, so no extra forward is timed. "
            "famo runs with validate=False unless stated. Part 2: whole optimisation steps with "
            "Adam; famo's extra forward and torchjd FAMO's are included."
        ),
        "overhead": overhead(ks, rounds, seconds, not args.quiet),
        "training_steps": training_steps(rounds, seconds * 2, not args.quiet, step_ks),
    }
    payload["targets"] = check_targets(payload)
    write_json(folder, "speed", payload)
    plot(payload, folder / "speed.png")
    print(tables(payload))
    return payload


if __name__ == "__main__":
    main()
