"""Multi-task fine-tuning of a tiny causal language model: summed loss against FAMO.

A 2-layer GPT-2 built from a `transformers` config (random init, nothing downloaded) learns four
synthetic sequence tasks of very different difficulty, generated in code. Each example is
``<task> x₁ … xₙ = y₁ … yₘ <eos>``, digits 0–9:

- ``copy``: y = x (3–8 digits), the easiest;
- ``reverse``: y = x reversed (3–8 digits);
- ``sort``: y = x sorted (3–8 digits);
- ``add``: two 2-digit numbers, least significant digit first, and their 3-digit sum the same
  way; it needs carries and is by far the hardest at this budget.

Each batch mixes the tasks: every task is present with probability ``--p-present`` (at least
one is), and each example draws its task from the present ones, so a task is often absent from a
batch, as in multi-task fine-tuning of real language models. The loss of a task is the mean
next-token cross-entropy over the answer tokens (y and <eos>) of its examples in the batch.

Methods, with the same seed, model initialisation, batches and learning-rate schedule:

- ``sum``: the sum of the per-task mean losses of the tasks present. It is the baseline that
  sees exactly what FAMO sees (one loss per present task) and differs from it only in how they
  are weighted: each present task counts once.
- ``famo``: ``FAMOWeighting(TASKS, allow_missing_tasks=True)``, fed a dict with only the tasks
  present in the batch; ``update`` recomputes those losses on the same batch after the step.
- ``mean`` (with ``--methods``): the plain mean over all answer tokens of the batch, the default
  loss of a causal LM; it weights a task by its share of the batch's answer tokens.

Accuracy is exact match on a fixed held-out set of each task: every answer token, <eos>
included, is the model's top token given the correct prefix. That equals exact match of greedy
decoding (the first wrong token is produced from a correct prefix either way), at the cost of one
forward pass.

    python -m benchmarks.lm                  # writes benchmarks/results/lm.{json,png}
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common import mean_std, out_dir, parser, seconds_cell, single_thread, write_json

TASKS = ["copy", "reverse", "sort", "add"]
METHODS = ["sum", "famo"]
DESCRIPTIONS = {
    "sum": "summed loss (sum of the present tasks' mean losses)",
    "mean": "token mean (mean over all answer tokens of the batch)",
    "famo": "famo, paper γ = 1e-3, allow_missing_tasks=True",
}

# Vocabulary: the digits 0-9, one token per task, "=", <eos> and <pad>.
DIGITS = 10
EQUALS = DIGITS + len(TASKS)
EOS = EQUALS + 1
PAD = EOS + 1
VOCAB = PAD + 1
MIN_DIGITS, MAX_DIGITS = 3, 8  # copy, reverse and sort
ADD_DIGITS = 2  # each operand of add
EVAL_EVERY = 100  # steps between held-out evaluations
#: Longest example: task token, 8 digits, "=", 8 digits, <eos>.
LENGTH = 1 + MAX_DIGITS + 1 + MAX_DIGITS + 1


@dataclass
class Batch:
    """Token ids (B, LENGTH), answer mask over the predicted positions (B, LENGTH - 1), task ids
    (B,) and the tasks present, in task order."""

    ids: Tensor
    answer: Tensor
    task: Tensor
    present: list[int]


def example(task: int, digits: list[int], n: int) -> tuple[list[int], int]:
    """The tokens of one example and where its answer starts."""
    if TASKS[task] == "add":
        a, b = digits[:ADD_DIGITS], digits[ADD_DIGITS : 2 * ADD_DIGITS]
        x = a + b
        y, carry = [], 0
        for i in range(ADD_DIGITS):  # least significant digit first
            total = a[i] + b[i] + carry
            y.append(total % 10)
            carry = total // 10
        y.append(carry)
    else:
        x = digits[:n]
        y = {"copy": x, "reverse": x[::-1], "sort": sorted(x)}[TASKS[task]]
    prompt = [DIGITS + task, *x, EQUALS]
    return [*prompt, *y, EOS], len(prompt)


def make_batch(tasks: list[int], generator: torch.Generator) -> Batch:
    """Random examples of the given tasks (one per entry)."""
    size = len(tasks)
    digits = torch.randint(0, DIGITS, (size, MAX_DIGITS), generator=generator).tolist()
    lengths = torch.randint(MIN_DIGITS, MAX_DIGITS + 1, (size,), generator=generator).tolist()
    return pack([example(*row) for row in zip(tasks, digits, lengths, strict=True)], tasks)


def pack(examples: list[tuple[list[int], int]], tasks: list[int]) -> Batch:
    """Examples (tokens, answer start) padded on the right to LENGTH."""
    ids = torch.full((len(examples), LENGTH), PAD, dtype=torch.long)
    answer = torch.zeros(len(examples), LENGTH - 1)
    for row, (tokens, start) in enumerate(examples):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        answer[row, start - 1 : len(tokens) - 1] = 1.0  # position i predicts token i + 1
    return Batch(ids, answer, torch.tensor(tasks), sorted(set(tasks)))


def training_batch(size: int, p_present: float, generator: torch.Generator) -> Batch:
    """A batch that mixes the tasks: each is present with probability p_present (at least one
    is), and each example takes one of the present tasks at random."""
    while True:
        present = torch.rand(len(TASKS), generator=generator) < p_present
        if present.any():
            break
    choices = present.nonzero().view(-1)
    picks = torch.randint(0, len(choices), (size,), generator=generator)
    return make_batch(choices[picks].tolist(), generator)


def held_out(per_task: int, seed: int) -> Batch:
    """A fixed evaluation set with `per_task` examples of every task."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    return make_batch([t for t in range(len(TASKS)) for _ in range(per_task)], generator)


