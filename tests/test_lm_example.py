"""The multi-task language-model example (`benchmarks/lm.py`): its tasks, its masked per-task
losses and exact match, and a smoke run of every method with FAMO's missing tasks."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from benchmarks import lm


def _answer(tokens: list[int], start: int) -> list[int]:
    return tokens[start:]


@pytest.mark.parametrize(
    ("task", "digits", "n", "expected"),
    [
        ("copy", [3, 1, 4, 1, 5, 9, 2, 6], 4, [3, 1, 4, 1]),
        ("reverse", [3, 1, 4, 1, 5, 9, 2, 6], 5, [5, 1, 4, 1, 3]),
        ("sort", [3, 1, 4, 1, 5, 9, 2, 6], 8, [1, 1, 2, 3, 4, 5, 6, 9]),
        # 47 + 85 = 132, every number least significant digit first; n is ignored
        ("add", [7, 4, 5, 8, 0, 0, 0, 0], 3, [2, 3, 1]),
        ("add", [0, 0, 0, 0, 9, 9, 9, 9], 3, [0, 0, 0]),
    ],
)
def test_each_task_answers_what_it_says(
    task: str, digits: list[int], n: int, expected: list[int]
) -> None:
    t = lm.TASKS.index(task)
    tokens, start = lm.example(t, digits, n)
    assert tokens[0] == lm.DIGITS + t
    assert tokens[start - 1] == lm.EQUALS
    assert _answer(tokens, start) == [*expected, lm.EOS]
    assert len(tokens) <= lm.LENGTH


def test_batches_mix_tasks_and_leave_some_out() -> None:
    generator = torch.Generator().manual_seed(0)
    batches = [lm.training_batch(32, 0.7, generator) for _ in range(50)]
    counts = torch.tensor([len(b.present) for b in batches])
    assert counts.min() >= 1
    assert (counts < len(lm.TASKS)).any()  # tasks are sometimes absent
    assert (counts > 1).any()  # and batches mix tasks
    for batch in batches:
        assert batch.present == sorted(set(batch.task.tolist()))


def _oracle_losses(batch: lm.Batch, losses: Tensor) -> dict[int, float]:
    """Per-task mean of the token losses over the answer tokens, by plain loops."""
    total: dict[int, float] = {}
    count: dict[int, int] = {}
    for row, ids in enumerate(batch.ids.tolist()):
        task = int(batch.task[row])
        start = ids.index(lm.EQUALS) + 1
        end = ids.index(lm.EOS, start) + 1
        for position in range(start, end):  # logits at position - 1 predict token `position`
            total[task] = total.get(task, 0.0) + float(losses[row, position - 1])
            count[task] = count.get(task, 0) + 1
    return {task: total[task] / count[task] for task in total}


def test_task_losses_average_only_the_answer_tokens_of_each_task() -> None:
    generator = torch.Generator().manual_seed(1)
    batch = lm.make_batch([0, 0, 2, 3, 2, 0], generator)  # "reverse" is absent
    losses = torch.rand(batch.answer.shape, generator=generator, dtype=torch.float64)
    per_task = lm.task_losses(losses, batch)
    expected = _oracle_losses(batch, losses)
    assert set(expected) == {0, 2, 3}
    for task in range(len(lm.TASKS)):
        if task in expected:
            assert math.isclose(float(per_task[task]), expected[task], rel_tol=1e-12)
        else:
            assert math.isnan(float(per_task[task]))


class _Bigram(nn.Module):
    """A causal model whose next token depends only on the current one (a lookup table)."""

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Any:
        class Output:
            logits = self.table[input_ids]

        return Output()


def _greedy_exact_match(model: _Bigram, batch: lm.Batch) -> list[bool]:
    """Generate each answer token by token from the prompt and compare with the answer."""
    hits = []
    for ids in batch.ids.tolist():
        start = ids.index(lm.EQUALS) + 1
        answer = ids[start : ids.index(lm.EOS, start) + 1]
        generated = ids[:start]
        for _ in answer:
            generated.append(int(model.table[generated[-1]].argmax()))
        hits.append(generated[start:] == answer)
    return hits


def test_teacher_forced_exact_match_equals_greedy_decoding() -> None:
    copy, reverse, sort, add = range(4)
    rows = [  # (task, digits, n)
        (copy, [1, 2, 3], 3),  # answer 1 2 3: right
        (copy, [1, 2, 3, 4], 4),  # answer 1 2 3 4: the model says <eos> after 3
        (reverse, [3, 2, 1], 3),  # answer 1 2 3: right
        (sort, [2, 3, 1], 3),  # answer 1 2 3: right
        (sort, [2, 2, 1], 3),  # answer 1 2 2: wrong at the third token
        (add, [1, 1, 1, 1], 2),  # 11 + 11 = 22, answer 2 2 0: wrong at the second token
    ]
    examples = [lm.example(task, digits + [0] * (8 - len(digits)), n) for task, digits, n in rows]
    batch = lm.pack(examples, [task for task, _, _ in rows])
    # A table whose greedy chain after "=" is 1 2 3 <eos>; random elsewhere.
    table = torch.randn(lm.VOCAB, lm.VOCAB, generator=torch.Generator().manual_seed(0))
    for previous, following in [(lm.EQUALS, 1), (1, 2), (2, 3), (3, lm.EOS)]:
        table[previous] = -10.0
        table[previous, following] = 10.0
    model = _Bigram(table)
    greedy = _greedy_exact_match(model, batch)
    assert greedy == [True, False, True, True, False, False]
    _, correct = lm.token_losses(model, batch)
    teacher_forced = lm.exact_match(correct, batch)
    assert teacher_forced.tolist() == [0.5, 1.0, 0.5, 0.0]


def test_steps_to_a_level_is_the_first_evaluation_that_reaches_it() -> None:
    run = lm.Run(
        steps=[0, 100, 200],
        accuracies=[[0.0, 0.0, 0.0, 0.0], [0.95, 0.5, 0.0, 0.9], [0.8, 0.9, 0.89, 1.0]],
    )
    assert run.steps_to(0.9) == [100, 200, None, 100]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("lm-smoke")
    threads = torch.get_num_threads()
    try:
        lm.main(["--smoke", "--quiet", "--out", str(folder), "--methods", "sum", "mean", "famo"])
    finally:
        torch.set_num_threads(threads)  # the benchmark runs single-threaded; leave no trace
    return folder, json.loads((folder / "lm.json").read_text())


@pytest.mark.slow
def test_smoke_run_writes_its_results(smoke: tuple[Path, dict[str, Any]]) -> None:
    folder, record = smoke
    assert (folder / "lm.png").stat().st_size > 0
    assert record["command"].startswith("python")
    assert record["machine"]["torch_threads"] == 1
    assert record["tasks"] == lm.TASKS
    assert set(record["runs"]) == {"sum", "mean", "famo"}
    for runs in record["runs"].values():
        (run,) = runs
        assert all(0.0 <= a <= 1.0 for a in run["accuracy"])
        assert all(math.isfinite(x) and x > 0 for x in run["loss"])
        assert sum(run["batches_without_task"]) > 0  # FAMO saw batches with tasks missing
        assert len(run["steps_to_90"]) == len(lm.TASKS)
    assert "famo" in lm.table(record)


@pytest.mark.slow
def test_famo_learns_weights_in_the_smoke_run(smoke: tuple[Path, dict[str, Any]]) -> None:
    _, record = smoke
    weights = torch.tensor(record["histories"]["famo"]["weights"])
    assert weights.shape == (len(record["histories"]["famo"]["steps"]), len(lm.TASKS))
    assert torch.allclose(weights.sum(1), torch.ones(len(weights)), atol=1e-4)
    assert torch.equal(weights[0], torch.full((len(lm.TASKS),), 0.25))
    assert not torch.equal(weights[-1], weights[0])
    assert record["histories"]["sum"]["weights"] == []
    # Same seed, model and batches: the methods start from the same held-out losses.
    first = [record["histories"][name]["losses"][0] for name in ("sum", "mean", "famo")]
    assert first[0] == first[1] == first[2]
