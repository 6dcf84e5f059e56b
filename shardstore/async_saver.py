"""``async_save``: a save that blocks the caller only while its tensors are copied.

The caller's thread plans the save with the other ranks (``saving.plan_save``, collective over the
caller's group) and copies this rank's cells into reused staging memory (``staging.py``); then it
returns an ``AsyncSave`` handle and the caller may mutate its tensors. A background thread, one per
process, claims the URL, writes, syncs and commits (``saving.write_and_commit``) over a gloo group of its
own (``Coordinator.background``), so its collectives never interleave with the training job's. Every
step of it is agreed by all ranks, so an error on any rank is raised by every rank's ``result()`` and no
rank waits for one that gave up. At most one async save is in flight per process: a second one waits for
the first (or raises ``SaveInProgressError``), so no two writers ever share staging memory.
``prepare_async_save`` readies that staging memory on the background thread before the first save.
A save still in flight when the interpreter exits is finished before it does (a failure is printed).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from typing import Any, Mapping

from shardstore.coordinator import Coordinator
from shardstore.errors import SaveInProgressError
from shardstore.gc_pause import gc_paused
from shardstore.saving import SaveJob, SaveOptions, SaveResult, plan_save, write_and_commit
from shardstore.staging import (
    WaveHandoff, cell_nbytes, plan_waves, slot_sizes, stage_waves, staged_pinned, staging_pool, waves_stay_staged,
)

__all__ = ["AsyncSave", "async_save", "prepare_async_save"]


class AsyncSave:
    """The handle of an async save: ``result()`` waits for the commit, ``done()`` asks whether it ended."""

    def __init__(self, url: str, future: Future) -> None:
        self.url = url
        self._future = future
        self._asked = False  # whether the caller has asked for the result (and so seen a failure)

    def result(self, timeout: float | None = None) -> SaveResult:
        """Wait (at most ``timeout`` seconds: ``TimeoutError`` after) until the checkpoint is committed and
        durable; returns this rank's ``SaveResult``, or raises the error that stopped the save (on every
        rank: a failure on another rank arrives as ``RemoteRankError`` naming it)."""
        try:
            return self._future.result(timeout)
        finally:  # a poll that timed out has seen nothing yet: a later failure still gets reported
            self._asked = self._asked or self._future.done()

    def unseen_failure(self) -> BaseException | None:
        """The error that stopped this (ended) save where nobody asked for its result: a loop that starts
        each save without checking the last one would otherwise never learn that it failed."""
        return None if self._asked or not self._future.done() else self._future.exception()

    def done(self) -> bool:
        """Whether the save ended, committed or failed (``result()`` then returns at once)."""
        return self._future.done()


_writer: tuple[int, ThreadPoolExecutor] | None = None
_in_flight: tuple[int, AsyncSave] | None = None  # (pid, save): the latest async save, and the process it runs in


def _latest_here() -> AsyncSave | None:
    """This process's latest async save; a forked child has none (its parent's writer thread is not
    there, so the parent's save never ends in the child)."""
    return _in_flight[1] if _in_flight is not None and _in_flight[0] == os.getpid() else None


def _finish_at_exit() -> None:
    """At interpreter exit, before thread pools refuse new work: finish the async save still in flight.
    Why: its writer submits to thread pools, which refuse work once the interpreter shuts down, so a
    script that ended without ``result()`` lost its last checkpoint without a word. A failure nobody
    could have seen (also of a save that failed earlier, its result never asked for) is printed."""
    save = _latest_here()
    if save is None or (save.done() and save.unseen_failure() is None):
        return
    try:
        save.result()
    except BaseException as exc:  # noqa: BLE001 - at exit: reported, not raised
        print(f"shardstore: the async save to {save.url} failed, its result() never asked for: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)


# Run before concurrent.futures' own exit hook (registered earlier, so run later) stops its pools.
threading._register_atexit(_finish_at_exit)


def _background() -> ThreadPoolExecutor:
    """The one background thread of this process (a forked child gets its own)."""
    global _writer
    if _writer is None or _writer[0] != os.getpid():
        _writer = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="shardstore-async-save"))
    return _writer[1]


