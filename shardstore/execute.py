"""Carrying plans out: encode and write this rank's cells; read, verify and place the chunks it needs.

The plans (``plan.py``) say what; this module moves bytes. Writes encode into a small ring of reused
buffers and hand each finished object to a thread pool, so encoding the next cell overlaps writing.
Reads fetch each run of consecutive inner chunks with one ranged read, verify every chunk's crc32c
and only then copy anything into the caller's tensors.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch.distributed.checkpoint.metadata import MetadataIndex

from shardstore.codec import CRC_NBYTES, ArrayLayout, decode_index, decode_inner_chunk, encode_shard, index_nbytes, inner_chunk_ranges
from shardstore.dtypes import dtype_info_by_name
from shardstore.errors import CorruptCheckpointError, MissingChunkError
from shardstore.flatten import KeyPath, fqn
from shardstore.format import chunk_key
from shardstore.plan import ArrayPlan, GlobalSavePlan, ReadRun, ReadTask
from shardstore.storage import Storage

__all__ = ["WriteStats", "write_cells", "read_runs", "place", "object_key", "layout_of", "local_tensor"]

_WRITERS = 4  # concurrent object writes: enough to overlap encoding with I/O
_IN_FLIGHT = 6  # encode buffers in the ring: writes in flight plus the one being encoded


@dataclass(frozen=True)
class WriteStats:
    nbytes: int
    objects: int


def object_key(node: str, cell: tuple[int, ...]) -> str:
    return f"{node}/{chunk_key(cell)}" if node else chunk_key(cell)


def layout_of(array: ArrayPlan, compressor: str | None) -> ArrayLayout:
    dtype = dtype_info_by_name(array.dtype, fqn(array.key)).torch_dtype
    return ArrayLayout(array.shape, dtype, array.chunk_shape, array.inner_chunk_shape, compressor)


def local_tensor(key: KeyPath, value: Any) -> torch.Tensor:
    """The tensor this rank holds of a state dict entry: a DTensor's local shard, or the tensor itself."""
    if hasattr(type(value), "__get_tensor_shard__"):
        return value.__get_tensor_shard__(MetadataIndex(fqn(key)))
    return value


def write_cells(
    storage: Storage, plan: GlobalSavePlan, rank: int, items: Mapping[KeyPath, Any], compressor: str | None = None
) -> WriteStats:
    """Encode and write every cell ``plan`` gives this rank; returns what was written.

    Up to ``_IN_FLIGHT`` objects are being written while the next is encoded, each into a buffer of a
    small ring that is reused once its write finished (touching fresh memory costs more than encoding).
    """
    arrays = {a.key: a for a in plan.arrays}
    layouts = {a.key: layout_of(a, compressor) for a in plan.arrays}
    ring: list[tuple[torch.Tensor, Future | None]] = [(torch.empty(0, dtype=torch.uint8), None)] * _IN_FLIGHT
    nbytes = 0
    with ThreadPoolExecutor(_WRITERS) as pool:
        for i, task in enumerate(plan.writes[rank]):
            array = arrays[task.key]
            data = local_tensor(task.key, items[task.key]).detach()[task.cell_box.relative_to(task.source_box)]
            buffer, busy = ring[i % _IN_FLIGHT]
            if busy is not None:
                busy.result()
            layout = layouts[task.key]
            if buffer.numel() < (needed := encoded_bound(layout)):
                buffer = torch.empty(needed, dtype=torch.uint8)
            blob = encode_shard(layout, task.cell, data.cpu(), out=buffer)
            nbytes += blob.nbytes
            ring[i % _IN_FLIGHT] = (buffer, pool.submit(storage.write, object_key(array.node, task.cell), blob))
        for _, busy in ring:
            if busy is not None:
                busy.result()
    return WriteStats(nbytes, len(plan.writes[rank]))


def encoded_bound(layout: ArrayLayout) -> int:
    """The most bytes an uncompressed shard object of ``layout`` can take (every inner chunk stored)."""
    return math.prod(layout.inner_grid_shape) * (layout.inner_chunk_nbytes + CRC_NBYTES) + index_nbytes(layout)


def read_runs(
    storage: Storage,
    runs: tuple[ReadRun, ...],
    layouts: Mapping[KeyPath, ArrayLayout],
    nodes: Mapping[KeyPath, str],
) -> list[tuple[ReadTask, torch.Tensor]]:
    """Fetch and verify every inner chunk the runs need; returns (task, source values) pairs.

    Each object's shard index is read too (a small suffix read, fetched concurrently with the data) and
    checked, so a truncated or rewritten object is caught even when its data ranges look intact.
    Nothing is copied into the caller's tensors here, so a corrupt or missing chunk fails the load
    before any destination changes.
    """
    keys = [object_key(nodes[run.key], run.cell) for run in runs]
    index_reads = {key: (key, -index_nbytes(layouts[run.key]), None) for key, run in zip(keys, runs)}
    index_blobs = dict(zip(index_reads, storage.read_ranges(list(index_reads.values()))))
    requests, spans = [], []
    for run, key in zip(runs, keys):
        ranges = _ranges(storage, layouts[run.key], run, key, index_blobs[key])
        requests.append((key, ranges[run.start].offset, ranges[run.stop - 1].stop))
        spans.append((run, key, ranges))
    out = []
    for (run, key, ranges), blob in zip(spans, storage.read_ranges(requests)):
        out.extend(_decode_run(storage, layouts[run.key], run, key, ranges, blob))
    return out


def _ranges(storage: Storage, layout: ArrayLayout, run: ReadRun, key: str, index_blob) -> list:
    where = f"{storage.key_url(key)} (shard index of {fqn(run.key)!r})"
    stored = decode_index(layout, index_blob, where)
    if layout.compressor is None and stored != inner_chunk_ranges(layout, run.cell):
        raise CorruptCheckpointError(f"{where}: the index does not match the array's layout; the object was damaged or rewritten")
    for i in range(run.start, run.stop):
        if stored[i] is None:
            raise MissingChunkError(f"{storage.key_url(key)}: inner chunk {i} of {fqn(run.key)!r} is not stored")
    return stored


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


def place(pieces: list[tuple[ReadTask, torch.Tensor]], destinations: Mapping[KeyPath, list[torch.Tensor]]) -> None:
    """Copy every verified piece into its destination tensor (one host-to-device copy per piece)."""
    for task, values in pieces:
        dest = destinations[task.key][task.dest]
        dest[task.overlap.relative_to(task.dest_box)].copy_(values)
