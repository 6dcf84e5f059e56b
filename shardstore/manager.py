"""``CheckpointManager``: what a training loop calls to save every N steps, prune, and resume.

Each step is an ordinary shardstore checkpoint at ``<root>/step-<N>`` (``shardstore/steps.py``), so
``shardstore.load``, ``shardstore.open`` and any Zarr reader open it. The verbs are Orbax's (``save``,
``restore``, ``latest_step``, ``all_steps``, ``should_save``, ``wait_until_finished``, ``close``).

Collective safety: every rank must agree on which steps exist, which one to restore and which to delete,
or ranks would load different checkpoints or wait on different collectives. Rank 0 decides (it lists
the root, applies retention, picks the step) and broadcasts through the ``Coordinator``; only rank 0
deletes. The manager keeps the agreed list of complete steps, so ``all_steps()``/``latest_step()`` are
local, consistent on every rank, and cost no I/O. Steps can vanish behind its back (deleted by hand or
by another tool), so the collective calls that act on the list refresh it first: ``restore`` lists the
run again, and retention counts only the steps still there.

Retention (``max_to_keep``, ``keep_period``) runs only once a newer save is complete, and never deletes
the latest complete step. A save killed midway never shows: its step has no root record (or lives only
in a staging sibling), so it is not listed; the next manager on the root (after the crash) sweeps it, or,
where it may be a save still writing (an object-store claim), saves that step over it
(``steps.clear_incomplete``).
With ``incremental`` (the default) each save links the shard objects whose cells (values and layout)
equal the latest complete step's instead of rewriting them (``shardstore/incremental.py``).
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

from shardstore.api import SaveResult, load, save
from shardstore.async_saver import async_save as start_async_save, prepare_async_save
from shardstore.coordinator import Coordinator
from shardstore.errors import CheckpointExistsError, CheckpointNotFoundError, ConcurrentSaveError, CorruptCheckpointError
from shardstore.steps import PRUNE_LOCK_WAIT_S, clear_incomplete, delete_step, list_steps, step_name, step_numbers, step_url, sweep_litter
from shardstore.storage import Storage

__all__ = ["CheckpointManager", "steps_to_delete"]


def steps_to_delete(steps: list[int], max_to_keep: int | None, keep_period: int | None) -> list[int]:
    """The complete steps retention removes: all but the ``max_to_keep`` newest, except every multiple of
    ``keep_period`` (kept forever); the newest step is never removed. Pure: no I/O."""
    if max_to_keep is None:
        return []
    older = sorted(steps)[:-max_to_keep]
    return [s for s in older if not (keep_period and s % keep_period == 0)]


def _positive(name: str, value: int | None, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1{' or None' if optional else ''}, got {value!r}")


class _Finished:
    """The handle of a save that ran in the caller (``async_save=False``): already done."""

    def __init__(self, result: SaveResult) -> None:
        self._result = result

    def result(self, timeout: float | None = None) -> SaveResult:
        return self._result

    def done(self) -> bool:
        return True


class CheckpointManager:
    """Saves, prunes and restores the checkpoints of one run under ``root_url`` (one manager per root).

    Collective over ``process_group``: every rank constructs it and calls ``save``, ``restore``,
    ``wait_until_finished`` and ``close`` with the same arguments.
    """

    def __init__(
        self,
        root_url: str,
        *,
        max_to_keep: int | None = None,
        keep_period: int | None = None,
        save_interval_steps: int = 1,
        async_save: bool = True,
        storage_options: dict | None = None,
        process_group=None,
        incremental: bool = True,
    ) -> None:
        _positive("max_to_keep", max_to_keep, optional=True)
        _positive("keep_period", keep_period, optional=True)
        _positive("save_interval_steps", save_interval_steps, optional=False)
        self.root_url = root_url.rstrip("/")
        self.max_to_keep, self.keep_period, self.save_interval_steps = max_to_keep, keep_period, save_interval_steps
        self._async, self._incremental = async_save, incremental
        self._options, self._group = storage_options, process_group
        self._coord = Coordinator(process_group)
        self._pending: tuple[int, Any] | None = None  # (step, handle) of the save in flight
        self._prepared = False  # whether the staging memory of the first async save is being faulted in
        self._closed = False
        scanned = self._coord.decide("listing the checkpoints of the run", self._scan)
        self._steps: list[int] = scanned[0]
        self._unreadable: dict[int, str] = scanned[1]  # step -> why it is there but not complete (``StepEntry.problem``)

    # -- queries (local: the agreed list) -----------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Every complete step, ascending, as of the last collective call (``save``,
        ``wait_until_finished``, ``restore``, ``close``): a save in flight is listed once one has seen it
        complete, a step deleted by hand is dropped once one has seen it gone."""
        return list(self._steps)

    def latest_step(self) -> int | None:
        """The newest complete step (None where there is none). Raises ``CorruptCheckpointError`` where a
        newer step is there but its root record does not read: None, or an older step, would make a
        resuming script start afresh or go back in training unnoticed."""
        self._refuse_skipping_unreadable()
        return self._steps[-1] if self._steps else None

    def should_save(self, step: int) -> bool:
        """Whether ``save(step, ...)`` would save: a multiple of ``save_interval_steps`` past the newest
        step saved or in flight."""
        newest = max([*self._steps, *([self._pending[0]] if self._pending else [])], default=None)
        return step % self.save_interval_steps == 0 and (newest is None or step > newest)

    # -- collective verbs -----------------------------------------------------------------------------

    def save(self, step: int, state_dict: Mapping[str, Any], force: bool = False) -> bool:
        """Save ``state_dict`` as ``step`` if ``should_save(step)`` (or ``force``); returns whether it did.
        A step older than the newest saved one is refused, even with ``force`` (``ValueError``).

        The previous save is finished first (its errors raise here) and retention runs once it is
        complete. With ``async_save`` this returns once the state is staged; else once it is committed.
        """
        self._check_open()
        step_name(step)  # a step is an int >= 0
        if not (force or self.should_save(step)):
            self._prepare(state_dict)
            return False
        self._collect()
        if self._steps and step < self._steps[-1]:
            raise ValueError(
                f"step {step} is older than the newest step saved under {self.root_url} ({self._steps[-1]}): a "
                "manager saves steps in increasing order, and retention keeps the newest, so it would delete this "
                "one first. After rolling back, move the newer steps away (or save the new branch under another root)"
            )
        if step in self._unreadable:
            raise CheckpointExistsError(
                f"step {step} at {step_url(self.root_url, step)} is there but not a complete checkpoint "
                f"({self._unreadable[step]}); a manager never replaces it — save under a new step number, "
                "or repair or move that step first"
            )
        if step in self._steps:
            raise CheckpointExistsError(
                f"step {step} already has a complete checkpoint at {step_url(self.root_url, step)}; "
                "a manager never replaces one — save under a new step number, or delete that step first"
            )
        url = step_url(self.root_url, step)
        replace = self._coord.decide("clearing an interrupted save of this step", lambda: clear_incomplete(url, self._options))
        base = step_url(self.root_url, self._steps[-1]) if self._steps else True
        kwargs = {"storage_options": self._options, "process_group": self._group, "incremental": self._incremental and base,
                  "overwrite": replace}
        self._pending = (step, self._start(state_dict, url, kwargs))
        if not self._async:
            self._collect()
        return True

    def restore(self, state_dict: dict, step: int | None = None, *, strict: bool = True) -> int:
        """Load ``step`` (the latest complete one by default) into ``state_dict`` in place; returns it.
        By default, refuses (``CorruptCheckpointError``) where a newer step is there but does not read.
        ``strict=False`` skips keys only one side has, as ``load``'s: a run resumed on fewer ranks leaves
        out the per-rank keys (``rng.rank3``) of the ranks it no longer has.

        A resumed run saves what it restored: the staging memory of its first async save is prepared
        here, in the background (``_prepare``), so even with ``save_interval_steps=1`` that save does
        not stall on fresh memory."""
        self._check_open()
        self._collect()
        listed = self._steps
        self._steps, self._unreadable = self._coord.decide("listing the checkpoints of the run", self._list)
        if step is None:
            self._refuse_skipping_unreadable()
        chosen = self._pick(step)
        if chosen is None:
            raise self._not_found(step, gone=step in listed)
        load(state_dict, step_url(self.root_url, chosen), storage_options=self._options, process_group=self._group,
             strict=strict)
        self._prepare(state_dict)
        return chosen

    def wait_until_finished(self) -> None:
        """Wait for the save in flight (raising its error) and apply retention."""
        self._collect()

    def close(self) -> None:
        if not self._closed:
            try:
                self._collect()
            finally:
                self._closed = True

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------------

    def _prepare(self, state_dict: Mapping[str, Any]) -> None:
        """After a restore, or at the first step the manager does not save, fault in the staging memory
        its first async save will copy into, in the background while training goes on
        (``prepare_async_save``): that first save then blocks about as briefly as later ones. A failure
        there is left for that save to meet."""
        if self._async and not self._prepared:
            self._prepared = True
            prepare_async_save(state_dict, process_group=self._group)

    def _start(self, state_dict, url: str, kwargs: dict):
        """The save's handle: an ``AsyncSave`` (returned once the state is staged) or a finished save."""
        if self._async:
            return start_async_save(state_dict, url, **kwargs)
        return _Finished(save(state_dict, url, **kwargs))

    def _collect(self) -> None:
        """Finish the save in flight: on success its step joins the list and retention runs."""
        if self._pending is None:
            return
        step, handle = self._pending
        self._pending = None
        handle.result()
        self._steps = sorted({*self._steps, step})
        self._steps = self._coord.decide("deleting old checkpoints", self._prune)

    def _scan(self) -> tuple[list[int], dict[int, str]]:
        """Rank 0: clear what killed saves left, then list the run (``_list``)."""
        sweep_litter(self.root_url, self._options)
        return self._list()

    def _list(self) -> tuple[list[int], dict[int, str]]:
        """Rank 0: the complete steps, and the steps whose root record is there but neither complete nor a
        save of ours cut short (with why)."""
        entries = list_steps(self.root_url, self._options)
        return [e.step for e in entries if e.complete], {e.step: e.problem for e in entries if e.problem is not None}

    def _prune(self) -> list[int]:
        """Rank 0: delete the steps retention removes, counting only the listed steps still there (one
        deleted by hand is no longer kept: counting it would delete an older step in its place); returns
        the steps left."""
        there = step_numbers(self.root_url, self._options)
        steps = [s for s in self._steps if s in there]
        doomed = steps_to_delete(steps, self.max_to_keep, self.keep_period)
        deleted = {step for step in doomed if self._deleted(step)}
        return [s for s in steps if s not in deleted]

    def _deleted(self, step: int) -> bool:
        """Rank 0: delete ``step``, or keep it with a warning where its commit lock is held past
        ``PRUNE_LOCK_WAIT_S`` (a save committing to it, or a lock left by a process killed while
        deleting it, which never expires on object stores): the save that just committed stays a
        success, and retention tries again after the next one. Why not wait as a commit does (30 s):
        a commit holds the lock for milliseconds, and keeping a step costs only its bytes until the
        next save, while each save (a training step) waited out the whole wait behind a stale lock."""
        try:
            delete_step(Storage(step_url(self.root_url, step), self._options), PRUNE_LOCK_WAIT_S)
        except ConcurrentSaveError:
            url = step_url(self.root_url, step)
            warnings.warn(
                f"retention kept step {step}: its lock {url}.lock stayed held for {PRUNE_LOCK_WAIT_S:g} s; if no process is "
                f"saving to or deleting that step, a killed process left the lock on the object store: `shardstore unlock {url}` "
                "removes it",
                RuntimeWarning, stacklevel=2,
            )
            return False
        return True

    def _pick(self, step: int | None) -> int | None:
        if step is None:  # restore() refused skipping an unreadable step before, on every rank
            return self._steps[-1] if self._steps else None
        return step if step in self._steps else None

    def _not_found(self, step: int | None, gone: bool) -> CheckpointNotFoundError:
        if gone:
            return CheckpointNotFoundError(
                f"step {step} at {step_url(self.root_url, step)} is no longer a complete checkpoint (it was when "
                f"this manager last listed {self.root_url}: deleted or moved since?); complete steps now: "
                f"{self._steps} — restore one of those, or the latest with step=None"
            )
        if step is None or not self._steps:
            return CheckpointNotFoundError(
                f"{self.root_url} holds no complete checkpoint (no step-<N> with a root zarr.json); nothing to "
                "restore — start from scratch, or check the root URL"
            )
        return CheckpointNotFoundError(
            f"step {step} has no complete checkpoint under {self.root_url}; complete steps: {self._steps} — "
            "restore one of those, or the latest with step=None"
        )

    def _refuse_skipping_unreadable(self) -> None:
        """The latest step is what a resumed run expects: where a newer step than every complete one is
        there but does not read, restoring an older one (or starting afresh, on ``CheckpointNotFoundError``)
        would silently go back in training."""
        newer = [s for s in self._unreadable if not self._steps or s > self._steps[-1]]
        if newer:
            step, latest = max(newer), (self._steps[-1] if self._steps else None)
            instead = (f"pass step={latest} to restore the latest readable step deliberately" if latest is not None
                       else "no step before it reads either")
            raise CorruptCheckpointError(
                f"step {step} at {step_url(self.root_url, step)} is there but cannot be restored: "
                f"{self._unreadable[step]}; restoring an older step instead would silently go back in training "
                f"— {instead}, or repair or move that step (`shardstore verify` names what is wrong)"
            )

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"the CheckpointManager of {self.root_url} is closed; create a new one")
