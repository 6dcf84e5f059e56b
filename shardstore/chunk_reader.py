"""Carrying out a load plan: read, verify and place the chunks this rank needs.

The plan (``load_plan.py``) says what; this module moves bytes. It first checks every object's shard
index (``check_runs``: present, long enough, the layout the metadata promises, every entry inside the
object, every needed inner chunk stored), then fetches each run of inner chunks lying back to back in the
object with one ranged read: straight into the targets where a chunk lands unchanged, else through two
reused scratch buffers, every chunk's crc32c verified as it lands (``land_runs``); or, all or nothing,
every chunk into staging memory and verified before any is copied (``read_checked``, then ``place``).
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Mapping

import torch

from dtensor.placements import Box

from shardstore.buffers import fault_in, keep, staging_buffer, take_kept
from shardstore.codec import (CRC_NBYTES, ArrayLayout, check_crc, decode_index, decode_inner_chunk, index_nbytes, inner_chunk_ranges,
                              inner_chunk_tensor, inner_chunk_values)
from shardstore.errors import CorruptCheckpointError, MissingChunkError
from shardstore.flatten import KeyPath, fqn
from shardstore.format import object_key
from shardstore.load_plan import ReadRun, ReadTask, side_by_side
from shardstore.memcopy import copy_bytes, copy_side_by_side
from shardstore.storage import ROOM_ALIGN, ROOM_SLACK, Storage, io_map

__all__ = ["CheckedRun", "check_runs", "read_checked", "read_runs", "land_runs", "place", "copy_into", "read_index"]

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


@dataclass(frozen=True)
class CheckedRun:
    """A read run whose object was checked; ``ranges`` are its shard index's entries.

    ``index`` is 0 when the index was read and checked already; else the object is uncompressed, its
    size was checked against the ``ranges`` its layout implies, and its ``index`` bytes follow this run's
    last chunk: they are read with the run and checked as it lands (``land_runs``)."""

    run: ReadRun
    key: str  # the object's storage key
    ranges: tuple
    index: int = 0

    @property
    def span(self) -> tuple[int, int]:
        """The bytes of the run's inner chunks (without any index read with them)."""
        return self.ranges[self.run.start].offset, self.ranges[self.run.stop - 1].stop

    @property
    def nbytes(self) -> int:
        start, stop = self.span
        return stop - start


def check_runs(
    storage: Storage,
    runs: tuple[ReadRun, ...],
    layouts: Mapping[KeyPath, ArrayLayout],
    nodes: Mapping[KeyPath, str],
    index_as_it_lands: bool = False,
) -> list[CheckedRun]:
    """Check every object the runs touch, concurrently: its size, then its shard index (a small read at
    its end); runs come back split where their inner chunks are not back to back.

    A missing or truncated object, or a needed inner chunk that is not stored, fails here, before any
    data is read or any memory for it is allocated: every index entry lies inside its object, so the
    bytes the runs need are backed by the objects. With ``index_as_it_lands``, an uncompressed object
    that a run reads to the end of its chunks and whose size is the one its layout implies has its
    index read with that run and checked as it lands (``CheckedRun.index``): one read of the object, not
    two, for the price that a rewritten or forged index of the right size fails only once the run's
    bytes have landed. Else a rewritten or forged index fails here too.
    """
    keys = [object_key(nodes[run.key], layouts[run.key], run.cell) for run in runs]
    objects: dict[str, list[ReadRun]] = {}
    for key, run in zip(keys, runs):
        objects.setdefault(key, []).append(run)
    found = io_map(lambda item: _object_ranges(storage, layouts[item[1][0].key], *item, index_as_it_lands), list(objects.items()))
    ranges = dict(zip(objects, found))
    checked = []
    for run, key in zip(runs, keys):
        stored, index = ranges[key]
        _check_stored(storage, run, key, stored)
        checked += _back_to_back(CheckedRun(run, key, stored, index if _reads_to_end(run, stored) else 0))
    return checked


def _object_ranges(storage: Storage, layout: ArrayLayout, key: str, runs: list[ReadRun], index_as_it_lands: bool) -> tuple[tuple, int]:
    """The object's inner chunk ranges and how many index bytes its last run must read and check (0:
    the index was read and checked here)."""
    if index_as_it_lands and layout.compressor is None:
        implied = tuple(inner_chunk_ranges(layout, runs[0].cell))
        if any(_reads_to_end(run, implied) for run in runs) and storage.size(key) == _data_end(implied) + index_nbytes(layout):
            return implied, index_nbytes(layout)
    return read_index(storage, layout, key, runs[0].cell, fqn(runs[0].key)), 0


