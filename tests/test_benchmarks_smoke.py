"""Every benchmark runs in its tiny `--smoke` setting (through `run_all`), so none of them rots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torchjd")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from benchmarks import run_all, toy


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    folder = tmp_path_factory.mktemp("bench-smoke")
    threads = torch.get_num_threads()
    try:
        run_all.main(["--smoke", "--quiet", "--out", str(folder)])
    finally:
        torch.set_num_threads(threads)  # the benchmarks run single-threaded; leave no trace
    return folder


def _written(folder: Path, name: str) -> dict[str, Any]:
    assert (folder / f"{name}.png").stat().st_size > 0
    record: dict[str, Any] = json.loads((folder / f"{name}.json").read_text())
    assert record["machine"]["torch"]
    assert record["command"].startswith("python")
    return record


def test_toy_smoke(smoke_dir: Path) -> None:
    record = _written(smoke_dir, "toy")
    assert set(record["methods"]) == set(toy.METHODS)
    assert all(len(m["runs"]) == len(toy.STARTS) for m in record["methods"].values())


def test_speed_smoke(smoke_dir: Path) -> None:
    record = _written(smoke_dir, "speed")
    for row in record["overhead"].values():
        assert row["ratio_to_floor"]["sum (floor)"] == 1.0
        assert row["famo_over_straight_line"] > 0
    for row in record["named_dict"].values():
        assert row["ratio_to_sum"]["sum(d.values())"] == 1.0
    # The straight line's operations, and the one that commits a step all or nothing.
    assert record["ops_per_step"]["famo"] == record["ops_per_step"]["straight-line"] + 1
    assert record["training_steps"]
    assert record["targets"]["ops_per_step"]["met"] is not None
    assert record["targets"]["named_dict_100000"]["met"] is None  # not measured in --smoke


def test_demo_smoke(smoke_dir: Path) -> None:
    record = _written(smoke_dir, "demo")
    assert set(record["summary"]) == {"stl", "sum", "famo"}


def test_multimnist_smoke(smoke_dir: Path) -> None:
    record = _written(smoke_dir, "multimnist")
    assert record["summary"]["stl"]["delta_m"][0] == 0.0
    assert all(0.0 <= acc <= 1.0 for run in record["runs"]["famo"] for acc in run["accuracy"])


@pytest.mark.parametrize("name", ["qm9", "qm9_fit"])
def test_qm9_smoke(smoke_dir: Path, name: str) -> None:
    record = _written(smoke_dir, name)
    assert len(record["targets"]) == len(record["units"]) == 11
    assert record["units"][6] == "meV"  # U₀, an atomization energy in PyG's units
    assert ("no fit" in record["setting"]["targets"]) == (name == "qm9")
    assert all(mae > 0 for run in record["runs"]["famo"] for mae in run["mae"])
    assert all(run["best_epoch"] >= 1 for run in record["runs"]["famo"])
    assert record["summary"]["stl"]["delta_m"][0] == 0.0


def test_report_renders_every_section(smoke_dir: Path) -> None:
    text = (smoke_dir / "README_results.md").read_text()
    for title in ("Speed", "toy", "MultiMNIST", "QM9", "Demo"):
        assert title in text


def test_toy_losses_match_the_official_problem() -> None:
    import torch

    f = toy.toy_losses(torch.tensor([[0.0, -8.0]], dtype=torch.float64))
    # Below the x2 = 0 ridge only the quadratic bowls remain, scaled by tanh(-x2 / 2).
    bowl = (49 / 10 - 20) * torch.tanh(torch.tensor(4.0, dtype=torch.float64))
    assert torch.allclose(f[0], torch.stack([0.1 * bowl, bowl]))


def test_smoke_runs_refuse_to_overwrite_results() -> None:
    with pytest.raises(SystemExit):
        run_all.main(["--smoke"])


def test_published_baseline_matches_the_golden_values_and_famo() -> None:
    import torch

    from benchmarks.published import PublishedFAMO
    from famo import FAMOWeighting

    # docs/design.md §6, G1 and G2.
    published = PublishedFAMO(2, dtype=torch.float64)
    losses = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    objective = published.get_weighted_loss(losses)
    assert abs(objective.item() - 0.4620981342241145) < 1e-12
    published.update(torch.tensor([0.5, 1.5], dtype=torch.float64))
    assert torch.allclose(
        published.w.detach(),
        torch.tensor([-0.024999997533697, 0.024999997533697], dtype=torch.float64),
        atol=1e-12,
    )
    # Same trajectory as famo's FAMOWeighting on random loss sequences.
    generator = torch.Generator().manual_seed(0)
    published = PublishedFAMO(5, gamma=1e-2, dtype=torch.float64)
    famo = FAMOWeighting(5, gamma=1e-2, dtype=torch.float64)
    for _ in range(20):
        before = torch.rand(5, generator=generator, dtype=torch.float64) + 0.1
        after = before * (0.5 + torch.rand(5, generator=generator, dtype=torch.float64))
        published.get_weighted_loss(before.clone().requires_grad_(True))
        famo.loss(before.clone().requires_grad_(True))
        published.update(after)
        famo.update(after)
    assert torch.allclose(published.weights, famo.weights, atol=1e-10)


@pytest.mark.parametrize("threads", [1, 2])  # the fused Adam kernel, and the op-by-op formulas
def test_straight_line_reference_matches_famo(threads: int) -> None:
    import torch

    from benchmarks.opcount import count
    from benchmarks.straight_line import StraightLineFAMO
    from famo import FAMOWeighting

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        k = 5
        bounds = torch.tensor([0.0, 0.1, -0.2, 0.05, 0.0])
        famo = FAMOWeighting(k, gamma=1e-2, min_losses=bounds, validate=False)
        reference = StraightLineFAMO(k, gamma=1e-2, min_losses=bounds)
        generator = torch.Generator().manual_seed(0)
        for _ in range(6):
            before = torch.rand(k, generator=generator) + 0.5
            after = before * (0.5 + torch.rand(k, generator=generator))
            given = [before.clone().requires_grad_() for _ in range(2)]
            objectives = famo.loss(given[0]), reference.loss(given[1])
            torch.testing.assert_close(objectives[1], objectives[0])
            for objective in objectives:
                objective.backward()
            torch.testing.assert_close(given[1].grad, given[0].grad)  # the loss weights w
            with torch.no_grad():
                famo.update(after)
                reference.update(after)
            torch.testing.assert_close(reference.logits, famo.state_dict()["logits"])
            torch.testing.assert_close(torch.softmax(reference.logits, 0), famo.weights)
        # The same ATen operations as famo's fast path (if famo's change, change the reference).
        leaf = (torch.rand(k) + 0.5).requires_grad_()
        later = torch.rand(k) + 0.5

        def ops(weighting: FAMOWeighting | StraightLineFAMO) -> list[str]:
            def step() -> None:
                weighting.loss(leaf).backward()
                with torch.no_grad():
                    weighting.update(later)

            step()  # warm, and leaf.grad exists for both
            return sorted(count(step).names)

        # famo computes under no_grad where the reference reads `.data` (a detach), records a
        # copy of the losses (one _foreach_copy_ into its empty window: never an alias of the
        # caller's tensor) and commits the logit step in one _foreach_copy_ (all or nothing).
        bare = ops(reference)
        bare.remove("aten.detach.default")
        expected = sorted([*bare, *["aten._foreach_copy_.default"] * 2])
        assert ops(famo) == expected
    finally:
        torch.set_num_threads(saved)


def test_speed_targets_report_each_measure() -> None:
    from benchmarks import speed

    targets = speed.check_targets({"overhead": {}, "training_steps": {}})
    assert len(targets) == 5
    assert all(target["met"] is None for target in targets.values())
    assert "not measured" in speed.details({"notes": "", "overhead": {"7": {"seconds": {}}}})


def test_straight_line_docstring_example() -> None:
    import doctest

    from benchmarks import straight_line

    assert doctest.testmod(straight_line).failed == 0


@pytest.mark.parametrize("form", ["tensor", "dict"])
def test_profile_step_smoke(form: str, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from benchmarks import profile_step

    threads = torch.get_num_threads()
    try:
        argv = ["--k", "3", "--steps", "5", "--timed-steps", "3", "--top", "3", "--form", form]
        times = profile_step.main(argv)
    finally:
        torch.set_num_threads(threads)
    assert {"famo: loss", "famo: update", "straight-line: step"} <= set(times)
    assert "by own time" in capsys.readouterr().out


def test_compare_times_two_revisions_of_famo() -> None:
    """`benchmarks.compare` imports the old famo in its `before` processes (it refuses to report
    otherwise) and prints one row per k."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        pytest.skip("benchmarks.compare reads famo's history with git: not a git checkout")
    command = [sys.executable, "-m", "benchmarks.compare", "--before", "HEAD", "--k", "2", "5"]
    command += ["--rounds", "1", "--blocks", "1", "--calls", "3"]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, check=True)
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "µs" in line]
    assert [row.split("|")[1].strip() for row in rows] == ["2", "5"]
    for row in rows:
        assert float(row.split("|")[-2]) > 0  # after / before
