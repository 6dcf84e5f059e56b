"""Landing a load's chunks: each run of inner chunks read straight into its targets, every chunk's
crc32c verified as it lands (the default load).

The objects were checked first (``object_check.py``). A chunk whose target is one contiguous stretch of
memory is read into that memory itself; the others go through two reused scratch buffers, the next
batch read while this one is verified and copied out (``placing.py``). Memory stays bounded and nothing
is staged twice; the price is that a chunk failing its checksum has already landed, which the caller
reports as ``PartialLoadError`` (all or nothing: ``staged_read.py``).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Mapping

import torch

from dtensor.placements import Box

from shardstore.buffers import fault_in, keep, staging_buffer, take_kept
from shardstore.codec import CRC_NBYTES, ArrayLayout, check_crc, inner_chunk_tensor, inner_chunk_values
from shardstore.flatten import KeyPath, fqn
from shardstore.load_plan import ReadTask, side_by_side
from shardstore.memcopy import as_bytes, copy_side_by_side
from shardstore.object_check import CheckedRun, check_index, data_end, sub_run
from shardstore.placing import count_write, place, target_region
from shardstore.storage import ROOM_ALIGN, ROOM_SLACK, Storage
from shardstore.workers import map_in_turn

__all__ = ["land_runs"]

_LANDING_PIECE = 32 << 20  # a landing load reads runs in pieces of at most this many bytes (and at most
# half a scratch buffer, a ``_BATCHES``-th of the load), a batch's pieces concurrently: one sequential read
# per object left the disk half idle, but 8 MiB pieces cost more than they overlapped (1 GiB cold, one
# process, 6 fresh starts: later loads 0.77 s with 32 MiB pieces against 1.02 s; 2 ranks 0.73 against 0.81)
_BATCH_MIN = 8 << 20  # a batch holds at least this many bytes of scratch chunks (smaller ones added waits)
_PLACED_MIN = 1 << 20  # smaller runs are read into exact scratch slots (they go through the page cache)
_ROOM_EXTRA = ROOM_SLACK + ROOM_ALIGN  # what a placed run's room holds beyond its bytes, at most
_BATCHES = 4  # a load's scratch chunks are read in at least this many batches (of _BATCH_MIN or more each)
_CHECKERS = 2  # threads verifying and placing landed runs: with reads landing in place (O_DIRECT into the
# scratch buffers) the read threads sit idle, and checksums and strided copies were one core's work



def land_runs(
    storage: Storage,
    checked: list[CheckedRun],
    layouts: Mapping[KeyPath, ArrayLayout],
    destinations: Mapping[KeyPath, list[torch.Tensor]],
    budget: int,
    written: dict[str, None],
    fault_ahead: bool = False,
) -> int:
    """Read ``checked`` runs straight into ``destinations``, verifying every inner chunk's crc32c as it
    lands; returns the scratch bytes used (fresh scratch is faulted in on a thread of its own as the
    first reads start, with ``fault_ahead``: where a core is spare).

    An inner chunk whose destination is one contiguous stretch of CPU memory of its dtype (a chunk
    spanning whole rows of the tensor it fills) is read into that memory itself, its checksum into a
    4-byte slot: one ``preadv`` per run on local files, nothing staged, nothing copied. The other chunks
    go through two reused scratch buffers of about ``budget / 2`` bytes each (a single inner chunk may
    need more; the process's kept staging memory where it is big enough, and kept for its next save or
    load: ``buffers.keep``), the next batch being read while this one is verified and copied in (by
    ``_CHECKERS`` threads taking its runs in turn); a run of scratch chunks only is one placed read (``read_range_placed``).
    Memory stays bounded and no fresh memory is touched for the bytes that land directly; the price is
    that a chunk failing its checksum has already landed, so ``written`` gets each tensor's name before
    its first byte arrives and the caller raises ``PartialLoadError`` naming them.
    """
    piece = min(_LANDING_PIECE, _batch_limit(budget, sum(c.nbytes for c in checked)))
    limit = piece - _ROOM_EXTRA if piece >= _PLACED_MIN + _ROOM_EXTRA else piece  # room for a run's slack
    parts = [_landing(part, layouts[part.run.key], destinations, limit) for c in checked for part in _split(c, limit)]
    limit_of_batch = _batch_limit(budget, sum(landing.scratch_nbytes for landing in parts))
    batches = _batches(parts, limit_of_batch, size=lambda landing: landing.scratch_nbytes)
    if not batches:
        return 0
    size = max(sum(landing.scratch_nbytes for landing in batch) for batch in batches)
    # With placed runs, the second buffer starts block-aligned too: a room that did not was read into a
    # bounce buffer and copied (at 4 ranks, 46% of the bytes of a load through scratch).
    if any(landing.placed for landing in parts):
        size = _round_up(size, ROOM_ALIGN)
    count = min(2, len(batches))
    scratch = take_kept(size * count)
    if scratch is None:
        scratch = torch.frombuffer(staging_buffer(size * count), dtype=torch.uint8)
        if fault_ahead:
            fault_in(scratch)
    buffers = [memoryview(scratch.numpy())[i * size : (i + 1) * size] for i in range(count)]
    try:
        with ThreadPoolExecutor(1) as prefetch, ThreadPoolExecutor(_CHECKERS) as checkers:
            fetching = _start_landing(prefetch, storage, batches[0], buffers[0], destinations, written)
            previous: list[Future] = []
            for i, batch in enumerate(batches):
                slots = fetching.result()
                runs = [(storage, layouts[landing.checked.run.key], landing, run_slots, destinations, written)
                        for landing, run_slots in zip(batch, slots)]
                # One task taking the runs in turn with a helper, not a task per run: a thread hand-off
                # each took longer than checking a thousand small runs.
                checks = [checkers.submit(map_in_turn, checkers, _CHECKERS, lambda run: _check_landed(*run), runs)]
                for check in previous:  # the batch before is done with the buffer the next fetch reuses
                    check.result()
                if i + 1 < len(batches):
                    fetching = _start_landing(prefetch, storage, batches[i + 1], buffers[(i + 1) % 2], destinations, written)
                previous = checks
            for check in previous:
                check.result()
    finally:  # both pools have ended: nothing reads into the scratch any more
        keep(scratch)
    return size * count


@dataclass(frozen=True)
class _Landing:
    """A run and where each of its inner chunks lands: a uint8 view of the memory it fills unchanged, or
    None where it goes through scratch memory (then decoded and copied)."""

    checked: CheckedRun
    targets: tuple[torch.Tensor | None, ...]  # per inner chunk, run.start .. run.stop - 1
    placed: bool  # every chunk goes through scratch, and the run is read as one range into room of its
    # own (``Storage.read_range_placed``), which a local cold read fills without a copy
    tasks: tuple[tuple[ReadTask, ...], ...]  # per inner chunk, what is copied out of it
    groups: tuple[int, ...]  # the chunks, in order, as groups copied in one pass (``side_by_side``)

    def chunks(self):
        """(inner chunk index, its stored range, its target or None), in file order."""
        run, ranges = self.checked.run, self.checked.ranges
        return [(i, ranges[i], target) for i, target in zip(range(run.start, run.stop), self.targets)]

    @property
    def scratch_nbytes(self) -> int:
        if self.placed:
            return _round_up(self.checked.nbytes + self.checked.index + ROOM_SLACK, ROOM_ALIGN)
        chunks = sum(CRC_NBYTES if target is not None else stored.nbytes for _, stored, target in self.chunks())
        return chunks + self.checked.index


def _landing(checked: CheckedRun, layout: ArrayLayout, destinations: Mapping[KeyPath, list[torch.Tensor]], limit: int) -> _Landing:
    """Where ``checked``'s chunks land; placed when all go through scratch and the run is big enough to
    be worth room of its own (from ``_PLACED_MIN``), its slack still within ``limit``; the scratch chunks
    grouped as they can be copied out (``side_by_side``)."""
    run = checked.run
    by_chunk: dict[int, list[ReadTask]] = {}
    for task in run.tasks:
        by_chunk.setdefault(task.inner_index, []).append(task)
    tasks = tuple(tuple(by_chunk[i]) for i in range(run.start, run.stop))
    targets = tuple(_target_memory(layout, t, checked.ranges[i], destinations) for i, t in zip(range(run.start, run.stop), tasks))
    placed = all(target is None for target in targets) and _PLACED_MIN <= checked.nbytes <= limit
    groups = side_by_side([t if target is None else None for target, t in zip(targets, tasks)], layout.inner_chunk_shape)
    return _Landing(checked, targets, placed, tasks, tuple(groups))


def _target_memory(layout: ArrayLayout, tasks: tuple[ReadTask, ...], stored, destinations) -> torch.Tensor | None:
    """The memory the stored bytes of one inner chunk fill unchanged (as uint8), or None: the chunk is
    compressed, padded at the array's edge, split over several regions, or lands in memory that is
    strided, not on the CPU, of another dtype or with a lazy conjugate/negative bit."""
    task = tasks[0]
    if len(tasks) != 1 or layout.compressor is not None or stored.nbytes != layout.inner_chunk_nbytes + CRC_NBYTES:
        return None
    if task.overlap != task.inner_box or task.inner_box.sizes != layout.inner_chunk_shape:
        return None
    region = target_region(task, destinations)
    if region.device.type != "cpu" or region.dtype != layout.dtype or not region.is_contiguous():
        return None
    if region.is_conj() or region.is_neg():
        return None
    # As bytes first: a contiguous region may still have a step in a size-1 dim (``x[1::2]`` of length
    # one), which ``reshape(-1)`` keeps, and a dtype view refuses.
    return as_bytes(region.detach()).reshape(-1)


def _start_landing(pool: ThreadPoolExecutor, storage: Storage, batch: list[_Landing], buffer, destinations, written) -> Future:
    """Note every tensor the batch lands bytes in (before any byte does), then read it on ``pool``."""
    for landing in batch:
        if any(target is not None for target in landing.targets):
            written.setdefault(fqn(landing.checked.run.key))
            for task in landing.checked.run.tasks:
                count_write(destinations[task.key][task.dest])
    return pool.submit(_fetch_landing, storage, batch, buffer)


def _fetch_landing(storage: Storage, batch: list[_Landing], buffer) -> list[list[memoryview]]:
    """Read every run of ``batch`` (concurrently), each chunk into its target or the scratch ``buffer``;
    per run, per chunk, the scratch slot it filled (the whole chunk, or only its checksum), then the
    slot of the object's index where the run reads it (``CheckedRun.index``)."""
    scratch = memoryview(buffer).cast("B")
    rooms, pos = {}, 0
    for i, landing in enumerate(batch):  # rooms first: whole blocks each, so every one starts aligned
        if landing.placed:
            rooms[i] = scratch[pos : pos + landing.scratch_nbytes]
            pos += landing.scratch_nbytes
    requests, slots = [], {}
    for i, landing in enumerate(batch):
        if i in rooms:
            continue
        views, slots[i] = [], []
        for _, stored, target in landing.chunks():
            n = stored.nbytes if target is None else CRC_NBYTES
            slot = scratch[pos : pos + n]
            pos += n
            views += [slot] if target is None else [memoryview(target.numpy()), slot]
            slots[i].append(slot)
        if landing.checked.index:
            slots[i].append(scratch[pos : pos + landing.checked.index])
            views.append(slots[i][-1])
            pos += landing.checked.index
        requests.append((landing.checked.key, landing.checked.span[0], views))
    placed = storage.read_placed([(batch[i].checked.key, batch[i].checked.span[0], _read_stop(batch[i].checked), room)
                                  for i, room in rooms.items()])
    storage.read_scattered(requests)
    for i, view in zip(rooms, placed):
        start, stop = batch[i].checked.span
        slots[i] = [view[stored.offset - start : stored.stop - start] for _, stored, _ in batch[i].chunks()]
        if batch[i].checked.index:
            slots[i].append(view[stop - start :])
    return [slots[i] for i in range(len(batch))]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _read_stop(checked: CheckedRun) -> int:
    return checked.span[1] + checked.index


