"""Carrying plans out: encode and write this rank's cells; read, verify and place the chunks it needs.

The plans (``plan.py``, ``load_plan.py``) say what; this module moves bytes. Writes encode into a small
ring of reused buffers and hand each finished object to a thread pool, so encoding the next cell overlaps
writing.
Reads first check every object's shard index (``check_runs``: present, long enough, the layout the
metadata promises, every entry inside the object, every needed inner chunk stored), then fetch each run of
inner chunks lying back to back in the object with
one ranged read and verify every chunk's crc32c before its values are copied anywhere: all of them at
once (``read_checked``, then ``place``), or batch by batch through two reused buffers of bounded size
(``stream_runs``), one being filled while the other is verified and copied in.
"""

from __future__ import annotations

import functools
import math
import mmap
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from shardstore.codec import CRC_NBYTES, ArrayLayout, decode_index, decode_inner_chunk, encode_shard, index_nbytes, inner_chunk_ranges
from shardstore.dtypes import dtype_info_by_name
from shardstore.errors import CorruptCheckpointError, MissingChunkError
from shardstore.flatten import KeyPath, fqn
from shardstore.format import chunk_key
from shardstore.inputs import local_tensor
from shardstore.load_plan import ReadRun, ReadTask
from shardstore.plan import ArrayPlan, GlobalSavePlan
from shardstore.storage import Storage

__all__ = [
    "WriteStats", "write_cells", "CheckedRun", "check_runs", "read_checked", "read_runs", "stream_runs", "place",
    "copy_into", "object_key", "layout_of",
]

_WRITERS = 4  # concurrent object writes: enough to overlap encoding with I/O
_IN_FLIGHT = 6  # encode buffers in the ring: writes in flight plus the one being encoded
_INDEX_READERS = 16  # concurrent (size, index) reads of shard objects


@dataclass(frozen=True)
class WriteStats:
    nbytes: int
    objects: int


def object_key(node: str, cell: tuple[int, ...]) -> str:
    return f"{node}/{chunk_key(cell)}" if node else chunk_key(cell)


def layout_of(array: ArrayPlan, compressor: str | None) -> ArrayLayout:
    dtype = dtype_info_by_name(array.dtype, fqn(array.key)).torch_dtype
    return ArrayLayout(array.shape, dtype, array.chunk_shape, array.inner_chunk_shape, compressor)


def write_cells(
    storage: Storage,
    plan: GlobalSavePlan,
    rank: int,
    items: Mapping[KeyPath, Any],
    compressor: str | None = None,
    put: Callable[[Storage, str, memoryview], None] | None = None,
) -> WriteStats:
    """Encode and write every cell ``plan`` gives this rank; returns what was encoded.

    ``put(storage, key, blob)`` stores each object (``Storage.write`` by default; an incremental save
    passes ``ObjectWriter.put``, which may link an unchanged object instead).

    Up to ``_IN_FLIGHT`` objects are being written while the next is encoded, each into a buffer of a
    small ring that is reused once its write finished (touching fresh memory costs more than encoding;
    the ring itself is on huge pages, see ``staging_buffer``).
    """
    arrays = {a.key: a for a in plan.arrays}
    layouts = {a.key: layout_of(a, compressor) for a in plan.arrays}
    ring: list[tuple[torch.Tensor, Future | None]] = [(torch.empty(0, dtype=torch.uint8), None)] * _IN_FLIGHT
    nbytes = 0
    store = storage.write if put is None else functools.partial(put, storage)
    with ThreadPoolExecutor(_WRITERS) as pool:
        for i, task in enumerate(plan.writes[rank]):
            array = arrays[task.key]
            data = _source(local_tensor(task.key, items[task.key]), task)
            buffer, busy = ring[i % _IN_FLIGHT]
            if busy is not None:
                busy.result()
            layout = layouts[task.key]
            if buffer.numel() < (needed := encoded_bound(layout)):
                buffer = torch.frombuffer(staging_buffer(needed), dtype=torch.uint8)
            blob = encode_shard(layout, task.cell, data.cpu(), out=buffer)
            nbytes += blob.nbytes
            ring[i % _IN_FLIGHT] = (buffer, pool.submit(store, object_key(array.node, task.cell), blob))
        for _, busy in ring:
            if busy is not None:
                busy.result()
    return WriteStats(nbytes, len(plan.writes[rank]))


def _source(local: torch.Tensor, task) -> torch.Tensor:
    """The values of one cell, with any lazy conjugate or negative bit applied (the bytes written are the
    values the tensor shows, never its raw storage)."""
    return local[task.cell_box.relative_to(task.source_box)].resolve_conj().resolve_neg()


def encoded_bound(layout: ArrayLayout) -> int:
    """The most bytes an uncompressed shard object of ``layout`` can take (every inner chunk stored)."""
    return math.prod(layout.inner_grid_shape) * (layout.inner_chunk_nbytes + CRC_NBYTES) + index_nbytes(layout)


@dataclass(frozen=True)
class CheckedRun:
    """A read run whose object's shard index was read and checked; ``ranges`` are that index's entries."""

    run: ReadRun
    key: str  # the object's storage key
    ranges: tuple

    @property
    def span(self) -> tuple[int, int]:
        return self.ranges[self.run.start].offset, self.ranges[self.run.stop - 1].stop

    @property
    def nbytes(self) -> int:
        start, stop = self.span
        return stop - start


