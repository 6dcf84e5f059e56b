"""Carrying out a save plan: encode this rank's cells and write them, one object per cell.

The plan (``plan.py``) says what; this module moves bytes. Each object is encoded into a slab of reused
memory bounded in bytes (``buffers.py``) and handed to a thread pool, so encoding the next cell
overlaps writing.
"""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from shardstore.buffers import EncodeSlab
from shardstore.codec import CRC_NBYTES, ArrayLayout, encode_shard, index_nbytes, shard_parts
from shardstore.dtypes import dtype_info_by_name
from shardstore.flatten import KeyPath, fqn
from shardstore.format import object_key
from shardstore.inputs import local_tensor
from shardstore.plan import ArrayPlan, GlobalSavePlan, WriteTask
from shardstore.storage import Blob, Storage, blob_nbytes
from shardstore.workers import cpu_pool, map_in_turn

__all__ = ["WriteStats", "write_cells", "cells_of", "cell_values", "encoded_bound", "layout_of"]

_WRITERS = 4  # concurrent object writes: enough to overlap encoding with I/O
_IN_FLIGHT = 6  # encoded objects whose writes may be in flight at once
_SLAB_BYTES = 256 << 20  # the most encode slab a host's saving ranks map together (but one object bigger than that: its size)
_SPREAD_FROM = 16 << 20  # objects from this size are encoded on several threads, where a rank has the
# cores: a 2 MiB object of 16 inner chunks took 1.7 ms on two threads against 0.65 ms on one (hand-offs),
# a 64 MiB one 10.7 ms against 18 ms
_COPY_FROM = 1 << 20  # objects from this size are encoded into the slab even where they could be written
# uncopied: block-aligned memory lets a local filesystem take them with O_DIRECT (``direct_io._WRITE_MIN``,
# the same 1 MiB), faster than the page cache


@dataclass(frozen=True)
class WriteStats:
    nbytes: int
    objects: int
    linked: int = 0  # of ``objects``: unchanged ones linked from the previous checkpoint (incremental saves)
    linked_bytes: int = 0


def layout_of(array: ArrayPlan, compressor: str | None) -> ArrayLayout:
    dtype = dtype_info_by_name(array.dtype, fqn(array.key)).torch_dtype
    return ArrayLayout(array.shape, dtype, array.chunk_shape, array.inner_chunk_shape, compressor)


def write_cells(
    storage: Storage,
    plan: GlobalSavePlan,
    cells: Iterable[tuple[WriteTask, torch.Tensor]],
    compressor: str | None = None,
    put: Callable[[Storage, str, Blob], None] | None = None,
    keep_slab: bool = True,
    stable: bool = False,
    fault_ahead: bool = False,
    encoders: int = 1,
    ranks_here: int = 1,
) -> WriteStats:
    """Encode and write ``cells`` (each a write task and the values of its cell); returns what was encoded.

    ``put(storage, key, blob)`` stores each object (``Storage.write`` by default; an incremental save
    passes ``IncrementalWriter.put``, which records each written object's digest; unchanged cells never
    reach here, they were linked before encoding).

    Each object is encoded into an ``EncodeSlab`` (``_slab_bytes``: ``ranks_here``, the ranks saving
    on this host, share ``_SLAB_BYTES``; or the biggest object;
    kept for the process's next save unless ``keep_slab`` is false) and written by a thread pool while
    the next is encoded. A cell's values are copied out by the time the next cell is asked for, so
    ``cells`` may hand out reused staging memory; with ``stable`` (every cell's values stay put until
    this returns) an object under ``_COPY_FROM`` bytes that is its cell's own bytes and an index
    (``shard_parts``) is written from the cell's memory, uncopied. ``fault_ahead``: a fresh slab is
    faulted in on another thread just ahead of the encoder (where a core is spare:
    ``workers.spare_core``). ``encoders``: threads, the caller's among them, that the inner chunks of
    an uncompressed object of ``_SPREAD_FROM`` bytes or more are gathered and checksummed on
    (``workers.cores_per_rank``; encoding 1 GiB of 16 tensors of 1-256 MiB into a warm buffer, no I/O:
    median 0.27 s on two threads against 0.38 s on one; a save is faster by that only where the disk
    outruns the encoder).
    """
    arrays = {a.key: a for a in plan.arrays}
    layouts = {a.key: layout_of(a, compressor) for a in plan.arrays}
    slab = EncodeSlab(_slab_bytes(layouts.values(), ranks_here), _IN_FLIGHT, kept=keep_slab, fault_ahead=fault_ahead)
    each = functools.partial(map_in_turn, cpu_pool(), encoders) if encoders > 1 else None
    nbytes = objects = 0
    store = storage.write if put is None else functools.partial(put, storage)
    try:
        with ThreadPoolExecutor(_WRITERS) as pool:  # on an error, waits for the writes in flight (each holds its blob)
            for task, data in cells:
                layout = layouts[task.key]
                buffer, blob = _encode(slab, layout, task.cell, data.cpu(), stable, each)
                nbytes, objects = nbytes + blob_nbytes(blob), objects + 1
                slab.busy(buffer, pool.submit(store, object_key(arrays[task.key].node, layout, task.cell), blob))
            slab.drain()
    finally:
        slab.close()  # every write has ended: the next save encodes into the same memory
    return WriteStats(nbytes, objects)