def build_model(seed: int) -> nn.Module:
    """A tiny GPT-2 from a config: random initialisation, no download."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=LENGTH,
        n_embd=64,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=EOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    return GPT2LMHeadModel(config)


def token_losses(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """Next-token cross-entropy (B, LENGTH - 1) and whether each prediction is the top token."""
    logits = model(input_ids=batch.ids, attention_mask=(batch.ids != PAD).long()).logits[:, :-1]
    targets = batch.ids[:, 1:]
    losses = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="none")
    return losses.view(targets.shape), logits.argmax(-1) == targets


def task_losses(losses: Tensor, batch: Batch) -> Tensor:
    """Mean answer-token loss of each task (k,); NaN for a task absent from the batch."""
    k, answer = len(TASKS), batch.answer.to(losses.dtype)
    summed = losses.new_zeros(k).index_add(0, batch.task, (losses * answer).sum(1))
    counts = losses.new_zeros(k).index_add(0, batch.task, answer.sum(1))
    return summed / counts


def exact_match(correct: Tensor, batch: Batch) -> Tensor:
    """Fraction of each task's examples whose answer tokens are all the top token (k,)."""
    k = len(TASKS)
    whole = (correct | (batch.answer == 0)).all(1).float()
    hits = whole.new_zeros(k).index_add(0, batch.task, whole)
    return hits / torch.bincount(batch.task, minlength=k).float()


@dataclass
class Run:
    """A training run: final held-out metrics, curves at each evaluation, times."""

    accuracy: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    losses: list[list[float]] = field(default_factory=list)
    accuracies: list[list[float]] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)
    absent: list[int] = field(default_factory=lambda: [0] * len(TASKS))
    wall_time: float = 0.0
    cpu_time: float = 0.0

    def steps_to(self, level: float) -> list[int | None]:
        """For each task, the first evaluated step whose exact match is at least `level`."""
        return [
            next(
                (s for s, a in zip(self.steps, self.accuracies, strict=True) if a[t] >= level), None
            )
            for t in range(len(TASKS))
        ]

    def record(self, seed: int) -> dict[str, Any]:
        return {
            "seed": seed,
            "accuracy": self.accuracy,
            "loss": self.loss,
            "steps_to_90": self.steps_to(0.9),
            "batches_without_task": self.absent,
            "wall_time": self.wall_time,
            "cpu_time": self.cpu_time,
        }


@torch.no_grad()
def evaluate(model: nn.Module, data: Batch) -> tuple[list[float], list[float]]:
    """Held-out per-task loss and exact match (one forward pass)."""
    losses, correct = token_losses(model, data)
    return task_losses(losses, data).tolist(), exact_match(correct, data).tolist()