def check_runs(
    storage: Storage, runs: tuple[ReadRun, ...], layouts: Mapping[KeyPath, ArrayLayout], nodes: Mapping[KeyPath, str]
) -> list[CheckedRun]:
    """Read (concurrently: its size, then a small read at its end) and check the shard index of every
    object the runs touch; runs come back split where their inner chunks are not back to back.

    A missing, truncated, rewritten or forged object, or a needed inner chunk that is not stored, fails
    here, before any data is read or any memory for it is allocated: every index entry lies inside its
    object, so the bytes the runs need are backed by the objects.
    """
    keys = [object_key(nodes[run.key], run.cell) for run in runs]
    objects = {key: run for key, run in zip(keys, runs)}
    indices = _concurrently(lambda item: _object_index(storage, layouts[item[1].key], *item), list(objects.items()))
    ranges = dict(zip(objects, indices))
    checked = []
    for run, key in zip(runs, keys):
        _check_stored(storage, run, key, ranges[key])
        checked += _back_to_back(CheckedRun(run, key, ranges[key]))
    return checked


def _concurrently(fn, items: list) -> list:
    if len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(min(_INDEX_READERS, len(items))) as pool:
        return list(pool.map(fn, items))


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


def stream_runs(
    storage: Storage,
    checked: list[CheckedRun],
    layouts: Mapping[KeyPath, ArrayLayout],
    destinations: Mapping[KeyPath, list[torch.Tensor]],
    budget: int,
    written: dict[str, None],
) -> int:
    """Read, verify and place ``checked`` runs in batches through two reused buffers of about ``budget / 2``
    bytes each (a single inner chunk may need more); returns the bytes the buffers took.

    The next batch is read while the current one is verified and copied in; ``written`` gets the name of
    every tensor copied into, so a caller whose load fails part way can say what already changed.
    """
    batches = _batches([part for c in checked for part in _split(c, budget // 2)], budget // 2)
    if not batches:
        return 0
    size = max(sum(c.nbytes for c in batch) for batch in batches)
    buffers = [staging_buffer(size) for _ in range(min(2, len(batches)))]
    with ThreadPoolExecutor(1) as prefetch:
        fetching = prefetch.submit(_fetch, storage, batches[0], buffers[0])
        for i, batch in enumerate(batches):
            blobs = fetching.result()
            if i + 1 < len(batches):
                fetching = prefetch.submit(_fetch, storage, batches[i + 1], buffers[(i + 1) % 2])
            place(_decode(storage, batch, blobs, layouts), destinations, written)
    return size * len(buffers)


_HUGE_PAGE = 2 << 20  # smaller buffers gain nothing from a mapping of their own


def staging_buffer(nbytes: int):
    """Fresh host memory for fetched bytes, backed by transparent huge pages where the OS has them:
    touching fresh memory costs a page fault per 4 KiB page, which made filling it ~4x slower than
    copying (2.2 vs 9.8 GiB/s measured here, 1 GiB)."""
    if nbytes < _HUGE_PAGE:
        return bytearray(nbytes)
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) if hasattr(mmap, "MAP_ANONYMOUS") else bytearray(nbytes)
    if hasattr(buffer, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return buffer


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
    run = checked.run
    tasks = tuple(t for t in run.tasks if start <= t.inner_index < stop)
    return CheckedRun(ReadRun(run.key, run.cell, start, stop, tasks), checked.key, checked.ranges)


def _batches(runs: list[CheckedRun], limit: int) -> list[list[CheckedRun]]:
    """Consecutive runs grouped into batches of at most ``limit`` bytes (a bigger run alone)."""
    batches: list[list[CheckedRun]] = []
    total = 0
    for c in runs:
        if not batches or total + c.nbytes > limit:
            batches.append([])
            total = 0
        batches[-1].append(c)
        total += c.nbytes
    return batches


def _object_index(storage: Storage, layout: ArrayLayout, key: str, run: ReadRun) -> tuple:
    """The checked index of one object: its size first, so the index read and every entry stay inside it."""
    where = f"{storage.key_url(key)} (shard index of {fqn(run.key)!r})"
    size, need = storage.size(key), index_nbytes(layout)
    if size < need:
        raise CorruptCheckpointError(
            f"{where}: the object is {size} bytes, but the index of {math.prod(layout.inner_grid_shape)} inner "
            f"chunks alone takes {need}; the object is truncated or the metadata was damaged — load an earlier "
            "checkpoint or re-run the save"
        )
    stored = decode_index(layout, storage.read_range(key, size - need, size), where, size)
    if layout.compressor is None and stored != inner_chunk_ranges(layout, run.cell):
        raise CorruptCheckpointError(f"{where}: the index does not match the array's layout; the object was damaged or "
                                     "rewritten — load an earlier checkpoint or re-run the save")
    return tuple(stored)


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
    ``load_state_dict`` loads them, and inside inference mode for inference tensors, which no other mode
    may write."""
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
        copy_into(destinations[task.key][task.dest][task.overlap.relative_to(task.dest_box)], values)
        if written is not None:
            written.setdefault(fqn(task.key))
