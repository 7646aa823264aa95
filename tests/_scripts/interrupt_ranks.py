"""Worker for tests/test_interrupts.py: ``torchrun --nproc-per-node 2 THIS OUT.pt``.

Two ranks share one FAMO state (the default ``process_group``). For each interrupt point of a
call (``update``; the learning ``loss`` of ``extra_forward=False``), rank 1's call is
interrupted there while rank 0's runs through. Each rank then records whether its state is as
before the call, as after it, or neither:

* an interrupt before rank 1's all-reduce: its state should be as before, and it retries the
  call, as a user would, which completes rank 0's all-reduce; both should then be as after;
* an interrupt after rank 1's all-reduces: rank 1 should be as before or after, and rank 0 (whose
  call ran through) as after.

An interrupt between two of the call's all-reduces (if it makes several) leaves rank 0 waiting
for the rest: rank 1 sends zeros for them, and rank 0's state is not judged at that point.
Rank 0 saves every rank's records.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from famo import FAMOWeighting
from tests._scripts.teardown import save_on_rank_0_and_exit
from tests.test_interrupts import LOSSES, InterruptAfter, K, differences, state_of

INTERRUPTED = 1


class Collectives:
    """torch.distributed.all_reduce, counted: how many this rank completed, and what each was
    (shape, dtype) so that a rank can complete those that an interrupt made it skip."""

    def __init__(self) -> None:
        self.real = dist.all_reduce
        self.completed = 0
        self.made: list[tuple[torch.Size, torch.dtype]] = []

    def __call__(self, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # One step for the interrupts: the points are famo's calls around it, not torch's own
        # inside it (an interrupt there would leave the count unsure).
        with torch._C.DisableTorchFunction():
            self.made.append((tensor.shape, tensor.dtype))
            result = self.real(tensor, *args, **kwargs)
            self.completed += 1
        return result

    def reset(self) -> None:
        self.completed, self.made = 0, []


def losses(i: int, rank: int, *, grad: bool = False) -> torch.Tensor:
    """Batch i's losses on this rank (each rank its own)."""
    return torch.tensor([value + rank for value in LOSSES[i]], requires_grad=grad)


def explicit_start(rank: int) -> FAMOWeighting:
    famo = FAMOWeighting(K)
    famo.backward(losses(0, rank, grad=True))
    famo.update(losses(1, rank))
    famo.backward(losses(1, rank, grad=True))
    return famo


def learning_start(rank: int) -> FAMOWeighting:
    famo = FAMOWeighting(K, extra_forward=False)
    for i in range(2):
        famo.loss(losses(i, rank, grad=True)).backward()
    return famo


CALLS: dict[str, tuple[Callable[[int], FAMOWeighting], Callable[[FAMOWeighting, int], Any]]] = {
    "update": (explicit_start, lambda famo, rank: famo.update(losses(2, rank))),
    "learning loss": (
        learning_start,
        lambda famo, rank: famo.loss(losses(2, rank, grad=True)),
    ),
}


def judge(famo: FAMOWeighting, before: dict[str, Any], after: dict[str, Any]) -> str:
    try:
        found = state_of(famo)
    except Exception as error:
        return f"unreadable: {type(error).__name__}: {str(error)[:150]}"
    as_before, as_after = differences(found, before), differences(found, after)
    if not as_before:
        return "before"
    if not as_after:
        return "after"
    return f"torn: {as_before} differ from before, {as_after} from after"


def interrupt_every_point(name: str, rank: int, collectives: Collectives) -> list[dict[str, Any]]:
    start, call = CALLS[name]
    before = state_of(start(rank))
    finished = start(rank)
    collectives.reset()
    with InterruptAfter() as counter:
        call(finished, rank)
    after, made = state_of(finished), list(collectives.made)
    points = torch.tensor(counter.points)
    collectives.real(points, op=dist.ReduceOp.MAX)  # the same loop on both ranks
    records = []
    for point in range(int(points)):
        famo = start(rank)
        collectives.reset()
        record: dict[str, Any] = {"point": point}
        if rank != INTERRUPTED:
            call(famo, rank)
            record["state"] = judge(famo, before, after)
        else:
            try:
                with InterruptAfter(point):
                    call(famo, rank)
                record["state"] = "not interrupted"
            except KeyboardInterrupt:
                completed = collectives.completed
                record["collectives"] = (completed, len(made))
                record["state"] = judge(famo, before, after)
                if completed == 0:
                    call(famo, rank)  # the user retries
                    record["retried"] = judge(famo, before, after)
                else:
                    for shape, dtype in made[completed:]:
                        collectives.real(torch.zeros(shape, dtype=dtype))
                        record["released"] = True
        records.append(record)
    return records


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    collectives = Collectives()
    dist.all_reduce = collectives  # famo calls torch.distributed.all_reduce through the module
    results = {name: interrupt_every_point(name, rank, collectives) for name in CALLS}
    save_on_rank_0_and_exit(results, out)


if __name__ == "__main__":
    main(sys.argv[1])
