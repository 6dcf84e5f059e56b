"""Rewriting a checkpoint offline with the chunk layout a target mesh loads fastest.

A load on a mesh reads, per rank, the inner chunks overlapping its shard; when the checkpoint was saved
on another mesh that is many objects and ranged reads per rank. ``reshard`` rewrites it so that each
target shard is exactly one object: the chunk grid comes from the save planner
(``writer.plan_layout``), as if the target mesh had saved it. No process group, no GPU: one process
reads each target cell from the source (only the inner chunks it overlaps, checksummed) and writes it,
a few cells at a time, so peak memory is a few cells, not a tensor (``memory_budget``). A read fetches
whole inner chunks of SRC, which can hold several times the cell's bytes (a column slice of row-major
tiles), so each cell is read in bands of rows whose fetched chunks fit what the budget leaves it
(``row_bands``). SRC and DST may be in different stores. The state-dict tree (plain values included) and user metadata are kept.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

import shardstore.api as api
from dtensor.placements import Box, Placement, Replicate, Shard
from shardstore import format as fmt
from shardstore.dtypes import dtype_info_by_name
from shardstore.errors import CheckpointChangedError
from shardstore.buffers import staging_buffer
from shardstore.flatten import KeyPath, display_names
from shardstore.owners import parse_placements
from shardstore.storage import Storage, refuse_nested
from shardstore.writer import ArraySpec, WriteResult, plan_layout, write_checkpoint

__all__ = ["PlacementRule", "parse_rules", "target_specs", "row_bands", "reshard", "DEFAULT_MEMORY_BUDGET", "CELL_COPIES"]

DEFAULT_MEMORY_BUDGET = 1 << 30
MIN_MEMORY_BUDGET = 1 << 20
MAX_MESH_RANKS = 1 << 18  # a mesh of 10^6 ranks took ~30 s and 1.7 GB to plan for three tiny tensors
CELL_COPIES = 3  # a cell in memory: fetched chunk bytes, the region read from them, the encoded object
MAX_THREADS = 4


@dataclass(frozen=True)
class PlacementRule:
    """Tensors whose dotted name matches ``pattern`` (fnmatch; ``*`` for all) get ``placements``."""

    pattern: str
    placements: tuple[Placement, ...]


def parse_rules(texts: Sequence[str], mesh_ndim: int) -> tuple[PlacementRule, ...]:
    """``"Shard(0)"`` (every tensor) or ``"PATTERN=Shard(0),Replicate()"``; the first match wins, so put
    specific patterns before a catch-all."""
    rules = []
    for text in texts:
        pattern, sep, spec = text.rpartition("=") if "=" in text.split("(")[0] else ("*", "", text)
        placements = parse_placements(spec)
        if len(placements) != mesh_ndim:
            raise ValueError(f"placements {spec!r} give {len(placements)} placement(s) for a mesh of {mesh_ndim} "
                             "dim(s); give one placement per mesh dim")
        if not all(isinstance(p, (Shard, Replicate)) for p in placements):
            raise ValueError(f"placements {spec!r}: a checkpoint holds values, not pending sums, so only Shard(d) and "
                             "Replicate() lay one out (a save refuses Partial tensors too); use Replicate()")
        rules.append(PlacementRule(pattern or "*", placements))
    return tuple(rules)


def target_specs(
    tensors: dict[str, tuple[KeyPath, tuple[int, ...], torch.dtype]], mesh_shape: tuple[int, ...],
    rules: Sequence[PlacementRule],
) -> list[ArraySpec]:
    """Each tensor's target layout: the first rule matching its name; 0-d tensors and tensors no rule
    matches are written whole (one object). A ``Shard(d)`` of a tensor without dim ``d`` is refused."""
    specs = []
    for name, (key, shape, dtype) in tensors.items():
        rule = next((r for r in rules if fnmatch.fnmatchcase(name, r.pattern)), None)
        if rule is None or not shape:
            specs.append(ArraySpec(key, shape, dtype))
            continue
        bad = [p for p in rule.placements if isinstance(p, Shard) and not -len(shape) <= p.dim < len(shape)]
        if bad:
            raise ValueError(f"{name!r} has {len(shape)} dim(s) (shape {list(shape)}), so it cannot be {bad[0]!r}; "
                             f"add a rule for it first, e.g. --placements '{name}=Replicate()'")
        specs.append(ArraySpec(key, shape, dtype, tuple(mesh_shape), rule.placements))
    return specs


def reshard(
    src: str,
    dst: str,
    mesh_shape: Sequence[int],
    rules: Sequence[PlacementRule],
    *,
    storage_options: dict | None = None,
    dst_storage_options: dict | None = None,
    overwrite: bool = False,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: Callable[[int], None] | None = None,
) -> WriteResult:
    """Rewrite the checkpoint at ``src`` into ``dst`` with one object per shard of ``mesh_shape``."""
    mesh_shape = tuple(int(n) for n in mesh_shape)
    if not mesh_shape or any(n < 1 for n in mesh_shape):
        raise ValueError(f"mesh shape {list(mesh_shape)}: give one size >= 1 per mesh dim, e.g. --mesh 8 or --mesh 2,4")
    if math.prod(mesh_shape) > MAX_MESH_RANKS:
        raise ValueError(f"mesh shape {list(mesh_shape)} has {math.prod(mesh_shape)} ranks, more than {MAX_MESH_RANKS}: "
                         "planning one object per shard for that many takes minutes and gigabytes; check the shape")
    if memory_budget < MIN_MEMORY_BUDGET:
        raise ValueError(f"memory budget {memory_budget} bytes: give at least {MIN_MEMORY_BUDGET} (1 MiB), e.g. the default "
                         f"{DEFAULT_MEMORY_BUDGET}")
    refuse_nested(dst, src)
    source = api.open(src, storage_options)
    root = fmt.read_root(Storage(src, storage_options).pinned())
    if root.commit_id != source.commit_id:
        raise CheckpointChangedError(f"checkpoint {src} changed while reshard opened it (another save committed); run it again")
    names = display_names(root.key_paths().values())
    tensors = {name: (key, *_shape_dtype(source.metadata(name))) for name, key in names.items()}
    specs = target_specs(tensors, mesh_shape, rules)
    plan = plan_layout(specs, max_cell_bytes=max(1, memory_budget // CELL_COPIES))
    biggest = _biggest_cell(plan)
    threads = max(1, min(MAX_THREADS, memory_budget // max(1, CELL_COPIES * biggest)))
    fetch_cap = max(1, memory_budget // threads - 2 * biggest)  # a cell's own buffer and encoded object take the rest
    by_key = {key: name for name, key in names.items()}
    inner = {key: root.tensors[node].inner_chunk_shape for node, key in root.key_paths().items()}

    def read(key: KeyPath, box: Box) -> torch.Tensor:
        name = by_key[key]
        out = _buffer(box.sizes, tensors[name][2])
        for rows, region in _bands(box, inner[key], out.element_size(), fetch_cap):
            source.read(name, region, out=out[rows])
        return out

    return write_checkpoint(dst, plan, read, root.tree, storage_options=dst_storage_options or storage_options,
                            overwrite=overwrite, user_metadata=root.user_metadata, threads=threads, progress=progress)


def row_bands(box: Box, inner_chunk_shape: Sequence[int], itemsize: int, cap: int) -> list[tuple[int, int]]:
    """Rows ``[start, stop)`` (absolute) to read ``box`` of an array with these inner chunks in, so that
    the inner chunks each band overlaps — what a read fetches, whole — hold at most ``cap`` bytes; bands
    are whole rows of inner chunks, at least one however small ``cap`` is. Pure."""
    start, stop = box.offsets[0], box.offsets[0] + box.sizes[0]
    if box.numel == 0:
        return [(start, stop)]
    fetched_row = itemsize * math.prod(_covered(o, n, c) for o, n, c in zip(box.offsets[1:], box.sizes[1:], inner_chunk_shape[1:]))
    step = inner_chunk_shape[0] * max(1, cap // (fetched_row * inner_chunk_shape[0]))
    bounds = [start, *range((start // step + 1) * step, stop, step), stop]
    return list(zip(bounds, bounds[1:]))


def _covered(offset: int, size: int, chunk: int) -> int:
    """How many elements of a dim the inner chunks overlapping ``[offset, offset + size)`` span."""
    return (-(-(offset + size) // chunk) - offset // chunk) * chunk


def _bands(box: Box, inner_chunk_shape: Sequence[int], itemsize: int, cap: int) -> list[tuple[slice, tuple[slice, ...]]]:
    """(rows of the cell buffer, region of the tensor) per band of ``row_bands``; one for a 0-d tensor."""
    region = tuple(slice(o, o + n) for o, n in zip(box.offsets, box.sizes))
    if not box.sizes:
        return [((), region)]
    first = box.offsets[0]
    return [(slice(a - first, b - first), (slice(a, b), *region[1:]))
            for a, b in row_bands(box, inner_chunk_shape, itemsize, cap)]


def _shape_dtype(meta: dict) -> tuple[tuple[int, ...], torch.dtype]:
    return tuple(meta["shape"]), dtype_info_by_name(meta["dtype"], "a saved tensor").torch_dtype


def _biggest_cell(plan) -> int:
    itemsize = {a.key: a.itemsize for a in plan.arrays}
    return max((t.cell_box.numel * itemsize[t.key] for tasks in plan.writes for t in tasks), default=0)


def _buffer(sizes: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Memory for one cell that is handed back to the OS once the cell is written (``staging_buffer``
    maps big buffers on their own: malloc keeps freed blocks of this size, and peak memory grew to the
    size of a tensor, measured)."""
    nbytes = math.prod(sizes) * dtype.itemsize
    if not nbytes:
        return torch.empty(sizes, dtype=dtype)
    return torch.frombuffer(staging_buffer(nbytes), dtype=dtype).view(sizes)
