"""Write the README's results section from benchmarks/results/*.json.

python -m benchmarks.report              # writes benchmarks/results/README_results.md
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks import lm, multimnist, qm9, speed, toy
from benchmarks.common import RESULTS_DIR, parser

SECTIONS: list[tuple[str, str, str]] = [  # (result name, title, what it answers)
    (
        "demo",
        "Demo: MultiMNIST, summed loss vs FAMO",
        "One seed, same model, batches and steps; Δm% against single-task models.",
    ),
    (
        "speed",
        "Speed",
        "Per-step cost of FAMO next to the summed-loss floor, torchjd and the published code "
        "(1 thread), then whole training steps as the number of tasks grows.",
    ),
    (
        "toy",
        "The paper's toy",
        "Which methods reach the Pareto front from the five starts, and where they end.",
    ),
    (
        "multimnist",
        "MultiMNIST",
        "Test accuracy per task, mean ± std over seeds; Δm% against single-task models.",
    ),
    (
        "qm9",
        "QM9 on the paper's protocol (MLP on Coulomb-matrix features, not the paper's "
        "message-passing network)",
        "Test MAE per target (PyG's units; energies, HOMO, LUMO and ZPVE in meV) at the epoch of "
        "the best validation Δm, mean over seeds; Δm% (mean ± std) against single-task models. "
        "The paper's Δm% (its message-passing network, 300 epochs) is a reference, not a "
        "like-for-like comparison. That network is `benchmarks/qm9_gnn.py`, for one GPU "
        "(`python -m benchmarks.qm9_gnn --device cuda --methods sum famo --seeds 3`, an estimated "
        "1–3 h per method and seed); it has not been run here.",
    ),
    (
        "qm9_fit",
        "QM9 with a per-element fit (the balanced variant)",
        "The same, with a least-squares fit on the element counts subtracted from every target "
        "before standardising (`python -m benchmarks.qm9 --fit`, 6 epochs, stl, summed loss and "
        "FAMO only). The fit leaves the tasks nearly balanced. Side by side, the two tables show "
        "that FAMO helps where the loss scales are imbalanced (the paper's protocol, above) and "
        "does not where they are balanced (here).",
    ),
    (
        "qm9_gnn",
        "QM9 with the paper's message-passing network",
        "Test MAE per target at the epoch of the best validation Δm; Δm% against the paper's "
        "single-task MAEs of this network.",
    ),
    (
        "lm",
        "Multi-task language model: summed loss vs FAMO",
        "A tiny GPT-2 (random init) learns copy, reverse, sort and 2-digit addition at once; each "
        "batch mixes the tasks and often leaves some out. Held-out exact match per task, mean ± "
        "std over seeds, and the held-out loss per task (mean over seeds).",
    ),
]


def _machine_line(record: dict[str, Any]) -> str:
    m = record["machine"]
    return (
        f"`{record['command']}` on {m.get('cpu_model', m['processor'])}, {m['cpu_count']} cores "
        f"({m['platform']}), torch {m['torch']} on {m['torch_threads']} thread(s), "
        f"{record['created']}"
    )


def _details(name: str, record: dict[str, Any]) -> str:
    """The setting, and for speed what the numbers mean and whether the targets are met."""
    if name == "speed":
        targets = record.get("targets", {})
        met = {True: "met", False: "not met"}
        return (
            f"{record['notes']} First table: the floor in µs, the others as multiples of it, with "
            "the ATen operations of one step in brackets. Second table: a whole training step (sum "
            "in ms, the others as multiples of it). Our targets, for k ≤ 1,000: famo within 2× of "
            f"the floor: {met[targets.get('famo_within_2x_of_floor_up_to_1000', False)]}; the "
            "published code at least 2× slower than famo: "
            f"{met[targets.get('published_2x_slower_than_famo_up_to_1000', False)]}; a whole "
            "training step without the extra forward within 3% of a summed loss (MultiMNIST and "
            f"QM9 models): {met[targets.get('no_extra_forward_within_3pc_of_sum', False)]}."
        )
    setting = record.get("setting")
    if not setting:
        return ""
    return (
        "Setting: "
        + "; ".join(f"{key.replace('_', ' ')} {value}" for key, value in setting.items())
        + "."
    )


def _table(name: str, record: dict[str, Any]) -> str:
    if name in ("demo", "multimnist"):
        return multimnist.table(record)
    if name == "speed":
        return speed.tables(record)
    if name == "toy":
        return toy.table(record)
    if name in ("qm9", "qm9_fit", "qm9_gnn"):
        return qm9.table(record) + qm9.comparison(name, record)
    if name == "lm":
        return lm.table(record)
    raise ValueError(name)


def render(folder: Path, image_prefix: str) -> str:
    """Markdown for every result found in `folder`; figures are linked with `image_prefix`."""
    parts = [
        "<!-- generated by `python -m benchmarks.report` from benchmarks/results/*.json -->",
    ]
    for name, title, question in SECTIONS:
        path = folder / f"{name}.json"
        if not path.exists():
            continue
        record = json.loads(path.read_text())
        parts.append(f"### {title}\n\n{question}\n\nMade by {_machine_line(record)}.\n")
        details = _details(name, record)
        if details:
            parts.append(details + "\n")
        parts.append(_table(name, record))
        if (folder / f"{name}.png").exists():
            parts.append(f"\n![{title}]({image_prefix}{name}.png)")
        parts.append("")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> Path:
    p = parser(__doc__ or "")
    args = p.parse_args(argv)
    folder = Path(args.out) if args.out is not None else RESULTS_DIR
    prefix = "benchmarks/results/" if folder.resolve() == RESULTS_DIR.resolve() else ""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "README_results.md"
    text = render(folder, prefix)
    target.write_text(text)
    print(f"wrote {target}")
    if folder.resolve() == RESULTS_DIR.resolve():
        splice_into_readme(text)
    return target


README = RESULTS_DIR.parent.parent / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def splice_into_readme(text: str) -> None:
    """Replace the README's results section (between the markers) with ``text``."""
    readme = README.read_text(encoding="utf-8")
    if START not in readme or END not in readme:
        return
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{text.strip()}\n{END}{tail}", encoding="utf-8")
    print(f"updated the results section of {README}")


if __name__ == "__main__":
    main()
