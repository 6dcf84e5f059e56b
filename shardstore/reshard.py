"""Rewriting a checkpoint offline with the chunk layout a target mesh loads fastest.

A load on a mesh reads, per rank, the inner chunks overlapping its shard; when the checkpoint was saved
on another mesh that is many objects and ranged reads per rank. ``reshard`` rewrites it so that each
target shard is exactly one object: the chunk grid comes from the save planner
(``writer.plan_layout``), as if the target mesh had saved it. No process group, no GPU: one process
reads each target cell from the source (only the inner chunks it overlaps, checksummed) and writes it,
a few cells at a time, so peak memory is a few cells, not a tensor (``memory_budget``). SRC and DST may
be in different stores. The state-dict tree (plain values included) and user metadata are kept.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

import shardstore.api as api
from dtensor.placements import Placement, Shard
from shardstore import format as fmt
from shardstore.dtypes import dtype_info_by_name
from shardstore.errors import CheckpointChangedError
from shardstore.execute import staging_buffer
from shardstore.flatten import KeyPath, display_names
from shardstore.owners import parse_placements
from shardstore.storage import Storage
from shardstore.writer import ArraySpec, WriteResult, plan_layout, write_checkpoint

__all__ = ["PlacementRule", "parse_rules", "target_specs", "reshard", "DEFAULT_MEMORY_BUDGET", "CELL_COPIES"]

DEFAULT_MEMORY_BUDGET = 1 << 30
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
    source = api.open(src, storage_options)
    root = fmt.read_root(Storage(src, storage_options).pinned())
    if root.commit_id != source.commit_id:
        raise CheckpointChangedError(f"checkpoint {src} changed while reshard opened it (another save committed); run it again")
    names = display_names(root.key_paths().values())
    tensors = {name: (key, *_shape_dtype(source.metadata(name))) for name, key in names.items()}
    specs = target_specs(tensors, mesh_shape, rules)
    cell_cap = max(1, memory_budget // CELL_COPIES)
    plan = plan_layout(specs, max_cell_bytes=cell_cap)
    threads = max(1, min(MAX_THREADS, memory_budget // max(1, CELL_COPIES * _biggest_cell(plan))))
    by_key = {key: name for name, key in names.items()}

    def read(key: KeyPath, box) -> torch.Tensor:
        region = tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))
        return source.read(by_key[key], region, out=_buffer(box.sizes, tensors[by_key[key]][2]))

    return write_checkpoint(dst, plan, read, root.tree, storage_options=dst_storage_options or storage_options,
                            overwrite=overwrite, user_metadata=root.user_metadata, threads=threads, progress=progress)


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