def train(
    method: str,
    *,
    seed: int,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    p_present: float,
    eval_data: Batch,
    eval_every: int,
    progress: bool,
) -> Run:
    """Train a fresh model with `method`; batches depend only on `seed`."""
    from tqdm import tqdm

    from famo import FAMOWeighting

    model = build_model(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, warmup, steps))
    famo = FAMOWeighting(TASKS, allow_missing_tasks=True) if method == "famo" else None
    generator = torch.Generator().manual_seed(seed)
    run = Run()

    def losses_of(batch: Batch) -> dict[str, Tensor]:
        per_task = task_losses(token_losses(model, batch)[0], batch)
        return {TASKS[t]: per_task[t] for t in batch.present}

    def checkpoint(step: int) -> None:
        losses, accuracy = evaluate(model, eval_data)
        run.steps.append(step)
        run.losses.append(losses)
        run.accuracies.append(accuracy)
        if famo is not None:
            run.weights.append(famo.weights.tolist())

    bar = tqdm(total=steps, desc=f"{method} seed {seed}", disable=not progress, leave=False)
    model.train()
    start, start_cpu = time.perf_counter(), time.process_time()
    for step in range(steps):
        if step % eval_every == 0:
            checkpoint(step)
        batch = training_batch(batch_size, p_present, generator)
        for t in range(len(TASKS)):
            run.absent[t] += t not in batch.present
        optimizer.zero_grad()
        if famo is not None:
            famo.backward(losses_of(batch))
            optimizer.step()
            with torch.no_grad():  # same batch after the step: how much did each loss fall?
                famo.update(losses_of(batch))
        else:
            if method == "sum":
                loss = sum(losses_of(batch).values(), torch.zeros(()))
            elif method == "mean":
                losses = token_losses(model, batch)[0]
                loss = (losses * batch.answer).sum() / batch.answer.sum()
            else:
                raise ValueError(f"unknown method {method!r}")
            loss.backward()
            optimizer.step()
        schedule.step()
        bar.update()
    bar.close()
    run.wall_time = time.perf_counter() - start  # evaluations included, the same for all methods
    run.cpu_time = time.process_time() - start_cpu
    model.eval()
    checkpoint(steps)
    run.loss, run.accuracy = run.losses[-1], run.accuracies[-1]
    return run


def _lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Mean ± std over seeds of each task's exact match, their average, and the times."""
    summary: dict[str, Any] = {}
    for name, seeds in runs.items():
        summary[name] = {
            "accuracy": [mean_std([r["accuracy"][t] for r in seeds]) for t in range(len(TASKS))],
            "mean_accuracy": mean_std([sum(r["accuracy"]) / len(TASKS) for r in seeds]),
            "loss": [mean_std([r["loss"][t] for r in seeds]) for t in range(len(TASKS))],
            "wall_time": mean_std([r["wall_time"] for r in seeds]),
            "cpu_time": mean_std([r["cpu_time"] for r in seeds]),
        }
    return summary


def table(payload: dict[str, Any]) -> str:
    """Exact match per task (%), mean ± std over seeds; the step at which each task first reached
    90% in each seed; the held-out loss per task."""
    tasks = payload["tasks"]
    several = payload["setting"].get("seeds", 1) > 1
    header = " | ".join(f"{t} (%)" for t in tasks)
    lines = [
        f"| method | {header} | mean (%) | first step at ≥ 90% per task, each seed |"
        " held-out loss per task | CPU time (s) | wall time (s) |",
        "|---" * (len(tasks) + 6) + "|",
    ]

    def cell(value: list[float]) -> str:
        mean, std = value
        return f"{100 * mean:.1f} ± {100 * std:.1f}" if several else f"{100 * mean:.1f}"

    for name, entry in payload["summary"].items():
        accs = " | ".join(cell(a) for a in entry["accuracy"])
        losses = ", ".join(f"{m:.3g}" for m, _ in entry["loss"])
        reached = ", ".join(
            "/".join(
                "never" if r["steps_to_90"][t] is None else str(r["steps_to_90"][t])
                for r in payload["runs"][name]
            )
            for t in range(len(tasks))
        )
        times = f"{seconds_cell(entry, 'cpu_time')} | {seconds_cell(entry, 'wall_time')}"
        lines.append(
            f"| {DESCRIPTIONS[name]} | {accs} | {cell(entry['mean_accuracy'])} | {reached} |"
            f" {losses} | {times} |"
        )
    return "\n".join(lines)