def _reads_to_end(run: ReadRun, ranges: tuple) -> bool:
    """Whether ``run`` reads the object's last stored inner chunk (its index follows that chunk)."""
    last = ranges[run.stop - 1]
    return last is not None and last.stop == _data_end(ranges)


def _data_end(ranges: tuple) -> int:
    return max((r.stop for r in ranges if r is not None), default=0)


def read_checked(
    storage: Storage, checked: list[CheckedRun], layouts: Mapping[KeyPath, ArrayLayout]
) -> list[tuple[ReadTask, torch.Tensor]]:
    """Fetch the data of ``checked`` runs into one fresh staging buffer and verify it; returns (task,
    source values) pairs, which view the fetched bytes."""
    buffer = staging_buffer(sum(c.nbytes for c in checked))
    return _decode(storage, checked, _fetch(storage, checked, buffer), layouts)


def read_runs(
    storage: Storage,
    runs: tuple[ReadRun, ...],
    layouts: Mapping[KeyPath, ArrayLayout],
    nodes: Mapping[KeyPath, str],
) -> list[tuple[ReadTask, torch.Tensor]]:
    """Fetch and verify every inner chunk the runs need (indices first); nothing is copied anywhere."""
    return read_checked(storage, check_runs(storage, runs, layouts, nodes), layouts)


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
    ``_CHECKERS`` threads, a run each); a run of scratch chunks only is one placed read (``read_range_placed``).
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
                checks = [
                    checkers.submit(_check_landed, storage, layouts[landing.checked.run.key], landing, run_slots, destinations, written)
                    for landing, run_slots in zip(batch, slots)
                ]
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
    region = _region(task, destinations)
    if region.device.type != "cpu" or region.dtype != layout.dtype or not region.is_contiguous():
        return None
    if region.is_conj() or region.is_neg():
        return None
    return region.detach().reshape(-1).view(torch.uint8)


def _region(task: ReadTask, destinations: Mapping[KeyPath, list[torch.Tensor]], box: Box | None = None) -> torch.Tensor:
    """The part of its destination tensor that ``task`` fills, or ``box`` of it (the tensor itself when
    that is all of it, as one chunk fills a small tensor: no indexing)."""
    dest, box = destinations[task.key][task.dest], task.overlap if box is None else box
    return dest if box == task.dest_box else dest[box.relative_to(task.dest_box)]


def _start_landing(pool: ThreadPoolExecutor, storage: Storage, batch: list[_Landing], buffer, destinations, written) -> Future:
    """Note every tensor the batch lands bytes in (before any byte does), then read it on ``pool``."""
    for landing in batch:
        if any(target is not None for target in landing.targets):
            written.setdefault(fqn(landing.checked.run.key))
            for task in landing.checked.run.tasks:
                _count_write(destinations[task.key][task.dest])
    return pool.submit(_fetch_landing, storage, batch, buffer)


def _count_write(dest: torch.Tensor) -> None:
    """Bump the version counter of memory written behind autograd's back, as ``copy_`` would, so a graph
    that saved the old values refuses to run backward on the new ones (inference tensors have none)."""
    if not dest.is_inference():
        torch.autograd.graph.increment_version(dest)


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
        check_index(layout, _data_end(checked.ranges) + checked.index, slots[-1], where, checked.ranges)
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
        region = _region(first, destinations, box)
        written.setdefault(fqn(first.key))
        if copy_side_by_side(region, values, layout.dtype):
            _count_write(region)
            return
    chunks = [inner_chunk_tensor(layout, v) for v in values]
    place([(t, chunk[t.overlap.relative_to(t.inner_box)]) for tasks, chunk in zip(chunk_tasks, chunks) for t in tasks], destinations, written)


def _fetch(storage: Storage, batch: list[CheckedRun], buffer) -> list[memoryview]:
    """The runs' bytes, read concurrently and packed one after another into ``buffer``."""
    return storage.read_ranges_into([(c.key, *c.span) for c in batch], buffer)


def _decode(storage: Storage, batch: list[CheckedRun], blobs, layouts: Mapping[KeyPath, ArrayLayout]) -> list:
    """Verify every fetched inner chunk; (task, source values) pairs viewing the fetched bytes."""
    return [p for c, blob in zip(batch, blobs) for p in _decode_run(storage, layouts[c.run.key], c.run, c.key, c.ranges, blob)]


def _split(checked: CheckedRun, limit: int) -> list[CheckedRun]:
    """A run as sub-runs of consecutive inner chunks of at most ``limit`` bytes each (at least one chunk)."""
    run, parts, start = checked.run, [], checked.run.start
    while start < run.stop:
        stop = start + 1
        while stop < run.stop and checked.ranges[stop].stop - checked.ranges[start].offset <= limit:
            stop += 1
        parts.append(_sub_run(checked, start, stop))
        start = stop
    return parts


