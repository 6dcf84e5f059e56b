"""A run directory: one checkpoint per training step, named ``step-<N>`` under a root URL.

The checkpoint manager writes and prunes them, and the ``shardstore ls`` / ``gc`` commands read them,
so the naming, what counts as complete, and how a step or a killed save's litter is removed live here,
once. A step is complete when its root record reads and validates (the commit made it visible); anything else under the root — staging and trash
siblings of the commit protocol, a step whose save was killed, files of the user's — is not a complete
step and is never reported as one. A step whose root record is there but does not read (damaged, of a
newer format, or the store failed to serve it), or a ``step-<N>`` directory holding files no save of
ours writes (another library's checkpoint), is neither complete nor incomplete: it is reported with the
reason (``StepEntry.problem``) and never deleted, as it may be the run's newest state or not ours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shardstore import commit
from shardstore.commit_lock import commit_lock
from shardstore import format as fmt
from shardstore.errors import CheckpointNotFoundError, IncompleteCheckpointError, ShardstoreError
from shardstore.storage import Storage

__all__ = [
    "StepEntry", "step_name", "parse_step", "step_url", "list_steps", "step_numbers", "delete_step", "clear_incomplete",
    "sweep_litter", "PRUNE_LOCK_WAIT_S",
]

STEP_PREFIX = "step-"
# How long pruning (retention, ``shardstore gc``) waits for an old step's commit lock before keeping the
# step: a commit holds it for milliseconds, so a lock held longer is a deletion at work or one a killed
# process left (``shardstore unlock``); waiting out a commit's 30 s would gain nothing.
PRUNE_LOCK_WAIT_S = 1.0
_STEP_NAME = re.compile(r"step-(0|[1-9][0-9]*)")  # canonical decimal only: one name per step


@dataclass(frozen=True)
class StepEntry:
    """One ``step-<N>`` entry under a run directory."""

    step: int
    url: str
    complete: bool  # the root record reads and validates
    problem: str | None = None  # why the step is neither complete nor a save of ours cut short: never deleted
    claimed: bool = False  # incomplete and holding a save's claim (object stores): that save may still be writing

    @property
    def incomplete(self) -> bool:
        """A save of ours cut short (or still running): no root marker, only files of ours."""
        return not self.complete and self.problem is None


def step_name(step: int) -> str:
    """The directory name of ``step`` (decimal, no padding: ``step-100``)."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"a step is an int >= 0, got {step!r}")
    return f"{STEP_PREFIX}{step}"


def parse_step(name: str) -> int | None:
    """The step a directory name stands for, or None for any other name (``step-7.staging-…`` included)."""
    match = _STEP_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def step_url(root_url: str, step: int) -> str:
    """The URL of ``step``'s checkpoint under ``root_url``."""
    return f"{root_url.rstrip('/')}/{step_name(step)}"


def list_steps(root_url: str, storage_options: dict | None = None) -> list[StepEntry]:
    """Every ``step-<N>`` under ``root_url``, by step, each marked complete or not (one root-record
    read per step). A root that does not exist holds no steps."""
    root = Storage(root_url, storage_options)
    entries = []
    for name in root.list_names(STEP_PREFIX):
        step = parse_step(name)
        if step is not None:
            entries.append(StepEntry(step, root.key_url(name), *_state(root.child(name))))
    return sorted(entries, key=lambda e: e.step)


def step_numbers(root_url: str, storage_options: dict | None = None) -> set[int]:
    """The steps that have a ``step-<N>`` entry under ``root_url``, complete or not: one listing, no
    root record read (cheap enough to run before every prune)."""
    names = Storage(root_url, storage_options).list_names(STEP_PREFIX)
    return {step for step in map(parse_step, names) if step is not None}


def _state(checkpoint: Storage) -> tuple[bool, str | None, bool]:
    """(complete, problem, claimed): no root record is an incomplete save, unless the directory holds
    files no save of ours writes (another library's checkpoint, a user's files); a root record that
    does not read is a problem too. An incomplete save holding its claim may be one still writing."""
    try:
        fmt.read_root(checkpoint.pinned())
    except (CheckpointNotFoundError, IncompleteCheckpointError):
        foreign = commit.foreign_files(checkpoint)
        if foreign:
            return False, f"not a shardstore checkpoint: it holds files no shardstore save writes (e.g. {foreign[:3]})", False
        return False, None, checkpoint.exists(commit.CLAIM)
    except (ShardstoreError, OSError, ValueError) as exc:
        return False, f"its root record does not read: {type(exc).__name__}: {exc}", False
    return True, None, False


def delete_step(checkpoint: Storage, lock_wait: float | None = None) -> None:
    """Delete one step: its root marker first, so a deletion cut short leaves an incomplete step (never
    listed) rather than a listed one missing objects. Files no save of ours writes (a user's notes
    beside the arrays) are left where they are, with the directory.

    Under the step's commit lock: a save overwriting the step (another process) then commits before the
    deletion starts or finds the step changed at its commit and commits nothing. Without it, on object
    stores, such a save could commit after the marker of the version its pointer names was deleted
    (the pointer, which its commit checks, still there), return, and have its version deleted.
    ``lock_wait``: how long to wait for that lock (None: a commit's ``commit_lock.LOCK_WAIT_S``; pruning
    passes ``PRUNE_LOCK_WAIT_S``); past it, ``ConcurrentSaveError``."""
    with commit_lock(checkpoint, lock_wait):
        _delete_step(checkpoint)


def _delete_step(checkpoint: Storage) -> None:
    foreign = set(commit.foreign_files(checkpoint))  # judged by the root record, so before it goes
    checkpoint.pinned().delete(fmt.ZARR_JSON)  # an overwritten step's marker: in the version its pointer names
    checkpoint.delete(fmt.ZARR_JSON)
    if not foreign:
        return checkpoint.delete_prefix()
    mixed = {key.split("/")[0] for key in foreign}  # top-level entries holding foreign files
    for top in sorted({key.split("/")[0] for key in checkpoint.list()} - mixed):
        checkpoint.delete_prefix(top)  # a whole node (or a top-level file) of ours
    for key in checkpoint.list():
        if key.split("/")[0] in mixed and key not in foreign:
            checkpoint.delete(key)


def clear_incomplete(url: str, storage_options: dict | None, lock_wait: float | None = None) -> bool:
    """Remove a step directory that holds objects but no root marker (a save of it failed or was killed
    where saves write in place) so the step can be saved afresh, safely against a save of that step
    still running (``commit.clear_interrupted``). Returns whether a save of the step must replace what
    is kept there (``overwrite=True``): an object-store save's claim, which may be a live save's. One
    holding any file no save of ours writes is left alone (the save then refuses the URL:
    ``NotACheckpointError``). Its commit lock is waited for as ``delete_step`` waits."""
    return commit.clear_interrupted(Storage(url, storage_options), lock_wait)


def sweep_litter(root_url: str, storage_options: dict | None = None) -> None:
    """Remove what killed saves left under a run's root: dead staging and trash siblings of every step
    (a live save's tree is kept: its owner lock is held) and step directories without a root marker."""
    root = Storage(root_url, storage_options)
    steps = {parse_step(name.split(".", 1)[0]) for name in root.list_names(STEP_PREFIX) if "." in name}
    for step in sorted(steps - {None}):
        commit.sweep(root.child(step_name(step)))
    for entry in list_steps(root_url, storage_options):
        if entry.incomplete:
            clear_incomplete(entry.url, storage_options)