def _check_landed(storage: Storage, layout: ArrayLayout, landing: _Landing, slots: list[memoryview], destinations, written) -> None:
    """Verify every chunk of a landed run, and the object's index where the run read it; copy the
    scratch chunks into their regions."""
    checked = landing.checked
    run = checked.run
    if checked.index:
        where = f"{storage.key_url(checked.key)} (shard index of {fqn(run.key)!r})"
        check_index(layout, data_end(checked.ranges) + checked.index, slots[-1], where, checked.ranges)
    chunks, start = landing.chunks(), 0
    for count in landing.groups:
        group, start = range(start, start + count), start + count
        values = []
        for i in group:
            index, _, target = chunks[i]
            where = f"{storage.key_url(checked.key)} inner chunk {index} of {fqn(run.key)!r}"
            if target is not None:
                check_crc(memoryview(target.numpy()), slots[i], where)
            else:
                values.append(inner_chunk_values(layout, slots[i], where))
        if values:
            _place_chunks(layout, landing.tasks[group.start : group.stop], values, destinations, written)


def _place_chunks(layout: ArrayLayout, chunk_tasks, values: list[memoryview], destinations, written) -> None:
    """Copy verified inner chunks (their ``values``) out to their regions: a group of them side by side
    (``side_by_side``) in one pass where ``copy_side_by_side`` can, else piece by piece."""
    if len(values) > 1:
        first = chunk_tasks[0][0]
        box = Box(first.overlap.offsets, (*first.overlap.sizes[:-1], first.overlap.sizes[-1] * len(values)))
        region = target_region(first, destinations, box)
        written.setdefault(fqn(first.key))
        if copy_side_by_side(region, values, layout.dtype):
            count_write(region)
            return
    chunks = [inner_chunk_tensor(layout, v) for v in values]
    place([(t, chunk[t.overlap.relative_to(t.inner_box)]) for tasks, chunk in zip(chunk_tasks, chunks) for t in tasks], destinations, written)


