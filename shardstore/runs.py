"""Listing and pruning a run directory (``step-<N>`` checkpoints under a root, see ``steps.py``).

``shardstore ls`` and ``shardstore gc`` sit on these. Which steps a prune deletes is decided by a pure
function (``plan_gc``) before anything is deleted, so the rule is tested without files: keep the newest
``keep`` complete steps, delete older complete steps and incomplete steps older than the newest complete
one. An incomplete step newer than every complete one may be a save still running, so it is spared, as is
one holding a save's claim (object stores); the newest complete step is never deleted, nor is a step
whose root record is there but does not read (damaged, or of a newer format: it may be the run's newest
state) or that holds files no save of ours writes (not ours); a person decides. Deletes go one step at a
time: a complete step through ``steps.delete_step`` (its root marker first, so a prune cut short leaves
at worst an incomplete step, never one listed as complete with objects missing; the next prune removes
it), an incomplete one through ``steps.clear_incomplete``, which judges it again under its commit lock,
so a save of that step that committed or claimed it since the listing keeps it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from shardstore import format as fmt
from shardstore.errors import CheckpointNotFoundError, ConcurrentSaveError
from shardstore.steps import PRUNE_LOCK_WAIT_S, StepEntry, clear_incomplete, delete_step, list_steps
from shardstore.storage import Storage

__all__ = ["StepSummary", "GcPlan", "summarize", "plan_gc", "collect"]

_STAT_THREADS = 16


@dataclass(frozen=True)
class StepSummary:
    """One step of a run directory: how big it is and when it was committed (or last written)."""

    step: int
    url: str
    complete: bool
    nbytes: int
    objects: int
    modified: float | None  # POSIX seconds: the root zarr.json's, else the newest object's
    problem: str | None = None  # why the step is neither complete nor incomplete (``StepEntry.problem``)

    def to_json(self) -> dict:
        return {"step": self.step, "url": self.url, "complete": self.complete, "nbytes": self.nbytes,
                "objects": self.objects, "modified": self.modified, "problem": self.problem}


@dataclass(frozen=True)
class GcPlan:
    """What a prune keeps, deletes, and spares (incomplete steps newer than the newest complete one),
    ``claimed`` (older incomplete steps a save holds: its claim, or a commit or claim since the listing),
    ``unreadable`` steps (``StepEntry.problem``) and ``locked`` ones (their commit lock stayed held:
    found only when deleting, ``collect``)."""

    keep: tuple[StepEntry, ...]
    delete: tuple[StepEntry, ...]
    spared: tuple[StepEntry, ...]
    unreadable: tuple[StepEntry, ...] = ()
    claimed: tuple[StepEntry, ...] = ()
    locked: tuple[StepEntry, ...] = ()

    def to_json(self) -> dict:
        groups = (("kept", self.keep), ("deleted", self.delete), ("spared", self.spared), ("unreadable", self.unreadable),
                  ("claimed", self.claimed), ("locked", self.locked))
        return {name: [{"step": e.step, "url": e.url, "complete": e.complete, "problem": e.problem} for e in entries]
                for name, entries in groups}


def summarize(root_url: str, storage_options: dict | None = None,
              progress: Callable[[int], None] | None = None) -> list[StepSummary]:
    """Every ``step-<N>`` under ``root_url`` with its size, object count and time, by step
    (``progress(1)`` after each step)."""
    root = Storage(root_url, storage_options)
    out = []
    for entry in _listed(root_url, storage_options):
        out.append(_summary(root, entry))
        _tick(progress)
    return out


def _listed(root_url: str, storage_options: dict | None) -> list[StepEntry]:
    """The steps under ``root_url``. A root holding nothing at all is refused: it is far more often a
    mistyped path or bucket prefix than a run with no steps yet, and "no checkpoints, exit 0" would hide
    the typo from a script checking a run."""
    entries = list_steps(root_url, storage_options)
    if not entries and Storage(root_url, storage_options).is_empty():
        raise CheckpointNotFoundError(f"nothing is stored under {root_url} (no step-<N> checkpoints, no files): "
                                      "is the run directory right?")
    return entries


def _tick(progress: Callable[[int], None] | None) -> None:
    if progress is not None:
        progress(1)


def _summary(root: Storage, entry: StepEntry) -> StepSummary:
    step = root.child(entry.url.rsplit("/", 1)[-1])
    keys = step.list()
    with ThreadPoolExecutor(_STAT_THREADS) as pool:
        sizes = list(pool.map(step.size, keys))
        times = [] if entry.complete else list(pool.map(step.modified, keys))
    modified = step.pinned().modified(fmt.ZARR_JSON) if entry.complete else max((t for t in times if t is not None), default=None)
    return StepSummary(entry.step, entry.url, entry.complete, sum(sizes), len(keys), modified, entry.problem)


def plan_gc(entries: Sequence[StepEntry], keep: int) -> GcPlan:
    """Which steps a prune keeping the newest ``keep`` (>= 1) complete steps deletes. Pure."""
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        raise ValueError(f"keep must be an int >= 1 (the newest complete step is never deleted), got {keep!r}")
    complete = sorted((e for e in entries if e.complete), key=lambda e: e.step)
    kept = complete[-keep:]
    newest = kept[-1].step if kept else None
    incomplete = [e for e in entries if e.incomplete]
    older = [e for e in incomplete if newest is not None and e.step < newest]
    delete = [e for e in entries if e.complete and e not in kept] + [e for e in older if not e.claimed]
    spared = [e for e in incomplete if newest is None or e.step > newest]
    unreadable = [e for e in entries if e.problem is not None]
    return GcPlan(tuple(kept), tuple(sorted(delete, key=lambda e: e.step)), tuple(spared), tuple(unreadable),
                  tuple(e for e in older if e.claimed))


def collect(root_url: str, keep: int, storage_options: dict | None = None, *, dry_run: bool = False,
            progress: Callable[[int], None] | None = None) -> GcPlan:
    """Delete what ``plan_gc`` chooses under ``root_url`` (nothing with ``dry_run``; ``progress(1)`` after
    each step); returns the plan, with a step a save took since the listing moved to ``claimed`` and one
    whose commit lock stayed held to ``locked`` (the others are still deleted)."""
    plan = plan_gc(_listed(root_url, storage_options), keep)
    if dry_run:
        return plan
    root = Storage(root_url, storage_options)
    outcome = {}
    for entry in plan.delete:
        outcome[entry] = _delete(root.child(entry.url.rsplit("/", 1)[-1]), entry, storage_options)
        _tick(progress)
    return replace(plan, delete=tuple(e for e in plan.delete if outcome[e] == "deleted"),
                   claimed=plan.claimed + tuple(e for e in plan.delete if outcome[e] == "claimed"),
                   locked=tuple(e for e in plan.delete if outcome[e] == "locked"))


def _delete(step: Storage, entry: StepEntry, storage_options: dict | None) -> str:
    """Delete one step of the plan; returns "deleted", "claimed" or "locked". An incomplete step is cleared
    as a save of it would clear it (``steps.clear_incomplete``: judged again under its commit lock), never
    deleted blindly: a save that committed it since the listing would lose its checkpoint, and one still
    writing it (a claim) its objects. Such a step stays, holding something. A step whose commit lock
    stays held ``PRUNE_LOCK_WAIT_S`` is kept, as retention keeps it."""
    try:
        if entry.complete:
            delete_step(step, PRUNE_LOCK_WAIT_S)
            return "deleted"
        clear_incomplete(entry.url, storage_options, PRUNE_LOCK_WAIT_S)
    except ConcurrentSaveError:
        return "locked"
    return "deleted" if step.is_empty() else "claimed"
