"""What the documentation says about TorchJD's FAMO, checked against the installed torchjd.

Each row of the "What changes" table of docs/migration.md has its test here (``ROWS``), and
``test_every_row_of_the_table_has_its_test`` keeps the table and this file in step.
"""

from __future__ import annotations

import inspect
import io
from pathlib import Path

import pytest
import torch

from famo import FAMOWeighting, functional

torchjd_scalarization = pytest.importorskip("torchjd.scalarization")
TorchJDFAMO = torchjd_scalarization.FAMO

MIGRATION = Path(__file__).resolve().parent.parent / "docs" / "migration.md"
HYPERPARAMETERS = MIGRATION.parent / "hyperparameters.md"


def torchjd_weights(scalarizer: torch.nn.Module) -> torch.Tensor:
    return torch.softmax(scalarizer._w.detach(), dim=0)


def loss_sequence(steps: int, k: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(steps):
        before = torch.rand(k, generator=generator) + 0.5
        pairs.append((before, before * (0.5 + 0.5 * torch.rand(k, generator=generator))))
    return pairs


# The first cell of each row of the table, and the test that checks that row.
ROWS = {
    "losses of a shape": "test_torchjd_takes_a_shape_and_famo_the_flattened_losses",
    "the value returned": "test_the_returned_values_differ_and_the_gradients_agree",
    "the logits": "test_torchjd_logits_are_parameters_that_a_parent_optimizer_leaves_alone",
    "`state_dict()`": "test_a_torchjd_checkpoint_resumes_differently",
    "a loss at or below its bound": "test_a_loss_below_its_bound",
    "several calls before `update` (accumulation)": "test_several_calls_before_update",
    "a call under `torch.no_grad()` (validation)": "test_a_validation_call_between_steps",
    "a batch without some tasks": "test_missing_tasks",
}


def table_rows() -> list[str]:
    text = MIGRATION.read_text(encoding="utf-8")
    table = text.split("### What changes", 1)[1].split("\n\n|", 1)[1].split("\n\n", 1)[0]
    return [line.split(" | ")[0].removeprefix("| ") for line in ("|" + table).splitlines()[2:]]


def test_every_row_of_the_table_has_its_test() -> None:
    assert table_rows() == list(ROWS)
    here = {name for name in globals() if name.startswith("test_")}
    assert set(ROWS.values()) <= here, set(ROWS.values()) - here


def test_torchjd_takes_a_shape_and_famo_the_flattened_losses() -> None:
    scalarizer, famo = TorchJDFAMO((2, 3)), FAMOWeighting(6)
    for before, after in loss_sequence(5, k=6):
        theirs = before.view(2, 3).clone().requires_grad_()
        scalarizer(theirs).backward()
        scalarizer.update(after.view(2, 3))
        famo.backward(before.view(2, 3).flatten().clone().requires_grad_())
        famo.update(after)
    with pytest.raises(ValueError):
        famo.loss(torch.ones(2, 3))  # one loss per task: a (2, 3) tensor is refused
    theirs = torch.softmax(scalarizer._w.detach().flatten(), dim=0).view(2, 3)
    torch.testing.assert_close(famo.weights.view(2, 3), theirs, rtol=0, atol=1e-6)


def test_the_documented_defaults_are_torchjds() -> None:
    parameters = inspect.signature(TorchJDFAMO).parameters
    assert parameters["lr"].default == 0.025
    assert parameters["weight_decay"].default == 1e-3
    assert parameters["min_losses"].default is None
    text = HYPERPARAMETERS.read_text(encoding="utf-8")
    assert "TorchJD (`weight_decay=1e-3`)" in text
    assert "`FAMO(k, min_losses=None, lr=0.025, weight_decay=1e-3)`" in MIGRATION.read_text(
        encoding="utf-8"
    )


def test_the_returned_values_differ_and_the_gradients_agree() -> None:
    scalarizer, famo = TorchJDFAMO(2), FAMOWeighting(2)
    losses = torch.tensor([0.2, 0.5])  # below 1: the published objective is negative
    theirs, ours = losses.clone().requires_grad_(), losses.clone().requires_grad_()
    their_value, our_value = scalarizer(theirs), famo.loss(ours)
    their_value.backward()
    our_value.backward()
    assert their_value.item() < 0 < our_value.item()
    torch.testing.assert_close(their_value, functional.published_objective(famo.logits, losses))
    torch.testing.assert_close(our_value, (ours.grad * losses).sum())  # Σ w ℓ
    torch.testing.assert_close(ours.grad, theirs.grad)


def test_torchjd_logits_are_parameters_that_a_parent_optimizer_leaves_alone() -> None:
    """Listed in the parent's parameters, but 30 parent-optimizer steps move them by 0.0."""
    parent, alone = torch.nn.Module(), TorchJDFAMO(2)
    parent.head = torch.nn.Linear(2, 2)
    parent.scalarizer = TorchJDFAMO(2)
    assert "scalarizer._w" in dict(parent.named_parameters())
    optimizer = torch.optim.Adam(parent.parameters(), lr=0.1, weight_decay=0.1)
    for before, after in loss_sequence(30):
        optimizer.zero_grad()
        losses = parent.head(before) ** 2 + before
        parent.scalarizer(losses).backward()
        alone(losses.detach().requires_grad_()).backward()
        optimizer.step()
        parent.scalarizer.update(after)
        alone.update(after)
    assert torch.equal(parent.scalarizer._w, alone._w)
    assert list(FAMOWeighting(2).parameters()) == []


def test_a_torchjd_checkpoint_resumes_differently() -> None:
    """TorchJD's state_dict lacks the Adam moments: a resumed run takes other steps; famo's not."""
    sequence = loss_sequence(20)

    def train(obj: torch.nn.Module, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for before, after in pairs:
            if isinstance(obj, FAMOWeighting):
                obj.backward(before.clone().requires_grad_())
            else:
                obj(before.clone().requires_grad_()).backward()
            obj.update(after)

    for make, weights in [
        (lambda: TorchJDFAMO(2), torchjd_weights),
        (lambda: FAMOWeighting(2), lambda obj: obj.weights),
    ]:
        straight, first = make(), make()
        train(straight, sequence)
        train(first, sequence[:10])
        buffer = io.BytesIO()
        torch.save(first.state_dict(), buffer)
        buffer.seek(0)
        resumed = make()
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
        train(resumed, sequence[10:])
        same = torch.equal(weights(straight), weights(resumed))
        assert same == isinstance(straight, FAMOWeighting)
    assert set(TorchJDFAMO(2).state_dict()) == {"_w", "min_losses"}


def test_a_loss_below_its_bound() -> None:
    losses = torch.tensor([-0.5, 1.0])
    theirs = losses.clone().requires_grad_()
    value = TorchJDFAMO(2)(theirs)
    value.backward()
    assert torch.isnan(value)  # silently: no error
    assert theirs.grad is not None and torch.isfinite(theirs.grad).all()
    assert theirs.grad.tolist() == [2.0, -1.0]  # pushes the second loss up
    famo = FAMOWeighting(2)
    with pytest.raises(ValueError, match="min_losses"):
        famo.backward(losses.clone().requires_grad_())
    assert not famo.pending


def test_several_calls_before_update() -> None:
    """Two micro-batches then one update: TorchJD learns from the last, famo from their mean."""
    first, second = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 1.0, 2.0])
    after = torch.tensor([1.5, 1.2, 1.4])
    scalarizer, famo = TorchJDFAMO(3), FAMOWeighting(3)
    last_only, mean = TorchJDFAMO(3), FAMOWeighting(3)
    for losses in (first, second):
        scalarizer(losses.clone().requires_grad_()).backward()
        famo.backward(losses.clone().requires_grad_())
    scalarizer.update(after)
    famo.update(after)
    last_only(second.clone().requires_grad_()).backward()
    last_only.update(after)
    mean.backward(((first + second) / 2).requires_grad_())
    mean.update(after)
    assert torch.equal(scalarizer._w, last_only._w)
    torch.testing.assert_close(famo.logits, mean.logits)
    assert not torch.allclose(torchjd_weights(scalarizer), famo.weights, atol=1e-3)


