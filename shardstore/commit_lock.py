"""The commit lock ``<url>.lock`` beside a checkpoint: every commit takes it (``commit.py``), and so does
every deletion of a checkpoint (retention, ``shardstore gc``), so no commit lands while another holder
is at work. Locally it is an ``flock``ed file, which dies with its process; on object stores an
exclusively created object, which outlives a killed holder: ``unlock`` removes such a one, told how
old it is (``lock_age``). docs/format.md §5 is the contract.
"""

from __future__ import annotations

import time

from shardstore.errors import ConcurrentSaveError, MissingChunkError, ShardstoreError
from shardstore.storage import HeldLock, Storage

__all__ = ["LOCK_WAIT_S", "commit_lock", "lock_age", "unlock"]

LOCK_WAIT_S = 30.0  # how long a commit waits for another holder (a commit takes milliseconds)


def commit_lock(target: Storage, wait: float | None = None) -> HeldLock:
    """The commit lock of ``target``, beside it, waiting up to ``wait`` seconds (default ``LOCK_WAIT_S``)
    for another holder: every commit takes it, so no commit lands while another holder (a deletion of
    the checkpoint) is at work. Where taking it created the directories leading to
    the URL (a first save into a new run directory), their entries are made durable here: the commit
    syncs only the directory it renames into, so a returned save could otherwise vanish with them in
    a power cut (nothing to sync, and no cost, where they existed)."""
    parent = target.parent()
    wait = LOCK_WAIT_S if wait is None else wait
    try:
        lock = parent.lock(_lock_key(target), timeout=wait)
    except TimeoutError:
        raise ConcurrentSaveError(
            f"another save has been committing to {target.url} for over {wait:g} s "
            f"({target.url}.lock is held); re-run the save once it is done{_left_behind(target)}"
        ) from None
    try:
        parent.sync()
    except BaseException:
        lock.release()
        raise
    return lock


def _lock_key(target: Storage) -> str:
    return f"{target.name}.lock"


def _left_behind(target: Storage) -> str:
    """What to say of a held lock object: its age, and how to remove it if a killed process left it (an
    object outlives its holder; a local lock dies with its process, so nothing is said there)."""
    if target.can_rename_trees:
        return ""
    try:
        age = lock_age(target)
    except (ShardstoreError, OSError):
        return ""  # the error being raised is the one to report
    return "" if age is None else (
        f". The lock was created {age:.0f} s ago; a commit holds it for milliseconds and a deletion of the "
        f"checkpoint as long as that takes. If neither is running, a killed process left it: "
        f"`shardstore unlock {target.url}` removes it")


def lock_age(target: Storage) -> float | None:
    """Seconds since ``target``'s commit lock was taken, by the store's clock against this host's (None
    when nobody holds it). Where clocks disagree the age is off by as much; a store that reports no
    time gives 0 (so ``unlock`` removes such a lock only when told to regardless of age)."""
    parent = target.parent()
    try:
        created = parent.modified(_lock_key(target))
    except MissingChunkError:
        return None
    return 0.0 if created is None else max(0.0, time.time() - created)


def unlock(target: Storage, older_than: float) -> float | None:
    """Remove ``target``'s commit lock where a killed process left it; returns its age (None: nobody
    held it). A lock object on an object store outlives a process killed while committing or deleting
    the checkpoint, and every later commit to the URL then waits and fails. Only a lock at least
    ``older_than`` seconds old is removed (younger: ``ConcurrentSaveError``): a commit holds it for
    milliseconds, so an old one is a dead holder's unless a long deletion is running, which only a
    person can rule out. Locally a lock dies with its process: a held one is a live process's and is
    never removed (``ConcurrentSaveError``), a free one is gone once taken and released here.

    Not atomic with the holder: a holder releasing the lock between the last look and the removal, and
    another process taking it in that instant, would lose it; that is why old locks only, and the
    lock's content (each holder's own id) is read again just before the removal."""
    parent = target.parent()
    if target.can_rename_trees:
        if not parent.exists(_lock_key(target)):
            return None  # (taking it would create the directories leading to the URL)
        try:
            parent.lock(_lock_key(target), timeout=0).release()
        except TimeoutError:
            raise ConcurrentSaveError(f"{target.url}.lock is held by a running process (a local lock is "
                                      "released by the kernel when its process dies); not removed") from None
        return None
    try:
        held_by = parent.read(_lock_key(target))
    except MissingChunkError:
        return None
    age = lock_age(target)
    if age is None:
        return None
    if age < older_than:
        raise ConcurrentSaveError(
            f"{target.url}.lock was created {age:.0f} s ago, under the {older_than:g} s asked for: a save "
            "committing to it or a deletion of it may still be running; not removed (if you know that no "
            "process is, run again with a smaller --older-than)")
    try:
        if parent.read(_lock_key(target)) != held_by:
            raise ConcurrentSaveError(f"{target.url}.lock was released and taken again while being looked at: "
                                      "a process is at work on that URL; not removed")
    except MissingChunkError:
        return None  # released meanwhile
    parent.delete(_lock_key(target))
    return age
