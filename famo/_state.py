r"""The one owner of FAMO's state: its buffers, what famo knows of them in Python, every change.

:class:`~famo.FAMOWeighting` holds one :class:`State` and delegates to it; the helper modules
take tensors and return tensors. Three rules hold everything together:

* **The buffers are the state.** The Python-side :class:`Facts` (whether losses are waiting, how
  many calls recorded them, whether an attached optimizer stepped, the lone call's log D) are a
  cache that lets an eager step decide without asking the device. They carry the identity and
  version counter of the buffers they describe; when a tool replaces or writes a buffer, the
  next call notices and reads the buffers again (:meth:`State.sync`).
* **A call commits all of it or none of it.** Everything a call changes is computed first, out
  of place or in the private *mirror* (a copy of the buffers that the training calls write);
  then one ATen operation (``torch._foreach_copy_`` or ``torch._foreach_add_``) writes every
  buffer it changes, in place: the buffers keep their identity, and an interrupt (a
  ``KeyboardInterrupt`` from Ctrl-C or a scheduler's signal) lands before that operation or
  after it. The facts are dropped before the write and set after it, so a call interrupted
  between the two leaves facts that the next call reads again from the buffers.
* **Nothing aliases the caller.** What a call records is copied into famo's own buffers.

The mirror equals the buffers after every commit. It is the Adam step's work area (the step
runs there and is then copied in), and it is what famo keeps when a tool writes into its buffers
in place something that is not a FAMO state: an average (``AveragedModel(use_buffers=True)``,
Lightning's ``WeightAveraging``, an EMA) of states taken at different steps has fractional step
counts. FAMO's state is its optimizer's, not a model's, so averaging keeps it whole.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from famo import _checkpoint, _layout, functional
from famo._attach import Attachment
from famo._distributed import Group, check_own_state
from famo._logit_step import Adam, plain_step_, scheduled_step, window_log_distance
from famo._losses import LossVector, average_over_ranks, check_values

ADAM = ("logits", "exp_avg", "exp_avg_sq", "adam_step")
WINDOW = ("window_sum", "window_count", "window_stepped")
TRACKED = ADAM + WINDOW
_TRACKED = operator.itemgetter(*TRACKED)
ADAM_OF = operator.itemgetter(*ADAM)
_VERSION = operator.attrgetter("_version")
is_compiling = functional.is_compiling

NOT_A_STATE = (
    "FAMOWeighting's buffers were replaced from outside famo by values that are not a FAMO "
    "state: {error} A loader that found no FAMO state in its checkpoint (say `from_pretrained` "
    "of a backbone saved without FAMO) leaves uninitialised memory there: call "
    "`reset_parameters()` on the FAMOWeighting after loading, or load a checkpoint that holds "
    "its state."
)


class Facts(NamedTuple):
    """What famo knows in Python about the buffers (see the module docstring)."""

    pending: bool  # some loss is recorded (window_count > 0 somewhere)
    stepped: bool  # window_stepped
    calls: int | None  # recording calls in the window; None: not known in Python
    lone_log: Tensor | None  # log D of the window's only call
    seen: tuple[Tensor, ...]  # the TRACKED buffers these facts describe
    versions: tuple[int, ...]  # their version counters then


class Lanes(NamedTuple):
    """The lists of the common commits, built once per set of buffers and mirror (the same
    tensors take part at every step): a record, and a plain logit step with the window's reset.
    """

    record: list[Tensor]  # window_sum, window_count: the buffers', then the mirror's
    step: list[Tensor]  # the ADAM buffers, `record`, then both window_stepped
    step_values: list[Tensor]  # the mirror's ADAM (the step's work area), then zeros
    unstepped: list[Tensor]  # `step` less window_stepped (still 0 where nothing marked it)
    unstepped_values: list[Tensor]  # `step_values` less the same
    work: tuple[Tensor, Tensor, Tensor, Tensor]  # the mirror's ADAM


class Pending(NamedTuple):
    """A recording call computed and not yet committed (:meth:`State._record`)."""

    facts: Facts  # as the call found them
    values: Tensor  # the losses to add to the window
    mask: Tensor | None  # the tasks they hold (None: every task)
    weights: Tensor  # w for the call's losses
    lone: Tensor | None  # their log D, where they open the window with every task


#: A recording call, computed but not yet committed (:meth:`State.prepare`): the weights w for
#: the call's losses, in their order, and the commit. (A plain tuple: made at every call.)
Recording = tuple[Tensor, Callable[[], None]]


class State:
    """FAMO's state and every change to it (see the module docstring)."""

    def __init__(
        self,
        module: nn.Module,
        buffers: dict[str, Tensor],
        settings: dict[str, Any],
        num_tasks: int,
        names: tuple[str, ...] | None,
        bounds: Tensor,
    ) -> None:
        self.module = module
        self.buffers = buffers  # the module's own dict of buffers
        self.settings = settings
        self.adam = _adam(settings)
        self.num_tasks, self.names = num_tasks, names
        self.initial_bounds = bounds  # float64 on the CPU: what reset_parameters restores
        self.group = Group(settings["process_group"])
        self.per_rank = settings["process_group"] is False  # one state per rank
        self.attachment: Attachment | None = None
        self.applied: Tensor | None = None  # w of the last recording call
        # The common case, fixed at construction: every task, no schedule.
        self.plain = not settings["allow_missing_tasks"] and (
            settings["warmup_steps"] == 0 and settings["update_every"] == 1
        )
        self.facts: Facts | None = None
        self.mirror: dict[str, Tensor] = {}
        self.mirror_ok = False  # the mirror equals the buffers
        self.mirror_started = False  # this call began with a current mirror
        self.target_cache: dict[tuple[tuple[str, ...], bool], list[Tensor]] = {}
        self.lanes: Lanes | None = None
        self.constants: dict[str, Tensor] = {}
        self.offset_key: tuple[Any, ...] = ()
        self.offset = torch.zeros(0)
        self.fused_key: tuple[Any, ...] = ()
        self.fused_now = False
        self.version_seen = 0  # format_version's version counter (see famo._distributed)
        self.names_seen = 0  # task_names_utf8's

    def __getstate__(self) -> dict[str, Any]:
        # A copy (deepcopy for an EMA model, pickling) is not attached to the optimizer.
        state = dict(self.__dict__)
        state["attachment"] = None
        return state

    # ------------------------------------------------------------------ knowing the buffers

    def replaced(self, facts: Facts | None = None) -> None:
        """The buffers were set by famo (construction, a load, a move): constants, offset and
        mirror start afresh, and the facts are ``facts`` or read from the buffers."""
        logits = self.buffers["logits"]
        self.constants = {
            "zero": torch.zeros_like(logits),
            "one": torch.ones_like(logits),
            "false": torch.zeros((), dtype=torch.uint8, device=logits.device),
            "true": torch.ones((), dtype=torch.uint8, device=logits.device),
        }
        self.offset_key = ()
        self.mirror_ok = False
        self.target_cache, self.lanes = {}, None
        self._note_identity()
        self.facts = facts if facts is not None else self._derive()
        if not logits.is_meta:
            self._ensure_mirror()  # what famo keeps if a tool writes an average over the state
            self.mirror_started = False

    def _note_identity(self) -> None:
        """The version counters of the buffers that say whose state this is, which nothing but
        famo and a tool that rewrites every buffer of a module writes."""
        b = self.buffers
        self.version_seen = b["format_version"]._version
        self.names_seen = b["task_names_utf8"]._version

    def _rewritten_whole(self) -> bool:
        b = self.buffers
        return (
            b["format_version"]._version != self.version_seen
            or b["task_names_utf8"]._version != self.names_seen
        )

    def _seen(self) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
        tensors: tuple[Tensor, ...] = _TRACKED(self.buffers)
        return tensors, tuple(map(_VERSION, tensors))

    def _derive(self) -> Facts:
        """The facts, read from the buffers (host synchronisations)."""
        b = self.buffers
        count, stepped = b["window_count"], b["window_stepped"]
        meta = count.is_meta or stepped.is_meta
        pending = False if meta else bool((count > 0).any())
        calls: int | None = 0
        if pending:
            calls = int(count[0].item()) if bool((count == count[0]).all()) else None
        seen, versions = self._seen()
        return Facts(pending, not meta and bool(stepped), calls, None, seen, versions)

    def _unchanged(self, facts: Facts) -> bool:
        """Whether the buffers are the very tensors the facts describe, unwritten since."""
        tensors = _TRACKED(self.buffers)
        return all(map(operator.is_, tensors, facts.seen)) and (
            tuple(map(_VERSION, tensors)) == facts.versions
        )

    def sync(self, *, strict: bool = True) -> Facts:
        """Facts that hold for the buffers as they are now (an eager call relies on them).

        Written in place from outside since famo's last call: by a tool that rewrites every
        buffer of a module (an average: ``AveragedModel``, an EMA), or with values that are not
        a FAMO state, the buffers get famo's own last state back (the mirror); otherwise (a
        user's edit, a loader) the state written is taken as it is. Replaced by tensors that are
        not a FAMO state: refused (``strict``) or left for the next call.
        """
        if self.per_rank and self.group.per_rank_in_many():
            check_own_state(self.module, self.buffers, self.version_seen)
        facts = self.facts
        if facts is not None and self._unchanged(facts):
            return facts
        if facts is None:  # a call was interrupted: famo's own buffers, facts not known
            self.facts = facts = self._derive()
            return facts
        b = self.buffers
        same = all(b[key] is tensor for key, tensor in zip(TRACKED, facts.seen, strict=True))
        if same and self.group.active() is not None:
            # Written in place while every rank holds the same state (DDP's buffer broadcast
            # from rank 0): the values are those famo already knows.
            seen, versions = self._seen()
            self.facts = facts = facts._replace(seen=seen, versions=versions)
            return facts
        if any(tensor.is_meta for tensor in b.values()):
            self.replaced()
            return self.facts  # type: ignore[return-value]
        if same and self.mirror_ok and self._rewritten_whole():
            return self._repair(facts)
        try:
            tensors = self._read(b, b["logits"].device)
        except ValueError as error:
            if same and self.mirror_ok:
                return self._repair(facts)
            if not strict:
                return facts
            raise RuntimeError(NOT_A_STATE.format(error=error)) from None
        # Taken as it is, in FAMO's dtypes (a loader may have cast it to 16 bits).
        for key, value in tensors.items():
            current = b[key]
            if value.dtype != current.dtype or value.shape != current.shape:
                b[key] = value.to(current.device)
        self.replaced()
        return self.facts  # type: ignore[return-value]

    def _repair(self, facts: Facts) -> Facts:
        """famo's own last state back into its buffers, over what a tool wrote in place."""
        names = [key for key in self.mirror]
        self.facts = None
        torch._foreach_copy_([self.buffers[key] for key in names], list(self.mirror.values()))
        self._note_identity()
        seen, versions = self._seen()
        self.facts = facts = facts._replace(seen=seen, versions=versions)
        return facts

    def _read(self, ours: Mapping[str, Any], device: torch.device) -> dict[str, Tensor]:
        dtype = self.buffers["logits"].dtype
        return _checkpoint.read(
            ours,
            _checkpoint.layout_of(ours),
            num_tasks=self.num_tasks,
            names=self.names,
            per_task=self.settings["allow_missing_tasks"],
            dtype=dtype if dtype in (torch.float32, torch.float64) else torch.float32,
            device=device,
        )

    def _ensure_mirror(self) -> None:
        """Make the mirror equal the buffers, unless it does already (one copy, or new tensors
        where the buffers changed shape, dtype or device)."""
        if not self.mirror_ok:
            current = [self.buffers[key] for key in _layout.KEYS]
            mirror = list(self.mirror.values())
            if len(mirror) == len(current) and all(
                m.shape == t.shape and m.dtype == t.dtype and m.device == t.device
                for m, t in zip(mirror, current, strict=True)
            ):
                torch._foreach_copy_(mirror, current)
            else:
                self.mirror = {key: t.clone() for key, t in zip(_layout.KEYS, current, strict=True)}
                self.target_cache, self.lanes = {}, None
            self.mirror_ok = True
        self.mirror_started = True

    def _commit(
        self,
        write: Callable[[list[Tensor], list[Tensor]], Any],
        keys: tuple[str, ...],
        values: list[Tensor],
        facts: Callable[[tuple[Tensor, ...], tuple[int, ...]], Facts] | None,
        applied: Tensor | None = None,
        *,
        compiled: bool = False,
    ) -> None:
        """One operation writes ``values`` into the buffers ``keys`` and, where the call began
        with a current mirror (:meth:`_ensure_mirror`), into the mirror; then the facts
        (``facts(seen, versions)``; None: read from the buffers at the next call). ``applied``:
        the call's loss weights, which become :attr:`applied` if and only if the write happens.
        """
        self.facts = None
        mirrored = not compiled and self.mirror_started
        self.mirror_ok = self.mirror_started = False
        if mirrored:
            # (The values of a step computed in the mirror are there already.)
            in_mirror = values[0] is self.mirror.get(keys[0])
            targets = self._targets(keys, in_mirror)
            values = values + (values[len(ADAM) :] if in_mirror else values)
        else:
            targets = [self.buffers[key] for key in keys]
        if applied is None or compiled:
            write(targets, values)
            if applied is not None:
                self.applied = applied
        else:
            self._write_applying(write, targets, values, applied)
        if compiled:
            return
        self.mirror_ok = mirrored
        if facts is not None:
            seen, versions = self._seen()
            self.facts = facts(seen, versions)

    def _write_applying(
        self,
        write: Callable[[list[Tensor], list[Tensor]], Any],
        targets: list[Tensor],
        values: list[Tensor],
        applied: Tensor,
    ) -> None:
        """``write(targets, values)``; ``applied`` (the call's loss weights) becomes
        :attr:`applied` if and only if the write happens."""
        previous, version = self.applied, targets[0]._version
        self.applied = applied
        try:
            write(targets, values)
        except BaseException:
            if targets[0]._version == version:  # not written: the call did not happen
                self.applied = previous
            raise

    def _targets(self, keys: tuple[str, ...], in_mirror: bool) -> list[Tensor]:
        """The buffers ``keys`` and the mirror's (where the values are not there already), as
        one list: kept, since the same commits come at every step."""
        found = self.target_cache.get((keys, in_mirror))
        if found is None:
            b, mirror = self.buffers, self.mirror
            skip = ADAM if in_mirror else ()
            found = [b[key] for key in keys] + [mirror[k] for k in keys if k not in skip]
            self.target_cache[(keys, in_mirror)] = found
        return found

    # ------------------------------------------------------------------ the offset, Adam, moving

    def offset_now(self, compiled: bool = False) -> Tensor:
        r""":math:`\epsilon - b` in the state's dtype, recomputed when the bounds or ``eps``
        change (a move or a load starts afresh)."""
        bounds = self.buffers["lower_bounds"]
        eps = self.settings["eps"]
        if compiled:  # (nothing cached: one graph)
            return bounds.to(self.buffers["logits"].dtype).neg().add_(eps)
        key = self.offset_key
        if not key or key[0] is not bounds or key[1] != bounds._version or key[2] != eps:
            self.offset = bounds.to(self.buffers["logits"].dtype).neg().add_(eps)
            self.offset_key = (bounds, bounds._version, eps)
        return self.offset

    def fused(self, device: torch.device) -> bool:
        """:func:`famo.functional.use_fused_adam`, asked again only when its inputs change
        (eager calls; compiled ones run the formulas op by op)."""
        key = (device, torch.get_num_threads())
        if key != self.fused_key:
            self.fused_now, self.fused_key = functional.use_fused_adam(device), key
        return self.fused_now

    def setting_changed(self, name: str, value: Any) -> None:
        settings = {**self.settings, name: value}
        self.settings, self.adam = settings, _adam(settings)
        if name == "eps" and self.facts is not None:  # the lone call's log D used the old eps
            self.facts = self.facts._replace(lone_log=None)

    def move(self, fn: Callable[[Tensor], Tensor]) -> None:
        """``_apply`` (``.to()``, ``.double()``, ``to_empty()``…): converted buffers; the facts
        go along (or are read again where a tool replaced the buffers since famo's last call)."""
        if self.mirror_ok and not any(t.is_meta for t in self.buffers.values()):
            self.publish()  # (a tool may have written the buffers through `.data`)
        facts = self.facts
        known = facts is not None and self._unchanged(facts)
        converted = _layout.convert(self.buffers, fn)
        self.facts = None
        self.mirror_ok = False
        self.buffers.update(converted)
        if known and facts is not None:
            seen, versions = self._seen()
            self.replaced(facts._replace(lone_log=None, seen=seen, versions=versions))
        else:
            self.replaced()

    # ------------------------------------------------------------------ loading, resetting

    def load(self, ours: Mapping[str, Any], layout: tuple[str, ...], assign: bool) -> None:
        """A whole FAMO part, checked before any of it is taken (:raises ValueError:)."""
        b = self.buffers
        device = b["logits"].device
        if assign and isinstance(ours.get("logits"), Tensor):
            device = ours["logits"].device  # the checkpoint's tensors' properties are kept
        tensors = _checkpoint.read(
            ours,
            layout,
            num_tasks=self.num_tasks,
            names=self.names,
            per_task=self.settings["allow_missing_tasks"],
            dtype=b["logits"].dtype,
            device=device,
        )
        new = {key: value.to(device, copy=True) for key, value in tensors.items()}
        self._take(new, replace=assign)

    def reset(self, bounds: Tensor) -> None:
        """A fresh state with these bounds, on the object's device and in its dtype."""
        logits = self.buffers["logits"]
        per_task = self.settings["allow_missing_tasks"]
        self._take(
            _layout.initial(
                self.num_tasks, self.names, bounds, per_task, logits.device, logits.dtype
            ),
            replace=False,
        )

    def _take(self, new: dict[str, Tensor], *, replace: bool) -> None:
        """Every buffer from ``new`` in one step: in place where it fits, else replaced."""
        b = self.buffers
        fits = all(
            b[key].shape == value.shape
            and b[key].dtype == value.dtype
            and b[key].device == value.device
            and not b[key].is_meta
            for key, value in new.items()
        )
        self.facts = None
        self.mirror_ok = False
        previous, logits = self.applied, b["logits"]
        version = logits._version
        self.applied = None  # the weights of a call on another state
        try:
            if fits and not replace:
                torch._foreach_copy_([b[key] for key in new], list(new.values()))
            else:
                b.update(new)  # one call: the buffers are all old or all new
        except BaseException:
            if b["logits"] is logits and logits._version == version:  # nothing was taken
                self.applied = previous
            raise
        self.replaced()

    def assign_bounds(self, bounds: Tensor) -> None:
        """``famo.min_losses = bounds`` (checked float64 CPU bounds): refused while losses wait."""
        if self.sync().pending:
            raise RuntimeError(
                "`min_losses` cannot change while losses are recorded and waiting for a logit "
                "step: their log-distances used the old bounds. Call `update` (or `discard`) "
                "first, then assign the new bounds."
            )
        current = self.buffers["lower_bounds"]
        value = bounds.to(current.device, current.dtype)
        self._ensure_mirror()
        targets = [current, self.mirror["lower_bounds"]]
        previous, version = self.initial_bounds, current._version
        self.initial_bounds = bounds  # it behaves as if built with them, reset included
        try:
            torch._foreach_copy_(targets, [value, value])
        except BaseException:
            if current._version == version:  # the bounds were not written
                self.initial_bounds = previous
            raise

    # ------------------------------------------------------------------ the window

    def clear(self) -> None:
        """Forget the window (consumed, dropped by ``discard``, or a step that did not happen)."""
        const = self.constants
        self._ensure_mirror()
        self._commit(
            torch._foreach_copy_,
            WINDOW,
            [const["zero"], const["zero"], const["false"]],
            lambda seen, versions: Facts(False, False, 0, None, seen, versions),
        )

    def mark_stepped(self) -> None:
        """An attached optimizer really stepped: the window's losses were followed by a step."""
        facts = self.sync()
        if facts.pending and not facts.stepped:
            self._ensure_mirror()
            self._commit(
                torch._foreach_copy_,
                ("window_stepped",),
                [self.constants["true"]],
                lambda seen, versions: facts._replace(stepped=True, seen=seen, versions=versions),
            )

    def attach(self, optimizer: Any) -> Attachment:
        if self.attachment is not None:
            raise RuntimeError(
                "This FAMOWeighting is already attached to an optimizer. Call `remove()` on the "
                "handle that `attach` returned before attaching it again."
            )
        owner = weakref.ref(self)

        def detached(handle: Attachment) -> None:
            state = owner()
            if state is not None and state.attachment is handle:
                state.attachment = None

        self.attachment = Attachment(optimizer, self.mark_stepped, detached)
        return self.attachment

    # ------------------------------------------------------------------ values of a call

    def values(
        self, batch: LossVector, *, follow: bool | None, param: str
    ) -> tuple[Tensor, Tensor | None]:
        """The loss values in the state's dtype and device, averaged over ranks when recording.

        ``follow``: the state moves to the values' device (a recording ``loss``: the losses live
        with the model); ``False``: the values move to the state's (``update``); ``None``:
        nothing moves and no rank is asked (evaluation).
        """
        given = batch.values
        state = self.buffers["logits"]
        if given.device != state.device and follow is not None:
            if follow:
                self.module.to(given.device)  # the state follows the losses (a copy)
            elif given.device.type == "meta":
                raise ValueError(
                    f"`{param}` are on the meta device, which holds no values, but FAMO's "
                    f"state is on {state.device}. Pass the losses recomputed after the step."
                )
            else:
                given = given.to(state.device)
        if given.dtype != state.dtype:
            given = given.to(state.dtype)
        group = self.group.active() if follow is not None else None
        if group is None and batch.present is None:
            return given, None
        return average_over_ranks(
            given,
            batch.present,
            group,
            self.group.size,
            num_tasks=self.num_tasks,
            masked=self.settings["allow_missing_tasks"],
        )

    def check(
        self,
        batch: LossVector,
        values: Tensor,
        log_d: Tensor,
        param: str,
        *,
        accumulate: bool,
        local: bool = False,
    ) -> None:
        """:func:`famo._losses.check_values` with the bounds and window (one host sync)."""
        b = self.buffers
        check_values(
            batch,
            values,
            log_d,
            offset=self.offset_now().to(values.device),
            bounds=b["lower_bounds"].to(values.device),
            recorded=self.current("window_sum") if accumulate else None,
            param=param,
            eps=self.settings["eps"],
            names=self.names,
            across_ranks=not local and self.group.active() is not None,
        )

    # ------------------------------------------------------------------ a recording call

    def prepare(self, batch: LossVector) -> Recording:
        """A recording call (``backward``): the weights for the call's losses, and the commit
        that records them (and, with ``extra_forward=False``, takes the pending logit step
        first). Eager; :meth:`prepare_compiled` under ``torch.compile``."""
        found = self._compute(batch)
        if isinstance(found, Pending):
            return found.weights, partial(self._record, found)
        return found

    def record(self, batch: LossVector) -> Tensor:
        """A recording ``loss``: :meth:`prepare` and its commit at once; the weights."""
        found = self._compute(batch)
        if isinstance(found, Pending):
            self._record(found)
            return found.weights
        weights, commit = found
        commit()
        return weights

    def record_compiled(self, batch: LossVector) -> Tensor:
        """:meth:`record` under ``torch.compile``."""
        weights, commit = self.prepare_compiled(batch)
        commit()
        return weights

    def _compute(self, batch: LossVector) -> Pending | Recording:
        """What a recording call records (:class:`Pending`, for :meth:`_record`), or, where it
        also takes the pending logit step, that step and the record as a :data:`Recording`."""
        values, mask = self.values(batch, follow=True, param="losses")
        facts = self.sync()
        self._ensure_mirror()
        settings = self.settings
        learns = (
            not settings["extra_forward"]
            and facts.pending
            and (self.attachment is None or facts.stepped)
        )
        log_d = functional.log_distance(values, self.offset_now(), mask)
        if settings["validate"]:
            self.check(batch, values, log_d, "losses", accumulate=facts.pending and not learns)
        if not learns:
            weights = functional.weights_from_log_distance(_outside(self.logits, mask), log_d)
            lone = log_d if not facts.pending and mask is None else None
            return Pending(facts, values, mask, weights, lone)
        # extra_forward=False: this call's losses end the previous step, then open the window.
        keys, new = self._learn(facts, log_d, mask, None)
        logits = new[keys.index("logits")] if "logits" in keys else self.logits
        weights = functional.weights_from_log_distance(_outside(logits, mask), log_d)
        present = self.constants["one"] if mask is None else mask.to(values.dtype)

        def learn_and_record() -> None:
            self._commit(
                torch._foreach_copy_,
                (*keys, *WINDOW),
                [*new, values, present, self.constants["false"]],
                lambda seen, versions: Facts(
                    True, False, 1, log_d if mask is None else None, seen, versions
                ),
                weights,
            )

        return weights, learn_and_record

    def _record(self, pending: Pending) -> None:
        """Commit a recording call that :meth:`_compute` computed: the losses added to the
        window, in one operation into the buffers and the mirror (a copy into an empty window, an
        addition to one that holds losses)."""
        facts, values, mask, weights, lone = pending
        calls = facts.calls + 1 if facts.calls is not None else None
        if mask is not None or self.facts is not facts or not self.mirror_ok:
            # (Missing tasks, or the state changed since `prepare`: a hook inside backward.)
            self._ensure_mirror()
            self._commit(
                torch._foreach_add_,
                WINDOW[:2],
                [values, self.constants["one"] if mask is None else mask.to(values.dtype)],
                lambda seen, versions: Facts(True, facts.stepped, calls, lone, seen, versions),
                weights,
            )
            return
        targets = self._lanes().record
        one = self.constants["one"]
        self.facts = None
        self.mirror_ok = self.mirror_started = False
        # (An empty window holds zeros: the first call's losses are copied in, the next added.)
        write = torch._foreach_add_ if facts.pending else torch._foreach_copy_
        self._write_applying(write, targets, [values, one, values, one], weights)
        self.mirror_ok = True
        seen = facts.seen
        self.facts = Facts(True, facts.stepped, calls, lone, seen, tuple(map(_VERSION, seen)))

    def _lanes(self) -> Lanes:
        lanes = self.lanes
        if lanes is None:
            b, m, const = self.buffers, self.mirror, self.constants
            work = ADAM_OF(m)
            sums = [b["window_sum"], b["window_count"], m["window_sum"], m["window_count"]]
            step = [*ADAM_OF(b), *sums, b["window_stepped"], m["window_stepped"]]
            values = [*work, *[const["zero"]] * 4, const["false"], const["false"]]
            self.lanes = lanes = Lanes(
                record=sums,
                step=step,
                step_values=values,
                unstepped=step[:-2],
                unstepped_values=values[:-2],
                work=work,
            )
        return lanes

    def update(self, batch: LossVector, skip_tensor: Tensor | None, facts: Facts) -> None:
        """``update``: the logit step from the window to ``batch`` (the caller synced, checked
        the mode, that losses wait, and that ``skip`` is not True). Eager;
        :meth:`update_compiled` under ``torch.compile``."""
        if self.attachment is not None and not facts.stepped:
            self.clear()  # the step did not happen: nothing to learn from
            return
        values, mask = self.values(batch, follow=False, param="new_losses")
        after = functional.log_distance(values, self.offset_now(), mask)
        if self.settings["validate"]:
            self.check(batch, values, after, "new_losses", accumulate=False)
        if self.plain and skip_tensor is None and mask is None:
            self._ensure_mirror()
            lanes = self._lanes()
            before = self._window_log_distance(facts, mask)
            fused = self.fused(lanes.work[0].device)
            self.mirror_ok = False  # the work area now holds the step, not the state
            plain_step_(lanes.work, before, after, self.adam, fused)
            self.facts = None
            self.mirror_started = False
            if facts.stepped:
                torch._foreach_copy_(lanes.step, lanes.step_values)
            else:  # (the window's stepped flag is 0 already)
                torch._foreach_copy_(lanes.unstepped, lanes.unstepped_values)
            self.mirror_ok = True
            seen = facts.seen
            self.facts = Facts(False, False, 0, None, seen, tuple(map(_VERSION, seen)))
            return
        go = None if skip_tensor is None else ~skip_tensor.to(after.device)
        keys, new = self._learn(facts, after, mask, go)
        const = self.constants
        self._commit(
            torch._foreach_copy_,
            (*keys, *WINDOW),
            [*new, const["zero"], const["zero"], const["false"]],
            lambda seen, versions: Facts(False, False, 0, None, seen, versions),
        )

    def _window_log_distance(self, facts: Facts, mask: Tensor | None) -> Tensor:
        """log D of the window's mean: the lone call's, kept, where one call with every task
        opened the window and ``mask`` (the step's losses) holds every task; else from the
        mirror."""
        if facts.lone_log is not None and facts.calls == 1 and mask is None:
            return facts.lone_log
        mirror = self.mirror
        return window_log_distance(
            mirror["window_sum"],
            mirror["window_count"],
            self.offset_now(),
            facts.calls if mask is None else None,
            self.settings["allow_missing_tasks"],
        )

    def _learn(
        self, facts: Facts, after: Tensor, mask: Tensor | None, go: Tensor | None
    ) -> tuple[tuple[str, ...], list[Tensor]]:
        """The logit step from the window to ``after`` (log D): which buffers it changes and
        their new values. The common case runs in the mirror; the rest out of place."""
        self._ensure_mirror()
        mirror = self.mirror
        before = self._window_log_distance(facts, mask)
        fused = self.fused(mirror["logits"].device)
        if self.plain and go is None:
            work = self._lanes().work
            self.mirror_ok = False  # the work area now holds the step, not the state
            plain_step_(work, before, after, self.adam, fused)
            return ADAM, list(work)
        new = self._scheduled(mirror, before, after, mask, go, fused)
        return tuple(new), list(new.values())

    # ------------------------------------------------------------------ compiled calls

    def prepare_compiled(self, batch: LossVector) -> Recording:
        """Under ``torch.compile``: nothing read from Python facts, every decision a tensor, so
        that one graph serves whatever the window holds."""
        values, mask = self.values(batch, follow=True, param="losses")
        b, const = self.buffers, self.constants
        log_d = functional.log_distance(values, self.offset_now(True), mask)
        present = const["one"] if mask is None else mask.to(values.dtype)
        if self.settings["extra_forward"]:
            weights = functional.weights_from_log_distance(_outside(b["logits"], mask), log_d)

            def record() -> None:
                self._commit(
                    torch._foreach_add_, WINDOW[:2], [values, present], None, weights, compiled=True
                )

            return weights, record
        ready = (b["window_count"] > 0).any()
        if self.attachment is not None:
            ready = ready & b["window_stepped"].bool()
        before = window_log_distance(
            b["window_sum"], b["window_count"], self.offset_now(True), None, True
        )
        new = self._scheduled(b, before, log_d, mask, ready)
        weights = functional.weights_from_log_distance(_outside(new["logits"], mask), log_d)
        window = [
            torch.where(ready, values, b["window_sum"] + values),
            torch.where(ready, present, b["window_count"] + present),
            const["false"],
        ]

        def learn_and_record() -> None:
            self._commit(
                torch._foreach_copy_,
                (*new, *WINDOW),
                [*new.values(), *window],
                None,
                weights,
                compiled=True,
            )

        return weights, learn_and_record

    def update_compiled(self, batch: LossVector, skip_tensor: Tensor | None) -> None:
        values, mask = self.values(batch, follow=False, param="new_losses")
        b, const = self.buffers, self.constants
        after = functional.log_distance(values, self.offset_now(True), mask)
        go = None if skip_tensor is None else ~skip_tensor.to(after.device)
        if self.attachment is not None:
            stepped = b["window_stepped"].bool()
            go = stepped if go is None else go & stepped
        before = window_log_distance(
            b["window_sum"], b["window_count"], self.offset_now(True), None, True
        )
        new = self._scheduled(b, before, after, mask, go)
        zeros = [const["zero"], const["zero"], const["false"]]
        self._commit(
            torch._foreach_copy_, (*new, *WINDOW), [*new.values(), *zeros], None, compiled=True
        )

    def _scheduled(
        self,
        source: Mapping[str, Tensor],
        before: Tensor,
        after: Tensor,
        mask: Tensor | None,
        go: Tensor | None,
        fused: bool = False,
    ) -> dict[str, Tensor]:
        """:func:`famo._logit_step.scheduled_step` from ``source`` (the mirror, or compiled: the
        buffers) with the object's options."""
        return scheduled_step(
            source,
            before,
            after,
            mask,
            go,
            warmup_steps=self.settings["warmup_steps"],
            update_every=self.settings["update_every"],
            masked=self.settings["allow_missing_tasks"],
            adam=self.adam,
            fused=fused,
        )

    # ------------------------------------------------------------------ reading

    def current(self, key: str) -> Tensor:
        """The state famo computes from: the mirror, where it is current (a tool that wrote the
        buffers through ``.data``, which leaves no version behind, changes nothing that famo
        uses, and the next commit or save writes the buffers again); else the buffers."""
        mirror = self.mirror
        return mirror[key] if self.mirror_ok and key in mirror else self.buffers[key]

    @property
    def logits(self) -> Tensor:
        return self.current("logits")

    def view(self, key: str) -> Tensor:
        """The state of ``key`` as a public view reads it: edits from outside taken first."""
        if is_compiling():
            return self.buffers[key]
        self.sync(strict=False)
        return self.current(key)

    def publish(self) -> None:
        """The buffers made equal to the state famo computes from (before a save)."""
        facts = self.sync(strict=False)
        if not self.mirror_ok:
            return
        self.facts = None
        keys = _layout.KEYS
        torch._foreach_copy_([self.buffers[key] for key in keys], [self.mirror[k] for k in keys])
        self._note_identity()
        seen, versions = self._seen()
        self.facts = facts._replace(seen=seen, versions=versions)

    def evaluate(self, batch: LossVector, compiled: bool) -> Tensor:
        """The weights for local losses, changing nothing (a validation batch)."""
        values, mask = self.values(batch, follow=None, param="losses")
        logits = self.buffers["logits"] if compiled else self.logits
        offset = self.offset_now(compiled)
        if values.device != logits.device:
            logits, offset = logits.to(values.device), offset.to(values.device)
        log_d = functional.log_distance(values, offset, mask)
        if self.settings["validate"]:
            self.check(batch, values, log_d, "losses", accumulate=False, local=True)
        return functional.weights_from_log_distance(_outside(logits, mask), log_d)


def _adam(settings: Mapping[str, Any]) -> Adam:
    return Adam(settings["lr"], settings["gamma"], settings["betas"], settings["adam_eps"])


def _outside(logits: Tensor, mask: Tensor | None) -> Tensor:
    """The logits, -inf outside ``mask`` (tasks missing from the call get weight 0)."""
    return logits if mask is None else logits.masked_fill(~mask, -torch.inf)
