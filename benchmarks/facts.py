"""The measured numbers that prose quotes, read from benchmarks/results/*.json.

The README's results lines (``benchmarks.report.summary_section``) and the documentation's
pages (as MyST substitutions, ``{{ qm9_famo }}``) take their numbers from here, so no number in
prose is typed by hand. Only the JSON files are read: nothing heavy is imported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR


def _load(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _delta(entry: dict[str, Any], digits: int) -> str:
    mean, std = entry["delta_m"]
    return f"{mean:+.{digits}f} ± {std:.{digits}f}".replace("-", "−")


def _ratio_range(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.2f}×" if f"{low:.2f}" == f"{high:.2f}" else f"{low:.2f}–{high:.2f}×"


def facts(folder: Path = RESULTS_DIR) -> dict[str, str]:
    """Named numbers, as the tables of ``python -m benchmarks.report`` print them.

    Δm% (lower is better) is written ``+2.9 ± 0.9`` (mean ± std over seeds, a true minus
    sign); a result whose JSON file is missing contributes no names.
    """
    out: dict[str, str] = {}
    toy = _load(folder, "toy")
    if toy is not None:
        for method, key in [
            ("sum", "toy_sum"),
            ("famo (γ=0)", "toy_famo_gamma0"),
            ("famo (γ=1e-3)", "toy_famo_paper"),
            ("famo (γ=1e-5)", "toy_famo_official"),
        ]:
            runs = toy["methods"][method]["runs"]
            out[key] = f"{sum(run['reached_front'] for run in runs)}/{len(runs)}"
    mnist = _load(folder, "multimnist")
    if mnist is not None:
        summary = {k: v for k, v in mnist["summary"].items() if k != "stl"}
        for name, entry in summary.items():
            out[f"mnist_{name}"] = _delta(entry, 2)
        means = [entry["delta_m"][0] for entry in summary.values()]
        out["mnist_range"] = f"{min(means):+.1f} to {max(means):+.1f}".replace("-", "−")
        out["mnist_seeds"] = str(mnist["setting"]["seeds"])
    for name in ("qm9", "qm9_fit"):
        qm9 = _load(folder, name)
        if qm9 is None:
            continue
        for method, entry in qm9["summary"].items():
            if method != "stl":
                out[f"{name}_{method}"] = _delta(entry, 1)
        out[f"{name}_epochs"] = str(qm9["setting"]["epochs"])
        out[f"{name}_seeds"] = str(qm9["setting"]["seeds"])
        for method, value in qm9.get("paper_delta_m", {}).items():
            out[f"{name}_paper_{method}"] = f"{value:+.1f}"
    lm = _load(folder, "lm")
    if lm is not None:
        for method, entry in lm["summary"].items():
            mean, std = entry["mean_accuracy"]
            out[f"lm_{method}"] = f"{100 * mean:.1f} ± {100 * std:.1f}%"
    speed = _load(folder, "speed")
    if speed is not None and "training_steps" in speed:
        steps = speed["training_steps"].values()
        for method in ("famo", "famo_no_extra"):
            ratios = [row["ratio_to_sum"][method] for row in steps if method in row["ratio_to_sum"]]
            if ratios:
                out[f"step_{method}"] = _ratio_range(ratios)
        ks = sorted(row["k"] for row in steps)
        out["step_tasks"] = f"{ks[0]} to {ks[-1]}"
    return out
