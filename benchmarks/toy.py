"""The paper's two-task toy (``docs/design.md`` §7): does each method reach the Pareto front?

Five starts, Adam (lr 1e-3) on the point for 50,000 steps, with a summed loss and with FAMO
(γ = 0 as in the paper, and γ = 1e-3, 1e-5). A run *reaches the front* when the min-norm convex
combination of the two task gradients at its end point is below `--tol` (Pareto stationarity).

    python -m benchmarks.toy            # writes benchmarks/results/toy.{json,png}
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from benchmarks.common import out_dir, parser, single_thread, write_json

STARTS = [(-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0)]
MIN_LOSSES = (-2.1, -21.0)
F1_SCALE = 0.1
LOWER = 5e-6
METHODS: dict[str, float | None] = {  # name -> FAMO's gamma (None: summed loss)
    "sum": None,
    "famo (γ=0)": 0.0,
    "famo (γ=1e-3)": 1e-3,
    "famo (γ=1e-5)": 1e-5,
}


def toy_losses(x: Tensor) -> Tensor:
    """f1, f2 of the official `experiments/toy/problem.py` for points x (..., 2) → (..., 2).

    f1 carries the 0.1 scale that the FAMO paper adds to make the two losses imbalanced.
    """
    x1, x2 = x[..., 0], x[..., 1]
    f1 = torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), LOWER).log() + 6
    f2 = torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), LOWER).log() + 6
    c1 = torch.clamp(torch.tanh(x2 * 0.5), 0)
    f1_sq = ((-x1 + 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    f2_sq = ((-x1 - 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    c2 = torch.clamp(torch.tanh(-x2 * 0.5), 0)
    f1 = f1 * c1 + f1_sq * c2
    f2 = f2 * c1 + f2_sq * c2
    return torch.stack([F1_SCALE * f1, f2], dim=-1)


def pareto_gap(x: Tensor) -> Tensor:
    """Norm of the min-norm convex combination of ∇f1 and ∇f2 at each point of x (n, 2)."""
    x = x.detach().clone().requires_grad_(True)
    f = toy_losses(x)
    g1 = torch.autograd.grad(f[:, 0].sum(), x, retain_graph=True)[0]
    g2 = torch.autograd.grad(f[:, 1].sum(), x)[0]
    diff = g1 - g2
    alpha = ((g2 - g1) * g2).sum(-1) / diff.pow(2).sum(-1).clamp_min(1e-30)
    alpha = alpha.clamp(0.0, 1.0).unsqueeze(-1)
    return (alpha * g1 + (1 - alpha) * g2).norm(dim=-1)


def run(
    gamma: float | None,
    steps: int,
    record_every: int,
    dtype: torch.dtype = torch.float64,
    progress: bool = True,
    desc: str = "",
) -> tuple[Tensor, Tensor]:
    """All five starts at once (Adam is per coordinate, so this equals five separate runs).

    Returns the trajectories (n_records, 5, 2) and the final losses (5, 2).
    """
    from tqdm import tqdm

    x = torch.tensor(STARTS, dtype=dtype, requires_grad=True)
    optimizer = torch.optim.Adam([x], lr=1e-3)
    weightings: list[Any] = []
    if gamma is not None:
        from famo import FAMOWeighting

        weightings = [
            FAMOWeighting(2, gamma=gamma, min_losses=MIN_LOSSES, dtype=dtype) for _ in STARTS
        ]
    records = [x.detach().clone()]
    for step in tqdm(range(1, steps + 1), desc=desc, disable=not progress, leave=False):
        losses = toy_losses(x)
        optimizer.zero_grad()
        if gamma is None:
            losses.sum().backward()
        else:
            total = sum(w.loss(loss) for w, loss in zip(weightings, losses, strict=True))
            assert isinstance(total, Tensor)
            total.backward()
        optimizer.step()
        if weightings:
            with torch.no_grad():
                new_losses = toy_losses(x)
                for w, loss in zip(weightings, new_losses, strict=True):
                    w.update(loss)
        if step % record_every == 0:
            records.append(x.detach().clone())
    return torch.stack(records), toy_losses(x.detach())


def pareto_front(points: int = 101, steps: int = 4000) -> Tensor:
    """Minimisers of α f1 + (1 − α) f2 for α in [0, 1]: the front (it is convex here)."""
    alpha = torch.linspace(0.0, 1.0, points, dtype=torch.float64).unsqueeze(-1)
    x = torch.tensor([[0.0, -8.0]], dtype=torch.float64).repeat(points, 1).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=0.05)
    for _ in range(steps):
        f = toy_losses(x)
        loss = (alpha[:, 0] * f[:, 0] + (1 - alpha[:, 0]) * f[:, 1]).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return x.detach()


def plot(results: dict[str, Any], front: Tensor, path: Any, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = torch.linspace(-10, 10, 201, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    f = toy_losses(torch.stack([xx, yy], dim=-1))
    names = list(results)
    cols = 2
    rows = (len(names) + cols - 1) // cols
    fig, grid_axes = plt.subplots(rows, cols, figsize=(10, 5 * rows), squeeze=False)
    axes = grid_axes.ravel()
    colors = ["tab:red", "tab:orange", "tab:green", "tab:purple", "tab:brown"]
    for ax, name in zip(axes, names, strict=True):
        ax.contour(xx, yy, f[..., 0], levels=12, cmap="Blues", linewidths=0.7)
        ax.contour(xx, yy, f[..., 1], levels=12, cmap="Greys", linewidths=0.7)
        ax.plot(front[:, 0], front[:, 1], color="black", lw=3, alpha=0.35, label="Pareto front")
        traj = torch.tensor(results[name]["trajectory"])
        for s in range(len(STARTS)):
            ax.plot(traj[:, s, 0], traj[:, s, 1], color=colors[s], lw=1.4)
            ax.plot(*STARTS[s], marker="o", color=colors[s], ms=6)
            reached = results[name]["runs"][s]["reached_front"]
            ax.plot(
                traj[-1, s, 0], traj[-1, s, 1], marker="*" if reached else "X", color="k", ms=10
            )
        n_ok = sum(r["reached_front"] for r in results[name]["runs"])
        ax.set_title(f"{name}: {n_ok}/{len(STARTS)} on the front")
        ax.set_xlim(-10, 10)
        ax.set_ylim(-10, 10)
        ax.set_xlabel("θ₁")
        ax.set_ylabel("θ₂")
        ax.set_aspect("equal")
    axes[0].legend(loc="upper right", fontsize=8)
    fig.suptitle(
        f"The paper's toy, {steps:,} Adam steps from five starts (●)\n"
        "contours: f1 blue, f2 grey; ends: ★ Pareto-stationary, ✕ stalled",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rounded(values: Tensor) -> Any:
    """Nested lists with 4 decimals: enough for a plot, and a small JSON file."""
    return torch.round(values, decimals=4).tolist()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__ or "")
    p.add_argument("--steps", type=int, default=50_000)
    p.add_argument("--tol", type=float, default=1e-3, help="Pareto-stationarity threshold")
    args = p.parse_args(argv)
    steps = 200 if args.smoke else args.steps
    folder = out_dir(args)
    single_thread()
    torch.manual_seed(0)
    record_every = max(1, steps // 250)
    results: dict[str, Any] = {}
    for name, gamma in METHODS.items():
        traj, final = run(gamma, steps, record_every, progress=not args.quiet, desc=f"toy {name}")
        end = traj[-1]
        gaps = pareto_gap(end)
        results[name] = {
            "gamma": gamma,
            "runs": [
                {
                    "start": list(STARTS[s]),
                    "end": [float(v) for v in end[s]],
                    "final_losses": [float(v) for v in final[s]],
                    "pareto_gap": float(gaps[s]),
                    "reached_front": bool(gaps[s] < args.tol and math.isfinite(float(gaps[s]))),
                }
                for s in range(len(STARTS))
            ],
            "trajectory": _rounded(traj),
        }
    front = pareto_front(steps=200 if args.smoke else 4000)
    plot(results, front, folder / "toy.png", steps)
    payload = {
        "steps": steps,
        "optimizer": "Adam(lr=1e-3) on the point; FAMO lr 0.025, min_losses (-2.1, -21)",
        "tolerance": args.tol,
        "methods": results,
        "pareto_front": _rounded(front),
    }
    write_json(folder, "toy", payload)
    print(table(payload))
    return payload


def table(payload: dict[str, Any]) -> str:
    """Markdown: one row per method, one column per start (end point, ✓ if on the front)."""
    starts = [f"({a:g}, {b:g})" for a, b in STARTS]
    lines = [
        "| method | " + " | ".join(starts) + " |",
        "|---|" + "---|" * len(starts),
    ]
    for name, result in payload["methods"].items():
        cells = []
        for run_ in result["runs"]:
            mark = "✓" if run_["reached_front"] else "✗"
            cells.append(f"{mark} ({run_['end'][0]:.2f}, {run_['end'][1]:.2f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Columns are the starts; cells the end point (θ₁, θ₂) after {payload['steps']:,} "
        f"steps, ✓ where it is Pareto-stationary (the min-norm convex combination of the two "
        f"task gradients is below {payload['tolerance']:g}), ✗ where it stalled off the front."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
