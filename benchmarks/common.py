"""Shared plumbing: command-line flags, machine description, JSON results, timing, Δm%."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CACHE_DIR = Path(__file__).resolve().parent / ".cache"


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every benchmark script shares."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny setting, for the test suite")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for <name>.json and <name>.png (default: benchmarks/results)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def single_thread() -> None:
    """Run torch on one thread: timings then hold up when other processes share the 2 cores
    (two OpenMP threads competing with a busy neighbour run several times slower)."""
    torch.set_num_threads(1)


def out_dir(args: argparse.Namespace) -> Path:
    """Where to write: --out if given; smoke runs never write into benchmarks/results."""
    if args.out is not None:
        path = Path(args.out)
    elif args.smoke:
        raise SystemExit("--smoke needs --out DIR so that it never overwrites the real results")
    else:
        path = RESULTS_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def machine() -> dict[str, Any]:
    """The machine and software that produced a result."""
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def command() -> str:
    """The command line that is running, as a user would type it."""
    argv = sys.argv[:]
    if argv and argv[0].endswith(".py"):
        module = Path(argv[0]).resolve()
        argv[0] = f"-m benchmarks.{module.stem}"
    elif argv and argv[0] == "-m":
        argv = argv[1:]
    return "python " + " ".join(argv)


def write_json(directory: Path, name: str, payload: dict[str, Any]) -> Path:
    """Write `payload` with the command, machine and time stamp to `directory/name.json`."""
    record = {
        "name": name,
        "command": command(),
        "machine": machine(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **payload,
    }
    path = directory / f"{name}.json"
    path.write_text(dumps(record))
    return path


_NUMBER_LIST = re.compile(r"\[\s*([-+0-9.eE]+(?:,\s*[-+0-9.eE]+)*)\s*\]")


def dumps(record: dict[str, Any]) -> str:
    """Indented JSON with innermost lists of numbers kept on one line (small, readable diffs)."""
    text = json.dumps(record, indent=2)
    return (
        _NUMBER_LIST.sub(lambda m: "[" + ", ".join(re.split(r",\s*", m.group(1))) + "]", text)
        + "\n"
    )


def delta_m(
    metrics: Sequence[float], reference: Sequence[float], higher_is_better: Sequence[bool]
) -> float:
    """Δm% = (1/k) Σ (−1)^{h_i} (M_i − M_ref,i) / M_ref,i × 100 (negative is better)."""
    total = 0.0
    for value, ref, higher in zip(metrics, reference, higher_is_better, strict=True):
        sign = -1.0 if higher else 1.0
        total += sign * (value - ref) / ref
    return 100.0 * total / len(metrics)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, var**0.5


def famo_available() -> bool:
    """Whether the core package can be imported (it is written in parallel with the benchmarks)."""
    try:
        from famo import FAMOWeighting  # noqa: F401
    except ImportError:
        return False
    return True


def seconds_cell(entry: dict[str, Any], key: str) -> str:
    """A table cell for the mean of `entry[key]` (mean, std) in seconds; — where not recorded."""
    value = entry.get(key, [float("nan")])[0]
    return "—" if value != value else f"{value:.0f}"  # NaN != NaN
