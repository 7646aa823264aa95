"""Binding a FAMOWeighting to the steps its model's optimizer really takes.

``torch.optim.Optimizer.register_step_post_hook`` calls the hook after every ``step()`` that
runs, and a step that does not happen calls nothing: ``GradScaler`` skips ``optimizer.step()``
on inf/NaN gradients, and Accelerate skips it on accumulation micro-steps. So the hook only has
to note that the losses recorded so far were followed by a real step (one that can change the
model: a step with every learning rate 0 does not count).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def innermost(optimizer: Any) -> torch.optim.Optimizer:
    """The optimizer that really steps: wrappers holding one as ``.optimizer`` are unwrapped.

    (Accelerate's ``AcceleratedOptimizer`` is itself an ``Optimizer`` subclass, but its own
    ``step`` only forwards, and it never calls ``Optimizer.__init__``.)
    """
    while not hasattr(optimizer, "register_step_post_hook") or isinstance(
        getattr(optimizer, "optimizer", None), torch.optim.Optimizer
    ):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            raise TypeError(
                "`optimizer` should be a torch.optim.Optimizer (or a wrapper holding one as "
                f"`.optimizer`). Found {type(optimizer).__name__}."
            )
        optimizer = inner
    return optimizer  # type: ignore[no-any-return]


def _changes_nothing(optimizer: torch.optim.Optimizer) -> bool:
    """A step with every learning rate 0 leaves the model as it was: not a step to learn from.

    (``torch.distributed.checkpoint`` runs one to create an optimizer's state before saving it,
    and warm-up schedules may start at 0.)
    """
    rates = [group.get("lr") for group in optimizer.param_groups]
    return all(isinstance(lr, (int, float)) and lr == 0 for lr in rates)


class Attachment:
    """What :meth:`FAMOWeighting.attach <famo.FAMOWeighting.attach>` returns.

    ``remove()`` detaches from the optimizer (a real step already noted stays noted); it is also
    a context manager that detaches on exit.
    """

    def __init__(
        self,
        optimizer: Any,
        on_step: Callable[[], None],
        on_remove: Callable[[Attachment], None],
    ) -> None:
        def stepped(optimizer: Any, args: Any, kwargs: Any) -> None:
            if not _changes_nothing(optimizer):
                on_step()

        self._handle = innermost(optimizer).register_step_post_hook(stepped)
        self._on_remove = on_remove

    def remove(self) -> None:
        self._handle.remove()
        self._on_remove(self)

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()
