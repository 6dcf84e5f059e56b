"""The phases of a save: one implementation for ``save`` and ``async_save``.

``plan_save`` (collective over the caller's group): flatten the state dict, check it is storable, plan
what each rank holds, merge the plans on rank 0. ``write_and_commit`` (collective over the coordinator it
is given): rank 0 claims a place to write (``commit.begin``), every rank writes its cells and its share
of the arrays' ``zarr.json`` files and syncs them all at once, all agree, rank 0 writes the root marker
and commits (``commit.finish``); on any failure rank 0 abandons the claim.

``save`` runs both in the caller, its cells read straight from the state dict's tensors. ``async_save``
runs ``plan_save`` in the caller, stages copies of its cells (``staging.py``), and runs
``write_and_commit`` on a background thread over the background group, its cells read from the copies.
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from shardstore import commit
from shardstore import format as fmt
from shardstore.tiling import choose_inner_chunk_shape
from shardstore.coordinator import Coordinator
from shardstore.cell_writer import WriteStats, layout_of, write_cells
from shardstore.codec import COMPRESSORS
from shardstore.flatten import KeyPath, flatten, is_tensor_like, merge_skeletons
from shardstore.digests import StoredObject, write_digests
from shardstore.incremental import IncrementalWriter, check_incremental
from shardstore.inputs import check_sources, check_user_metadata, snapshot_metadata
from shardstore.plan import GlobalSavePlan, WriteTask, local_save_plan, merge_save_plans
from shardstore.stateful import to_state_dict
from shardstore.storage import Storage
from shardstore.workers import cores_per_rank, spare_core

__all__ = ["SaveResult", "SaveOptions", "SaveJob", "plan_save", "write_and_commit", "write_array_metadata", "commit_metadata"]

_METADATA_WRITERS = 8


@dataclass(frozen=True)
class SaveResult:
    """What this rank did during a save."""

    url: str
    bytes_written: int
    chunks_written: int
    elapsed_s: float
    chunks_linked: int = 0  # of chunks_written: unchanged objects linked from the previous checkpoint

    @classmethod
    def of(cls, url: str, stats: WriteStats, start: float) -> "SaveResult":
        """The result of a save that began at ``start`` (``time.perf_counter``); linked bytes were not written."""
        return cls(url, stats.nbytes - stats.linked_bytes, stats.objects, time.perf_counter() - start, stats.linked)


@dataclass(frozen=True)
class SaveOptions:
    """Where and how a save writes (the keywords of ``save``)."""

    url: str
    storage_options: dict | None = None
    overwrite: bool = False
    compressor: str | None = None
    user_metadata: dict | None = None
    durable: bool = True
    incremental: bool | str = False  # record digests (True), and link from an earlier checkpoint (its URL)

    def __post_init__(self) -> None:
        check_incremental(self.incremental)
        object.__setattr__(self, "user_metadata", snapshot_metadata(self.user_metadata))  # as it is at the call
        if self.compressor not in COMPRESSORS:
            raise ValueError(f"compressor={self.compressor!r}: expected one of {list(COMPRESSORS)} (None stores each inner "
                             "chunk's bytes as they are, 'zstd' compresses them)")


@dataclass(frozen=True)
class SaveJob:
    """A planned save: what this rank (``rank`` in the plan) holds, and what every rank writes."""

    rank: int
    tensors: dict[KeyPath, Any]
    plan: GlobalSavePlan
    skeleton: dict

    @property
    def writes(self) -> tuple[WriteTask, ...]:
        """The cells this rank writes."""
        return self.plan.writes[self.rank]


def plan_save(coord: Coordinator, state_dict: Mapping[str, Any], user_metadata: dict | None) -> SaveJob:
    """Plan a save on every rank of ``coord`` (collective); nothing is written yet."""
    tensors, skeleton, local = coord.agree("planning the save", lambda: _plan_here(coord.rank, coord.world_size, state_dict, user_metadata))
    plans, skeletons = zip(*coord.all_gather((local, skeleton)))
    plan, skeleton = coord.decide("merging the save plans", lambda: _merge_plans(plans, skeletons))
    return SaveJob(coord.rank, tensors, plan, skeleton)


def _plan_here(rank: int, world_size: int, state_dict: Mapping[str, Any], user_metadata: dict | None) -> tuple[dict, dict, Any]:
    """This rank's tensors, skeleton and save plan, once everything it was handed is known to be storable."""
    check_user_metadata(user_metadata)
    items, skeleton = flatten(to_state_dict(state_dict))
    tensors = {k: v for k, v in items.items() if is_tensor_like(v)}
    check_sources(tensors)
    return tensors, skeleton, local_save_plan(rank, tensors, world_size)


