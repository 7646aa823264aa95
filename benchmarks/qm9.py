"""QM9 quality: MAE per target and Δm% of each method against single-task models.

The 11 standard targets (μ, α, ε_HOMO, ε_LUMO, ⟨R²⟩, ZPVE, U₀, U, H, G, c_v) of a random subset
of QM9 molecules (qm9pack wheel), predicted by an MLP from fixed per-molecule features (sorted
Coulomb-matrix eigenvalues, element counts, atom count). Each target, minus a least-squares fit
on the element counts (per-element reference values, fitted on the training set), is
standardised for training (MSE per target); the MAE is reported in the CSV's units.

    python -m benchmarks.qm9                 # writes benchmarks/results/qm9.{json,png}
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
from benchmarks.data import QM9, qm9
from benchmarks.methods import DESCRIPTIONS, QUALITY_METHODS
from benchmarks.models import qm9_net
from benchmarks.train import Run, predict, train

METHODS = QUALITY_METHODS
LABELS = ["μ", "α", "ε_HOMO", "ε_LUMO", "⟨R²⟩", "ZPVE", "U₀", "U", "H", "G", "c_v"]
BATCH = 256
LR = 1e-3


def losses_fn(outputs: list[Tensor], targets: Tensor) -> list[Tensor]:
    return [F.mse_loss(out[:, 0], targets[:, i]) for i, out in enumerate(outputs)]


def mae(run: Run, data: QM9) -> list[float]:
    """Test MAE per target in the CSV's units."""
    outputs = predict(run.model, data.test_features)
    return [
        float((out[:, 0] - data.test_targets[:, i]).abs().mean() * data.target_std[i])
        for i, out in enumerate(outputs)
    ]


def summarise(runs: dict[str, list[dict[str, Any]]], k: int) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    stl = runs.get("stl")
    for name, seeds in runs.items():
        entry: dict[str, Any] = {
            "mae": [mean_std([r["mae"][t] for r in seeds]) for t in range(k)],
            "wall_time": mean_std([r["wall_time"] for r in seeds]),
            "cpu_time": mean_std([r.get("cpu_time", float("nan")) for r in seeds]),
        }
        if stl is not None:
            dms = [
                delta_m(r["mae"], s["mae"], [False] * k) for r, s in zip(seeds, stl, strict=True)
            ]
            entry["delta_m"] = mean_std(dms)
            entry["relative_mae"] = [
                mean_std(
                    [
                        (r["mae"][t] - s["mae"][t]) / s["mae"][t]
                        for r, s in zip(seeds, stl, strict=True)
                    ]
                )
                for t in range(k)
            ]
        summary[name] = entry
    return summary


def table(payload: dict[str, Any]) -> str:
    names, units = payload["targets"], payload["units"]
    header = " | ".join(f"{label} ({unit})" for label, unit in zip(LABELS, units, strict=True))
    lines = [
        f"| method | {header} | Δm% ↓ | CPU time (s) | wall time (s) |",
        "|---|" + "---|" * (len(names) + 3),
    ]
    for name, entry in payload["summary"].items():
        cells = [f"{m:.3g}" for m, _ in entry["mae"]]
        dm = entry.get("delta_m")
        dm_text = f"{dm[0]:+.1f} ± {dm[1]:.1f}" if dm is not None else "—"
        lines.append(
            f"| {DESCRIPTIONS[name]} | "
            + " | ".join(cells)
            + f" | {dm_text} | {seconds_cell(entry, 'cpu_time')}"
            + f" | {seconds_cell(entry, 'wall_time')} |"
        )
    return "\n".join(lines)


def plot(payload: dict[str, Any], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_bar, ax_w) = plt.subplots(
        1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1.6, 1]}
    )
    summary = {n: e for n, e in payload["summary"].items() if n != "stl" and "relative_mae" in e}
    k = len(LABELS)
    width = 0.8 / max(1, len(summary))
    for j, (name, entry) in enumerate(summary.items()):
        values = [100 * m for m, _ in entry["relative_mae"]]
        errors = [100 * s for _, s in entry["relative_mae"]]
        xs = [t + (j - (len(summary) - 1) / 2) * width for t in range(k)]
        label = f"{name} (Δm {entry['delta_m'][0]:+.1f}%)"
        ax_bar.bar(xs, values, width, yerr=errors, label=label, capsize=1.5)
    ax_bar.axhline(0, color="black", lw=0.8)
    ax_bar.set_xticks(range(k))
    ax_bar.set_xticklabels(LABELS, rotation=30)
    ax_bar.set_ylabel("test MAE vs single-task (%), lower is better")
    ax_bar.set_title("QM9: per-target MAE relative to single-task models")
    ax_bar.legend(fontsize=7, ncol=2)
    history = payload.get("famo_weights")
    if history and history["weights"]:
        weights = torch.tensor(history["weights"])
        colors = plt.get_cmap("tab20").colors
        for t in range(k):
            style = "-" if t < 6 else "--"
            ax_w.plot(history["steps"], weights[:, t], style, color=colors[t], label=LABELS[t])
        ax_w.axhline(1 / k, color="grey", lw=0.5)
        ax_w.set_yscale("log")
        ax_w.set_xlabel("step")
        ax_w.set_ylabel("FAMO weight z_i")
        ax_w.set_title("FAMO's task weights (seed 0)")
        ax_w.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _weights_history(run: Run | None) -> dict[str, Any] | None:
    """FAMO's weights over training (seed 0), kept in the JSON so the figure can be redrawn."""
    if run is None:
        return None
    weights = torch.round(torch.tensor(run.history_weights), decimals=5)
    return {"seed": 0, "steps": run.history_steps, "weights": weights.tolist()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__ or "")
    p.add_argument("--molecules", type=int, default=20_000)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=METHODS)
    args = p.parse_args(argv)
    folder = out_dir(args)
    single_thread()
    molecules, epochs, seeds = args.molecules, args.epochs, args.seeds
    if args.smoke:
        molecules, epochs, seeds = 600, 1, 1
    data = qm9(n=molecules, seed=0, progress=not args.quiet)
    k = len(data.names)
    steps = epochs * ((len(data.train_features) + BATCH - 1) // BATCH)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.methods}
    famo_run: Run | None = None
    for seed in range(seeds):
        for name in args.methods:
            run = train(
                name,
                lambda: qm9_net(k),
                k,
                data.train_features,
                data.train_targets,
                losses_fn,
                epochs=epochs,
                batch_size=BATCH,
                lr=LR,
                seed=seed,
                record_every=max(1, steps // 300),
                progress=not args.quiet,
                desc=f"{name} seed {seed}",
            )
            runs[name].append(run.record(seed, mae=mae(run, data)))
            if seed == 0 and name == "famo":
                famo_run = run
    payload = {
        "setting": {
            "molecules": molecules,
            "n_train": len(data.train_features),
            "n_test": len(data.test_features),
            "epochs": epochs,
            "batch_size": BATCH,
            "optimizer": f"Adam(lr={LR})",
            "seeds": seeds,
            "features": "sorted Coulomb-matrix eigenvalues (29), element counts (5), atom count",
            "targets": "minus a linear fit on element counts (training set), standardised",
            "loss": "MSE per standardised target",
            "metric": "test MAE in the CSV's units, last epoch",
        },
        "targets": data.names,
        "units": data.units,
        "runs": runs,
        "summary": summarise(runs, k),
        "famo_weights": _weights_history(famo_run),
    }
    write_json(folder, "qm9", payload)
    plot(payload, folder / "qm9.png")
    print(table(payload))
    return payload


if __name__ == "__main__":
    main()