def test_a_validation_call_between_steps() -> None:
    """A no-grad call between backward and update changes TorchJD's step, not famo's."""
    before, validation, after = (
        torch.tensor([1.0, 2.0]),
        torch.tensor([5.0, 5.0]),
        torch.tensor([0.5, 1.9]),
    )
    results = {}
    for validate in (False, True):
        scalarizer, famo = TorchJDFAMO(2), FAMOWeighting(2)
        scalarizer(before.clone().requires_grad_()).backward()
        famo.backward(before.clone().requires_grad_())
        if validate:
            with torch.no_grad():
                scalarizer(validation)
                famo.loss(validation)
        scalarizer.update(after)
        famo.update(after)
        results[validate] = (scalarizer._w.detach().clone(), famo.logits.clone())
    assert not torch.equal(results[False][0], results[True][0])
    assert torch.equal(results[False][1], results[True][1])


def test_missing_tasks() -> None:
    with pytest.raises(ValueError, match="shape"):
        TorchJDFAMO(3)(torch.tensor([1.0, 2.0], requires_grad=True))
    famo = FAMOWeighting(["a", "b", "c"], allow_missing_tasks=True)
    famo.backward(
        {"a": torch.tensor(1.0, requires_grad=True), "c": torch.tensor(2.0, requires_grad=True)}
    )
    famo.update({"a": torch.tensor(0.5), "c": torch.tensor(1.9)})
    assert famo.steps.tolist() == [1.0, 0.0, 1.0]
