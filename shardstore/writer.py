"""Writing a checkpoint from one process, one chunk at a time, from tensors read on demand.

``shardstore convert`` (to zarr) and ``shardstore reshard`` write checkpoints bigger than memory, so they
cannot hand ``save`` a state dict. Instead the layout is planned by the save planner itself
(``plan.merge_save_plans``), as if every rank of the target mesh held its shard: the chunk grid then has
one cell (one object) per target shard, exactly what ``save`` on that mesh would write and what a load
on it reads fastest. Each cell's values are then fetched by a callback, encoded (``cell_writer.write_cells``)
and written, a few cells at a time, and the checkpoint is committed as ``save`` commits
(``saving.commit_metadata``, ``commit.py``): complete, durable, never a mix with what was at the URL.
Memory is a few cells, whatever the tensor sizes.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch

from dtensor.placements import Box, Placement
from shardstore import commit
from shardstore.saving import commit_metadata, write_array_metadata
from shardstore.tiling import choose_inner_chunk_shape
from shardstore.dtypes import dtype_info_by_name
from shardstore.cell_writer import cells_of, write_cells
from shardstore.flatten import KeyPath, fqn
from shardstore.owners import rank_boxes
from shardstore.plan import GlobalSavePlan, HeldTensor, LocalSavePlan, WriteTask, dtype_name, merge_save_plans
from shardstore.storage import Storage

__all__ = ["ArraySpec", "plan_layout", "tree_of", "write_checkpoint", "ReadCell"]

ReadCell = Callable[[KeyPath, Box], torch.Tensor]
"""Returns the values of one box of one tensor (a CPU tensor of the box's shape)."""


@dataclass(frozen=True)
class ArraySpec:
    """One tensor to write and the mesh layout its chunks should fit (none: one plain tensor)."""

    key: KeyPath
    shape: tuple[int, ...]
    dtype: torch.dtype
    mesh_shape: tuple[int, ...] | None = None
    placements: tuple[Placement, ...] | None = None


def plan_layout(specs: Sequence[ArraySpec], max_cell_bytes: int | None = None) -> GlobalSavePlan:
    """The save planner's plan for ``specs``, every rank of each spec's mesh holding its shard. Pure.

    ``max_cell_bytes`` splits the cells of dims no placement cuts (a replicated or plain tensor); cut
    dims are never split, so a target shard stays one object."""
    world = max((math.prod(s.mesh_shape) for s in specs if s.mesh_shape), default=1)
    held: list[list[HeldTensor]] = [[] for _ in range(world)]
    for spec in specs:
        for rank, boxes in enumerate(_boxes_by_rank(spec, world)):
            if boxes is not None:
                held[rank].append(_held(spec, boxes, rank))
    local = [LocalSavePlan(rank, tuple(ts)) for rank, ts in enumerate(held)]
    return merge_save_plans(local, inner_chunks=choose_inner_chunk_shape, max_cell_bytes=max_cell_bytes)


def _boxes_by_rank(spec: ArraySpec, world: int) -> list[tuple[Box, ...] | None]:
    """Per rank of the world: the boxes it holds (a DTensor is listed by every rank), None for a plain
    tensor on ranks other than 0."""
    if not spec.mesh_shape:
        return [(Box((0,) * len(spec.shape), spec.shape),)] + [None] * (world - 1)
    boxes = [(b,) if b.numel else () for b in rank_boxes(spec.shape, spec.mesh_shape, spec.placements)]
    return boxes + [()] * (world - len(boxes))


def _held(spec: ArraySpec, boxes: tuple[Box, ...], rank: int) -> HeldTensor:
    placements = None if not spec.mesh_shape else tuple(str(p) for p in spec.placements)
    return HeldTensor(spec.key, tuple(spec.shape), dtype_name(spec.dtype), spec.dtype.itemsize, boxes,
                      spec.mesh_shape or None, placements, rank)


def tree_of(keys: Sequence[KeyPath]) -> dict:
    """The root record's tree for a state dict of these tensors only (nested dicts of string keys)."""
    root: dict = {}
    for key in keys:
        node = root
        for part in key[:-1]:
            node = node.setdefault(part, {"dict": {}})["dict"]
        node[key[-1]] = {"tensor": list(key)}
    return {"dict": root}


@dataclass(frozen=True)
class WriteResult:
    url: str
    nbytes: int
    objects: int


def write_checkpoint(
    url: str,
    plan: GlobalSavePlan,
    read: ReadCell,
    tree: dict,
    *,
    storage_options: dict | None = None,
    overwrite: bool = False,
    compressor: str | None = None,
    user_metadata: dict[str, Any] | None = None,
    threads: int = 4,
    progress: Callable[[int], None] | None = None,
) -> WriteResult:
    """Write every cell of ``plan`` (values from ``read``), ``threads`` cells at a time, then commit with
    ``tree`` as the state-dict skeleton. ``progress(n)`` gets each cell's bytes."""
    target = Storage(url, storage_options)
    claim = commit.begin(target, overwrite)
    dest = commit.destination(target, claim, storage_options)
    try:
        arrays = {a.key: a for a in plan.arrays}
        tasks = [t for per_rank in plan.writes for t in per_rank]
        with ThreadPoolExecutor(max(1, threads)) as pool:
            stats = list(pool.map(lambda t: _write_cell(dest, arrays[t.key], t, read, compressor, progress), tasks))
        write_array_metadata(dest, plan, compressor)
        dest.sync()
        commit_metadata(dest, target, claim, plan, tree, compressor, user_metadata)
    except BaseException:
        commit.abandon(dest, claim)
        raise
    return WriteResult(target.url, sum(stats), len(tasks))


def _write_cell(dest: Storage, array, task: WriteTask, read: ReadCell, compressor, progress) -> int:
    data = read(task.key, task.cell_box)
    if tuple(data.shape) != task.cell_box.sizes or data.dtype != _torch_dtype(array.dtype):
        raise ValueError(f"{fqn(task.key)!r}: the source gave {list(data.shape)} {data.dtype} for the cell at "
                         f"{list(task.cell_box.offsets)}, expected {list(task.cell_box.sizes)} {array.dtype}")
    one = GlobalSavePlan((array,), ((replace(task, source_box=task.cell_box),),))
    # a rewrite under a memory budget holds no encode memory between its cells (several at once)
    nbytes = write_cells(dest, one, cells_of(one, 0, {task.key: data}), compressor, keep_slab=False, stable=True).nbytes
    if progress is not None:
        progress(task.cell_box.numel * array.itemsize)
    return nbytes


def _torch_dtype(name: str) -> torch.dtype:
    return dtype_info_by_name(name, "a planned array").torch_dtype
