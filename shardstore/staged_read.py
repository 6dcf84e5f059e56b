"""All-or-nothing reads: every chunk a load needs fetched into one staging buffer and verified before
any is copied into a target (``shardstore.load(..., all_or_nothing=True)``).

The default load streams chunks into their targets instead (``landing.py``); this way costs memory for
every byte the rank reads, and buys a load that either changes nothing or lands every value.
"""

from __future__ import annotations

from typing import Mapping

import torch

from shardstore.buffers import staging_buffer
from shardstore.codec import ArrayLayout, decode_inner_chunk
from shardstore.flatten import KeyPath, fqn
from shardstore.load_plan import ReadRun, ReadTask
from shardstore.object_check import CheckedRun
from shardstore.storage import Storage

__all__ = ["read_checked"]


def read_checked(
    storage: Storage, checked: list[CheckedRun], layouts: Mapping[KeyPath, ArrayLayout]
) -> list[tuple[ReadTask, torch.Tensor]]:
    """Fetch the data of ``checked`` runs into one fresh staging buffer and verify it; returns (task,
    source values) pairs, which view the fetched bytes."""
    buffer = staging_buffer(sum(c.nbytes for c in checked))
    return _decode(storage, checked, _fetch(storage, checked, buffer), layouts)


def _fetch(storage: Storage, batch: list[CheckedRun], buffer) -> list[memoryview]:
    """The runs' bytes, read concurrently and packed one after another into ``buffer``."""
    return storage.read_ranges_into([(c.key, *c.span) for c in batch], buffer)


def _decode(storage: Storage, batch: list[CheckedRun], blobs, layouts: Mapping[KeyPath, ArrayLayout]) -> list:
    """Verify every fetched inner chunk; (task, source values) pairs viewing the fetched bytes."""
    return [p for c, blob in zip(batch, blobs) for p in _decode_run(storage, layouts[c.run.key], c.run, c.key, c.ranges, blob)]


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
