"""`make bench`: every benchmark in turn, then the README's results section.

python -m benchmarks.run_all             # full set, about 95 CPU-minutes (~75 min on 2 cores)
python -m benchmarks.run_all --smoke --out /tmp/famo-smoke
"""

from __future__ import annotations

import time

from benchmarks import demo, lm, multimnist, qm9, report, speed, toy
from benchmarks.common import out_dir, parser


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__ or "")
    args = p.parse_args(argv)
    folder = out_dir(args)
    shared = ["--out", str(folder)]
    if args.smoke:
        shared.append("--smoke")
    if args.quiet:
        shared.append("--quiet")
    for module in (speed, toy, demo, multimnist, qm9, lm):
        name = module.__name__.rsplit(".", 1)[-1]
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        module.main(shared)
        if module is qm9:  # and its per-element-fit variant, the smaller table
            module.main([*shared, "--fit"])
        print(f"--- {name}: {time.perf_counter() - start:.0f} s", flush=True)
    report.main(["--out", str(folder)])


if __name__ == "__main__":
    main()