@gc_paused
def async_save(
    state_dict: Mapping[str, Any],
    url: str,
    *,
    storage_options: dict | None = None,
    process_group=None,
    overwrite: bool = False,
    compressor: str | None = None,
    user_metadata: dict | None = None,
    durable: bool = True,
    incremental: bool | str = False,
    max_staging_bytes: int | None = None,
    wait_for_previous: bool = True,
) -> AsyncSave:
    """Start saving ``state_dict`` as ``save`` would (same keywords, same checkpoint, same guarantees once
    committed); collective over the group. Returns once every value to save is copied, so the caller may
    mutate its state right away; writing, syncing and the commit go on in the background.

    ``max_staging_bytes`` bounds this rank's staging memory: above it, the copy proceeds in waves while
    earlier waves are written, so the call returns later. With ``wait_for_previous=False`` a save still
    in flight on any rank raises ``SaveInProgressError`` on every rank instead of waiting for it."""
    start = time.perf_counter()
    _check_budget(max_staging_bytes)
    options = SaveOptions(url, storage_options, overwrite, compressor, user_metadata, durable, incremental)
    coord = Coordinator(process_group)
    _wait_for_previous(coord, wait_for_previous)
    background = coord.background()
    job = plan_save(coord, state_dict, options.user_metadata)
    waves = plan_waves(_staged_sizes(job), max_staging_bytes)
    handoff = WaveHandoff(len(waves))
    future = _background().submit(_write_in_background, background, job, options, handoff, waves_stay_staged(waves), start)
    stage_waves(job.writes, job.tensors, waves, handoff, staging_pool())
    global _in_flight
    _in_flight = (os.getpid(), AsyncSave(url, future))
    return _in_flight[1]


def prepare_async_save(
    state_dict: Mapping[str, Any], *, process_group=None, max_staging_bytes: int | None = None,
) -> Future:
    """Fault in, on the background thread, the staging memory that an ``async_save`` of ``state_dict``
    (with the same ``max_staging_bytes``) will copy into; collective over the group (it plans that save).

    Why: a fresh process's first ``async_save`` blocks mostly on touching new memory (2 GiB took 2.5-3.6
    s here, a later save 0.19 s), which no copy strategy avoids; done here, early in training, it
    overlaps with the steps before the first save. Returns a future that completes once the memory is
    ready (a save started before that waits for it). The memory is the pool's, kept for every later
    save; a later save that needs more still allocates it then."""
    _check_budget(max_staging_bytes)
    job = plan_save(Coordinator(process_group), state_dict, None)
    sizes = _staged_sizes(job)
    need = slot_sizes(sizes, plan_waves(sizes, max_staging_bytes))
    return _background().submit(staging_pool().reserve, need, staged_pinned(job.writes, job.tensors))


def _staged_sizes(job: SaveJob) -> list[int]:
    """The staged bytes of each of this rank's cells, in the order they are staged."""
    itemsize = {a.key: a.itemsize for a in job.plan.arrays}
    return [cell_nbytes(t, itemsize[t.key]) for t in job.writes]


def _check_budget(max_staging_bytes: int | None) -> None:
    if max_staging_bytes is not None and (
        not isinstance(max_staging_bytes, int) or isinstance(max_staging_bytes, bool) or max_staging_bytes <= 0
    ):
        raise ValueError(f"max_staging_bytes must be None (no bound) or a number of bytes (an int > 0), got {max_staging_bytes!r}")


def _wait_for_previous(coord: Coordinator, wait: bool) -> None:
    """Wait for this process's previous async save; or, not waiting, refuse on every rank if any rank
    still has one in flight (all ranks decide alike, so none goes on alone into the next collective)."""
    previous = _latest_here()
    if wait:
        if previous is not None:
            wait_for([previous._future])
            _warn_if_failed(previous)
        return
    busy = [r for r, b in enumerate(coord.all_gather(previous is not None and not previous.done())) if b]
    if busy:
        raise SaveInProgressError(
            f"an async save (to {previous.url if previous else 'another URL'}) is still in flight on rank(s) "
            f"{busy}; wait for its result() first, or call async_save with wait_for_previous=True (the default)"
        )


def _warn_if_failed(previous: AsyncSave) -> None:
    failure = previous.unseen_failure()
    if failure is not None:
        warnings.warn(f"the previous async save, to {previous.url}, failed and its result() was never asked for: "
                      f"{type(failure).__name__}: {failure}; that checkpoint was not written", RuntimeWarning, stacklevel=4)


def _write_in_background(coord: Coordinator, job: SaveJob, options: SaveOptions, handoff: WaveHandoff,
                         stable_cells: bool, start: float) -> SaveResult:
    """The background half of an async save. It starts work only once the caller has staged the first
    wave: begun beside the staging, its Python (claiming, the arrays' metadata of a thousand tensors)
    held the GIL against the caller's thousands of short torch calls, each waiting for it up to a switch
    interval (1000 tensors of 64 KiB-1 MiB: the caller blocked 0.8-0.9 s instead of 0.2 s)."""
    try:
        handoff.wait_first()
        stats = write_and_commit(coord, job, options, handoff.cells(), stable_cells, background=True)
    finally:
        handoff.close()  # a caller still staging stops waiting for buffers
    return SaveResult.of(options.url, stats, start)