def _back_to_back(checked: CheckedRun) -> list[CheckedRun]:
    """A run as sub-runs whose inner chunks lie back to back in the object, each then one ranged read of
    exactly its chunks (shardstore writes them so; another writer may order them otherwise)."""
    run, ranges = checked.run, checked.ranges
    cuts = [i for i in range(run.start + 1, run.stop) if ranges[i].offset != ranges[i - 1].stop]
    bounds = [run.start, *cuts, run.stop]
    return [checked] if not cuts else [_sub_run(checked, a, b) for a, b in zip(bounds, bounds[1:])]


def _sub_run(checked: CheckedRun, start: int, stop: int) -> CheckedRun:
    """Inner chunks ``start..stop-1`` of ``checked``; the last one reads the index, if ``checked`` does."""
    run = checked.run
    tasks = tuple(t for t in run.tasks if start <= t.inner_index < stop)
    index = checked.index if stop == run.stop else 0
    return CheckedRun(ReadRun(run.key, run.cell, start, stop, tasks), checked.key, checked.ranges, index)


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


def read_index(storage: Storage, layout: ArrayLayout, key: str, cell: tuple[int, ...], name: str) -> tuple:
    """The checked index of the object ``key`` (cell ``cell`` of tensor ``name``), read with the object's
    size, so every entry is checked to lie inside it; uncompressed, it must be the index the layout
    implies."""
    where = f"{storage.key_url(key)} (shard index of {name!r})"
    need = index_nbytes(layout)
    size, tail = storage.read_suffix(key, need)
    if size < need:
        raise CorruptCheckpointError(
            f"{where}: the object is {size} bytes, but the index of {math.prod(layout.inner_grid_shape)} inner "
            f"chunks alone takes {need}; the object is truncated or the metadata was damaged — load an earlier "
            "checkpoint or re-run the save"
        )
    implied = None if layout.compressor is not None else tuple(inner_chunk_ranges(layout, cell))
    return check_index(layout, size, tail, where, implied)


def check_index(layout: ArrayLayout, size: int, tail, where: str, implied: tuple | None) -> tuple:
    """The entries of the index ``tail`` of an object of ``size`` bytes, checked (``decode_index``);
    an uncompressed object's must be the ``implied`` ranges its layout gives (None: compressed)."""
    stored = tuple(decode_index(layout, tail, where, size))
    if implied is not None and stored != implied:
        raise CorruptCheckpointError(f"{where}: the index does not match the array's layout; the object was damaged or "
                                     "rewritten — load an earlier checkpoint or re-run the save")
    return stored


def _check_stored(storage: Storage, run: ReadRun, key: str, ranges: tuple) -> None:
    for i in range(run.start, run.stop):
        if ranges[i] is None:
            raise MissingChunkError(f"{storage.key_url(key)}: inner chunk {i} of {fqn(run.key)!r} is not stored")


def _decode_run(storage: Storage, layout: ArrayLayout, run: ReadRun, key: str, ranges, blob) -> list:
    base = ranges[run.start].offset
    chunks: dict[int, torch.Tensor] = {}
    out = []
    for task in run.tasks:
        if task.inner_index not in chunks:
            r = ranges[task.inner_index]
            where = f"{storage.key_url(key)} inner chunk {task.inner_index} of {fqn(run.key)!r}"
            chunks[task.inner_index] = decode_inner_chunk(layout, memoryview(blob)[r.offset - base : r.stop - base], where)
        out.append((task, chunks[task.inner_index][task.overlap.relative_to(task.inner_box)]))
    return out


def copy_into(dest: torch.Tensor, values: torch.Tensor) -> None:
    """``dest.copy_(values)`` outside autograd, so parameters that require grad load as
    ``load_state_dict`` loads them (their version counter bumped), and inside inference mode for
    inference tensors, which no other mode may write. Between CPU tensors of one dtype the bytes move
    on this thread (``memcopy``)."""
    if copy_bytes(dest, values):
        _count_write(dest)
        return
    with torch.inference_mode() if dest.is_inference() else torch.no_grad():
        dest.copy_(values)


def place(
    pieces: list[tuple[ReadTask, torch.Tensor]],
    destinations: Mapping[KeyPath, list[torch.Tensor]],
    written: dict[str, None] | None = None,
) -> None:
    """Copy every verified piece into its destination tensor (one host-to-device copy per piece), noting
    in ``written`` (when given) the name of each tensor as it is first written."""
    for task, values in pieces:
        copy_into(_region(task, destinations), values)
        if written is not None:
            written.setdefault(fqn(task.key))