def _split(checked: CheckedRun, limit: int) -> list[CheckedRun]:
    """A run as sub-runs of consecutive inner chunks of at most ``limit`` bytes each (at least one chunk)."""
    run, parts, start = checked.run, [], checked.run.start
    while start < run.stop:
        stop = start + 1
        while stop < run.stop and checked.ranges[stop].stop - checked.ranges[start].offset <= limit:
            stop += 1
        parts.append(sub_run(checked, start, stop))
        start = stop
    return parts


def _batch_limit(budget: int, need: int) -> int:
    """Bytes per batch of a load needing ``need`` bytes: half the ``budget`` (two buffers), but a
    ``_BATCHES``-th of ``need`` where that is less (and at least ``_BATCH_MIN``), so a small load's first
    batch is verified while the next is read (in one batch it read everything before verifying
    anything). Batches count scratch bytes (``land_runs``): a chunk landing in place takes only its
    checksum's bytes, as its verification is cheap, and splitting such loads only added waits (1000
    tensors from the page cache: 0.87 s against 0.84). A read piece is at most one batch of the whole
    load's bytes."""
    return min(budget // 2, max(_BATCH_MIN, need // _BATCHES))


def _batches(items: list, limit: int, size) -> list[list]:
    """Consecutive items grouped into batches of at most ``limit`` bytes by ``size`` (a bigger one alone)."""
    batches: list[list] = []
    total = 0
    for item in items:
        if not batches or total + size(item) > limit:
            batches.append([])
            total = 0
        batches[-1].append(item)
        total += size(item)
    return batches
