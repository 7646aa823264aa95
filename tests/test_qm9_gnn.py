"""The paper's QM9 network (benchmarks/qm9_gnn.py) on CPU: graphs, the complete graph, a smoke run.

The full run needs a GPU; these keep the module from rotting on machines without one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch_geometric")
pytest.importorskip("rdkit")
pytest.importorskip("tqdm")

import torch

from benchmarks import qm9_gnn

# Ethene: two carbons, a double bond, each carbon with two hydrogens nearby.
ETHENE = (
    ["C", "C", "H", "H", "H", "H"],
    [
        [0.0, 0.0, 0.0],
        [1.33, 0.0, 0.0],
        [-0.55, 0.92, 0.0],
        [-0.55, -0.92, 0.0],
        [1.88, 0.92, 0.0],
        [1.88, -0.92, 0.0],
    ],
    "C=C",
)


def test_ethene_graph_takes_bonds_from_the_smiles() -> None:
    x, pairs, kinds, source = qm9_gnn.molecule_graph(*ETHENE)
    assert source == "smiles"
    assert x.shape == (6, qm9_gnn.NODE_FEATURES)
    bonds = {tuple(sorted(p)): int(k) for p, k in zip(pairs.T.tolist(), kinds, strict=True)}
    assert bonds == {(0, 1): 1, (0, 2): 0, (0, 3): 0, (1, 4): 0, (1, 5): 0}
    carbon, hydrogen = x[0].tolist(), x[2].tolist()
    # one-hot (H, C, N, O, F), atomic number, aromatic, sp / sp2 / sp3, bonded hydrogens
    assert carbon == [0, 1, 0, 0, 0, 6, 0, 0, 1, 0, 2]
    assert hydrogen == [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]


def test_graph_falls_back_to_the_xyz_when_the_smiles_disagrees() -> None:
    elements, xyz, _ = ETHENE
    _, pairs, kinds, source = qm9_gnn.molecule_graph(elements, xyz, "CO")
    assert source in ("xyz", "connectivity")
    assert pairs.shape[1] == 5 and len(kinds) == 5


def test_complete_graph_has_every_pair_with_bond_and_distance() -> None:
    from torch_geometric.data import Batch, Data

    def molecule(n: int, bond: tuple[int, int]) -> Data:
        pairs = torch.tensor([bond, bond[::-1]]).T
        one_hot = torch.tensor([[0.0, 1.0, 0.0, 0.0]] * 2)  # a double bond, both directions
        return Data(
            x=torch.zeros(n, 11), pos=torch.randn(n, 3), edge_index=pairs, bond_type=one_hot
        )

    batch = Batch.from_data_list([molecule(3, (0, 2)), molecule(4, (1, 3))])
    edge_index, edge_attr = qm9_gnn.complete_graph(batch)
    expected = {(i, j) for i in range(3) for j in range(3) if i != j}
    expected |= {(3 + i, 3 + j) for i in range(4) for j in range(4) if i != j}
    found = [tuple(e) for e in edge_index.T.tolist()]
    assert len(found) == len(expected) and set(found) == expected
    bonded = {(0, 2), (2, 0), (4, 6), (6, 4)}
    for (i, j), attr in zip(found, edge_attr, strict=True):
        assert attr[:4].tolist() == ([0.0, 1.0, 0.0, 0.0] if (i, j) in bonded else [0.0] * 4)
        assert torch.isclose(attr[4], (batch.pos[i] - batch.pos[j]).norm())


def test_smoke_run_writes_the_qm9_layout(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        qm9_gnn.main(["--smoke", "--quiet", "--device", "cpu", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # the smoke run is single-threaded; leave no trace
    record = json.loads((tmp_path / "qm9_gnn.json").read_text())
    assert len(record["targets"]) == len(record["units"]) == 11
    assert set(record["runs"]) == {"sum", "famo"}
    assert all(mae > 0 for run in record["runs"]["famo"] for mae in run["mae"])
    assert "delta_m" in record["summary"]["famo"]