def _encode(slab: EncodeSlab, layout: ArrayLayout, coords: tuple[int, ...], data: torch.Tensor,
            stable: bool, each) -> tuple[torch.Tensor | None, Blob]:
    """One object: the cell's own bytes and an index where ``stable`` allows (``shard_parts``; no slab
    memory: None), else encoded into the stretch of ``slab`` returned with it (its inner chunks spread
    by ``each``, where given)."""
    bound = encoded_bound(layout)
    parts = shard_parts(layout, coords, data) if stable and bound < _COPY_FROM else None
    if parts is not None:
        slab.wait_for_slot()
        return None, parts
    buffer = slab.take(bound)
    return buffer, encode_shard(layout, coords, data, out=buffer, each=each if len(buffer) >= _SPREAD_FROM else None)


def _slab_bytes(layouts: Iterable[ArrayLayout], ranks_here: int) -> int:
    """The encode slab a save needs: ``_IN_FLIGHT`` of its biggest objects, at most this rank's share of
    ``_SLAB_BYTES`` with the ``ranks_here`` ranks saving on its host; the writes in flight never hold
    more, and the slab kept between saves is then no bigger than the saves of this process use (a
    1000-tensor save maps ~7 MiB, not 256).

    Why a host's share: when the disk is slower than the encoders, every rank fills its slab with
    writes in flight, and a first save faults all of it in (the kernel clearing each page): four ranks
    on two cores with 256 MiB each against 64 MiB each, 1 GiB, 8 alternating fresh starts: first save
    2.94 against 2.70 s, later saves 2.72 against 2.49 s (medians); 32 MiB each was slower again."""
    return min(_SLAB_BYTES // ranks_here, _IN_FLIGHT * max((encoded_bound(layout) for layout in layouts), default=1))


def cells_of(plan: GlobalSavePlan, rank: int, items: Mapping[KeyPath, Any]) -> Iterator[tuple[WriteTask, torch.Tensor]]:
    """The cells ``plan`` gives ``rank``, each with its values viewed in the state dict's own tensors."""
    for task in plan.writes[rank]:
        yield task, cell_values(local_tensor(task.key, items[task.key]), task)


def cell_values(local: torch.Tensor, task: WriteTask) -> torch.Tensor:
    """The values of one cell, with any lazy conjugate or negative bit applied (the bytes written are the
    values the tensor shows, never its raw storage)."""
    return local[task.cell_box.relative_to(task.source_box)].resolve_conj().resolve_neg()


def encoded_bound(layout: ArrayLayout) -> int:
    """The most bytes an uncompressed shard object of ``layout`` can take (every inner chunk stored)."""
    return math.prod(layout.inner_grid_shape) * (layout.inner_chunk_nbytes + CRC_NBYTES) + index_nbytes(layout)
