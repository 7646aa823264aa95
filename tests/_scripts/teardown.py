"""Ending a worker of a gloo process group without gloo's exit race.

gloo runs each collective on a worker thread of the ``ProcessGroupGloo``; that thread destroys
the finished work, with the Python tensors the work holds, only after the caller has gone on,
and it holds the group's work mutex while it takes the GIL to release them (torch 2.13). The
usual endings of a script all lose that race now and then:

* returning from the script: while the interpreter finalizes, a thread that asks for the GIL is
  ended by ``pthread_exit`` inside a ``noexcept`` destructor: "terminate called without an
  active exception", SIGABRT, after all the work is done (about 1 run in 10 of
  ``transformers_ddp.py``);
* ``destroy_process_group()`` first: it only drops torch's registry of groups. A DDP model, a
  Trainer, a FAMOWeighting still refer to the group, and constructing a
  ``DistributedDataParallel`` leaves references to it that are never released, so its threads
  run on into the finalization, with the same abort;
* a ``barrier()`` after the last collective: the barrier's work holds the works before it, and
  its destruction, as late as ever, releases their tensors;
* collecting garbage after ``destroy_process_group()``: DDP's ``Reducer``, collected with the GIL
  held, may drop the last reference to the group, whose destructor then waits for the work
  mutex that the worker thread holds while it waits for the GIL: a deadlock.

:func:`exit_worker` therefore waits at a barrier until every rank is done with every collective
(so that no rank leaves while another still needs it), flushes the output and ends the process
with ``os._exit``: no interpreter finalization, no destructor, nothing left to race with.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

import torch
import torch.distributed as dist


def exit_worker(code: int = 0, *, strict: bool = True) -> NoReturn:
    """End this rank's process after its last collective (and after writing its results).

    ``strict=False``: a barrier that fails (a group that a case broke on purpose, a peer that
    already left) is reported on stderr and the exit code stays ``code``.
    """
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except Exception as error:
            print(f"exit_worker: the final barrier failed: {error}", file=sys.stderr)
            if strict:
                code = code or 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def save_on_rank_0_and_exit(results: Any, out: str) -> NoReturn:
    """Gather every rank's ``results`` (a list, in rank order), save it to ``out`` on rank 0,
    and end the worker (:func:`exit_worker`)."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        torch.save(gathered, out)
    exit_worker()  # not destroy_process_group() and the interpreter's exit: see above