def plot(payload: dict[str, Any], path: Any) -> None:
    """Held-out loss and exact match per task over training, and FAMO's weights (seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = payload["tasks"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {"sum": "--", "mean": ":", "famo": "-"}
    style_names = {"--": "dashed", ":": "dotted", "-": "solid"}
    fig, (ax_loss, ax_acc, ax_w) = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, history in payload["histories"].items():
        losses, accuracy = torch.tensor(history["losses"]), torch.tensor(history["accuracy"])
        for t, task in enumerate(tasks):
            label = f"{name}: {task}"
            style = styles[name]
            ax_loss.plot(history["steps"], losses[:, t], style, color=colors[t], label=label)
            ax_acc.plot(history["steps"], 100 * accuracy[:, t], style, color=colors[t])
        if history["weights"]:
            weights = torch.tensor(history["weights"])
            for t, task in enumerate(tasks):
                ax_w.plot(history["steps"], weights[:, t], color=colors[t], label=task)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("held-out answer-token cross-entropy")
    ax_loss.set_title("per-task loss")
    ax_loss.legend(fontsize=7, ncol=2)
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("held-out exact match (%)")
    ax_acc.set_title("per-task exact match")
    ax_w.set_xlabel("step")
    ax_w.set_ylabel("FAMO weight z_i")
    ax_w.axhline(1 / len(tasks), color="grey", lw=0.5)
    ax_w.set_title("FAMO's task weights")
    ax_w.legend(fontsize=8)
    setting = payload["setting"]
    legend = ", ".join(f"{style_names[styles[name]]}: {name}" for name in payload["histories"])
    fig.suptitle(f"Tiny GPT-2, 4 synthetic tasks, {setting['steps']} steps, seed 0 ({legend})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__ or "")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=sorted(DESCRIPTIONS))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--p-present", type=float, default=0.7)
    args = p.parse_args(argv)
    folder = out_dir(args)
    single_thread()
    steps, seeds, per_task, eval_every = args.steps, args.seeds, 256, EVAL_EVERY
    if args.smoke:
        steps, seeds, per_task, eval_every = 6, 1, 8, 3
    warmup = max(1, steps // 20)
    start = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.methods}
    histories: dict[str, Any] = {}
    for seed in range(seeds):
        eval_data = held_out(per_task, seed)
        for name in args.methods:
            run = train(
                name,
                seed=seed,
                steps=steps,
                batch_size=args.batch_size,
                lr=args.lr,
                warmup=warmup,
                p_present=args.p_present,
                eval_data=eval_data,
                eval_every=eval_every,
                progress=not args.quiet,
            )
            runs[name].append(run.record(seed))
            if seed == 0:
                histories[name] = {
                    "steps": run.steps,
                    "losses": _rounded(run.losses),
                    "accuracy": _rounded(run.accuracies),
                    "weights": _rounded(run.weights),
                }
    payload = {
        "setting": {
            "model": "GPT-2 from a config, 2 layers, width 64, 4 heads, random init",
            "tasks": f"copy, reverse, sort ({MIN_DIGITS}-{MAX_DIGITS} digits), "
            f"add ({ADD_DIGITS}-digit operands)",
            "steps": steps,
            "batch_size": args.batch_size,
            "task_present_probability": args.p_present,
            "optimizer": f"Adam(lr={args.lr}), linear warm-up over {warmup} steps, cosine decay",
            "held_out_examples_per_task": per_task,
            "seeds": seeds,
            "metric": "held-out exact match (greedy), after the last step",
            "times": f"per run, including a held-out evaluation every {eval_every} steps",
        },
        "tasks": TASKS,
        "runs": runs,
        "summary": summarise(runs),
        "total_seconds": time.perf_counter() - start,
        "histories": histories,
    }
    write_json(folder, "lm", payload)
    plot(payload, folder / "lm.png")
    print(table(payload))
    return payload


def _rounded(rows: list[list[float]]) -> list[list[float]]:
    return [[round(v, 5) for v in row] for row in rows]


if __name__ == "__main__":
    main()