def _merge_plans(plans, skeletons) -> tuple[GlobalSavePlan, dict]:
    return merge_save_plans(plans, inner_chunks=choose_inner_chunk_shape), merge_skeletons(list(skeletons))


def write_and_commit(
    coord: Coordinator, job: SaveJob, options: SaveOptions, cells: Iterable[tuple[WriteTask, torch.Tensor]],
    stable_cells: bool = False, background: bool = False,
) -> WriteStats:
    """Claim, write ``cells`` (this rank's, as ``job`` planned them), sync and commit; collective over
    ``coord``, whose ranks must be the plan's. When it returns the checkpoint is committed at the URL.

    ``stable_cells``: every cell's values stay put until this returns (else a cell may be overwritten
    once the next one is asked for, as staging waves are); an incremental save then hashes ahead.
    ``background``: an async save's, beside the training loop: it encodes on one thread, leaving the
    rank's other cores to the loop."""
    target = Storage(options.url, options.storage_options, durable=options.durable)
    claim = coord.decide("claiming the checkpoint URL", lambda: commit.begin(target, options.overwrite))
    dest = commit.destination(target, claim, options.storage_options, options.durable)
    try:
        writer = coord.agree("reading the previous digests", lambda: IncrementalWriter.for_save(options.incremental, options.storage_options))
        share = (coord.rank, coord.world_size)
        here = coord.ranks_on_this_host
        encoding = {"stable": stable_cells, "fault_ahead": spare_core(here), "ranks_here": here,
                    "encoders": 1 if background else cores_per_rank(here)}
        stats = coord.agree("writing chunks", lambda: _write(dest, job.plan, cells, options.compressor, writer, encoding, share))
        digests = None if writer is None else {k: v for d in coord.all_gather(writer.objects) for k, v in d.items()}
        coord.decide("committing", lambda: commit_metadata(
            dest, target, claim, job.plan, job.skeleton, options.compressor, options.user_metadata, digests))
    except BaseException:
        if coord.rank == 0:
            commit.abandon(dest, claim)
        raise
    return stats


def _write(dest: Storage, plan: GlobalSavePlan, cells, compressor: str | None, writer: IncrementalWriter | None,
           encoding: dict[str, Any], share: tuple[int, int]) -> WriteStats:
    """This rank's chunk objects and its ``share`` (rank, world size) of the arrays' metadata, durable
    (with their directories) by one sync before any rank reports done; an incremental save encodes and
    writes only the cells that changed, linking the rest (``encoding``: ``write_cells``'s keyword
    arguments, ``stable`` among them)."""
    write_array_metadata(dest, plan, compressor, share)
    if writer is None:
        stats = write_cells(dest, plan, cells, compressor, **encoding)
    else:
        changed = writer.changed(dest, plan, cells, compressor, encoding["stable"])
        stats = writer.account(write_cells(dest, plan, changed, compressor, writer.put, **encoding))
    dest.sync()
    return stats


def write_array_metadata(dest: Storage, plan: GlobalSavePlan, compressor: str | None, share: tuple[int, int] = (0, 1)) -> None:
    """Write the ``zarr.json`` of every ``share[1]``-th array of ``plan`` from the ``share[0]``-th (rank 0
    also the groups'), not yet durable: they are synced with the chunk objects (one sync, not two)."""
    rank, world = share
    writes = [functools.partial(fmt.write_array, dest, a.node, layout_of(a, compressor)) for a in plan.arrays[rank::world]]
    if rank == 0:
        writes += [functools.partial(fmt.write_group, dest, g) for g in fmt.group_paths([a.node for a in plan.arrays]) if g]
    with ThreadPoolExecutor(_METADATA_WRITERS) as pool:  # small files: overlap their creation
        list(pool.map(lambda write: write(), writes))


def commit_metadata(dest: Storage, target: Storage, claim: commit.Claim, plan: GlobalSavePlan, skeleton: dict,
                    compressor: str | None, user_metadata: dict | None, digests: dict[str, StoredObject] | None = None) -> None:
    """After every rank's chunks and array metadata are durable: an incremental save's object digests,
    durable, then the root marker, durable, then the commit protocol makes it the checkpoint (also how
    ``shardstore.writer`` finishes a checkpoint written from one process)."""
    records = {}
    for array in plan.arrays:
        layout = layout_of(array, compressor)
        records[array.node] = fmt.TensorRecord.from_layout(array.node, layout, array.mesh_shape or (), array.placements or ())
    if digests is not None:
        write_digests(dest, digests)
        dest.sync()
    fmt.write_root(dest, fmt.RootMetadata(skeleton, records, dict(user_metadata or {})))
    dest.sync()
    commit.finish(target, dest, claim)
