"""Mixed precision: telling :meth:`~famo.FAMOWeighting.update` whether ``GradScaler`` stepped.

FAMO's own math runs in the state's dtype (float32 by default) whatever the losses' dtype, so
losses computed under ``torch.autocast`` (float16, bfloat16) need nothing special. What does need
care is :class:`torch.amp.GradScaler`: when the scaled gradients hold inf or NaN it *skips* the
optimizer step, the model does not change, and the logits must not learn from a step that did not
happen. :func:`step_and_update` runs the scaler's two calls and says whether the step was skipped;
pass that to ``update(new_losses, skip=...)``, which then drops the recorded losses and leaves the
logits, their Adam moments and step counts exactly as they were.
"""

from __future__ import annotations

import torch

__all__ = ["step_and_update"]


def step_and_update(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    r"""``scaler.step(optimizer)`` then ``scaler.update()``; ``True`` when the step was skipped.

    ``GradScaler`` skips the step when the unscaled gradients hold inf or NaN, and then multiplies
    its scale by ``backoff_factor`` (< 1); on a real step the scale stays or grows. So the step
    was skipped exactly when the scale went down (the rule Hugging Face Accelerate uses too).
    A disabled scaler (``enabled=False``) never skips.

    Reading the scale costs one host synchronisation; ``scaler.step`` already makes one for
    optimizers that are not ``fused``.

    :param scaler: the ``torch.amp.GradScaler`` whose ``scale(...)`` the loss went through.
        Call this in place of your own ``scaler.step(optimizer)`` and ``scaler.update()``, once
        per optimizer step. With several optimizers, call ``scaler.step`` for each yourself and
        compare ``scaler.get_scale()`` before and after ``scaler.update()`` the same way.
    :param optimizer: the model's optimizer.
    :returns: whether the optimizer step was skipped; give it to
        ``FAMOWeighting.update(new_losses, skip=...)``, or call ``discard()`` instead of
        ``update`` (with ``extra_forward=False``, call ``discard()``).

    >>> from famo import FAMOWeighting
    >>> model = torch.nn.Linear(3, 2)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> scaler = torch.amp.GradScaler("cpu")
    >>> famo = FAMOWeighting(2)
    >>> x = torch.ones(4, 3)
    >>> scaler.scale(famo.loss(model(x).pow(2).mean(0) + 1.0)).backward()
    >>> skipped = step_and_update(scaler, optimizer)
    >>> skipped
    False
    >>> with torch.no_grad():
    ...     famo.update(model(x).pow(2).mean(0) + 1.0, skip=skipped)
    """
    scale_before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() < scale_before
