"""Counting ATen operations: what a step costs, independent of the machine's speed and load.

Every operation that reaches the dispatcher is one call into PyTorch's C++ (and one kernel
launch on a GPU, except views, which only relabel memory). ``tests/test_op_count.py`` holds
FAMO's step to a limit with this; ``speed.py`` reports the counts beside its timings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode


class CountOps(TorchDispatchMode):
    """Records every ATen operation that reaches the dispatcher while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Any] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(func)
        return func(*args, **(kwargs or {}))

    @property
    def names(self) -> list[str]:
        return [str(op) for op in self.ops]

    @property
    def kernels(self) -> list[str]:
        """The operations that launch work (views and aliases only relabel memory)."""
        return [str(op) for op in self.ops if not op.is_view]


def count(action: Callable[[], object]) -> CountOps:
    """The operations of one call of ``action``."""
    with CountOps() as counter:
        action()
    return counter
