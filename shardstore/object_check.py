"""Checking the objects a load reads before reading their data: each one's size and shard index.

A load's plan (``load_plan.py``) names runs of inner chunks; before any data is read or any memory is
allocated for it, every object those runs touch is checked here: present, long enough, the layout the
metadata promises, every index entry inside the object, every needed inner chunk stored. So a missing,
truncated or forged object fails before the load has changed anything, and no size read from a file
decides how much memory is allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from shardstore.codec import ArrayLayout, decode_index, index_nbytes, inner_chunk_ranges
from shardstore.errors import CorruptCheckpointError, MissingChunkError
from shardstore.flatten import KeyPath, fqn
from shardstore.format import object_key
from shardstore.load_plan import ReadRun
from shardstore.storage import Storage, io_map

__all__ = ["CheckedRun", "check_runs", "read_index", "check_index", "data_end", "sub_run"]


@dataclass(frozen=True)
class CheckedRun:
    """A read run whose object was checked; ``ranges`` are its shard index's entries.

    ``index`` is 0 when the index was read and checked already; else the object is uncompressed, its
    size was checked against the ``ranges`` its layout implies, and its ``index`` bytes follow this run's
    last chunk: they are read with the run and checked as it lands (``landing.land_runs``)."""

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
        if any(_reads_to_end(run, implied) for run in runs) and storage.size(key) == data_end(implied) + index_nbytes(layout):
            return implied, index_nbytes(layout)
    return read_index(storage, layout, key, runs[0].cell, fqn(runs[0].key)), 0


def _reads_to_end(run: ReadRun, ranges: tuple) -> bool:
    """Whether ``run`` reads the object's last stored inner chunk (its index follows that chunk)."""
    last = ranges[run.stop - 1]
    return last is not None and last.stop == data_end(ranges)


def data_end(ranges: tuple) -> int:
    return max((r.stop for r in ranges if r is not None), default=0)


def _check_stored(storage: Storage, run: ReadRun, key: str, ranges: tuple) -> None:
    for i in range(run.start, run.stop):
        if ranges[i] is None:
            raise MissingChunkError(f"{storage.key_url(key)}: inner chunk {i} of {fqn(run.key)!r} is not stored")


def _back_to_back(checked: CheckedRun) -> list[CheckedRun]:
    """A run as sub-runs whose inner chunks lie back to back in the object, each then one ranged read of
    exactly its chunks (shardstore writes them so; another writer may order them otherwise)."""
    run, ranges = checked.run, checked.ranges
    cuts = [i for i in range(run.start + 1, run.stop) if ranges[i].offset != ranges[i - 1].stop]
    bounds = [run.start, *cuts, run.stop]
    return [checked] if not cuts else [sub_run(checked, a, b) for a, b in zip(bounds, bounds[1:])]


def sub_run(checked: CheckedRun, start: int, stop: int) -> CheckedRun:
    """Inner chunks ``start..stop-1`` of ``checked``; the last one reads the index, if ``checked`` does."""
    run = checked.run
    tasks = tuple(t for t in run.tasks if start <= t.inner_index < stop)
    index = checked.index if stop == run.stop else 0
    return CheckedRun(ReadRun(run.key, run.cell, start, stop, tasks), checked.key, checked.ranges, index)


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
