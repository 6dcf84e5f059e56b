"""Load plans: which bytes each rank reads and where they go. Pure data, no I/O.

``load_targets(items)`` describes the regions this rank must fill, and ``plan_load(targets, stored)``
checks them against the checkpoint (before any byte is read) and projects each region onto cells and
inner chunks, so a rank reads only the inner chunks it needs; consecutive inner chunks of one object
become one ranged read (``ReadRun``). ``side_by_side`` groups a run's chunks that one copy can place.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dtensor.api import DTensor
from dtensor.checkpoint import local_region
from dtensor.placements import Box
from shardstore.errors import StateDictMismatchError
from shardstore.flatten import KeyPath, fqn
from shardstore.grid import cell_box, cells_overlapping, linear_index
from shardstore.plan import Coords, dtype_name, layout_of_value

__all__ = ["LoadRegion", "TargetTensor", "StoredArray", "ReadTask", "ReadRun", "LoadPlan", "load_targets", "plan_load", "match_keys", "check_unexpected_values",
           "side_by_side"]


@dataclass(frozen=True)
class LoadRegion:
    """A region of a tensor to fill; ``dest`` says which local piece receives it (its position in the
    object's ``__create_chunk_list__``, 0 for a plain tensor)."""

    box: Box
    dest: int


@dataclass(frozen=True)
class TargetTensor:
    key: KeyPath
    shape: tuple[int, ...]
    dtype: str
    regions: tuple[LoadRegion, ...]


@dataclass(frozen=True)
class StoredArray:
    """What the checkpoint metadata says about one saved array."""

    key: KeyPath
    shape: tuple[int, ...]
    dtype: str
    chunk_shape: tuple[int, ...]
    inner_chunk_shape: tuple[int, ...]

    def __post_init__(self) -> None:  # metadata read from JSON arrives as lists
        for name in ("key", "shape", "chunk_shape", "inner_chunk_shape"):
            object.__setattr__(self, name, tuple(getattr(self, name)))


@dataclass(frozen=True)
class ReadTask:
    """Copy ``overlap`` out of inner chunk ``inner`` (``inner_index`` in the shard index, row-major) of
    cell ``cell`` into region ``dest_box`` of destination ``dest``. ``inner_box`` is the inner chunk's
    region, clipped to the array; the decoded inner chunk starts at ``inner_box.offsets``, so the source
    is ``overlap.relative_to(inner_box)`` and the destination ``overlap.relative_to(dest_box)``."""

    key: KeyPath
    cell: Coords
    inner: Coords
    inner_index: int
    inner_box: Box
    overlap: Box
    dest: int
    dest_box: Box


@dataclass(frozen=True)
class ReadRun:
    """Inner chunks ``start..stop-1`` (consecutive in the shard index) of one object, each needed.

    Our writer lays inner chunks out in index order, so a run is one ranged read; the executor must still
    check the offsets from the shard index (another writer may order them differently, or omit empty
    ones) and fall back to one read per inner chunk. An inner chunk feeding several regions appears in
    several tasks but is read once."""

    key: KeyPath
    cell: Coords
    start: int
    stop: int
    tasks: tuple[ReadTask, ...]


@dataclass(frozen=True)
class LoadPlan:
    runs: tuple[ReadRun, ...]
    missing: tuple[KeyPath, ...]  # in the state dict, not in the checkpoint (only when strict=False)
    unexpected: tuple[KeyPath, ...]  # in the checkpoint, not in the state dict (only when strict=False)


def load_targets(items: Mapping[KeyPath, Any]) -> dict[KeyPath, TargetTensor]:
    """Describe the regions this rank must fill, from its flattened state dict's tensors."""
    return {key: _target(key, value) for key, value in items.items()}


def _target(key: KeyPath, value: Any) -> TargetTensor:
    layout_of_value(key, value)  # refuses Partial placements
    if isinstance(value, DTensor):  # asked directly: its hooks answer in DCP's types, ~0.9 s to import
        box = local_region(value)
        regions = () if box is None else (LoadRegion(box, 0),)
    elif hasattr(type(value), "__create_chunk_list__"):
        # Empty chunks are left out: on a rank outside its sub-mesh, torch's DTensor lists one of shape
        # (0,) at offset () whatever its dims, which no cell holds (as a save leaves it out: ``plan``).
        chunks = value.__create_chunk_list__()
        boxes = ((Box(tuple(c.offsets), tuple(c.sizes)), i) for i, c in enumerate(chunks))
        regions = tuple(LoadRegion(box, i) for box, i in boxes if box.numel)
    else:
        regions = (LoadRegion(Box((0,) * value.dim(), tuple(value.shape)), 0),)
    return TargetTensor(key, tuple(value.shape), dtype_name(value.dtype), regions)


def plan_load(
    targets: Mapping[KeyPath, TargetTensor],
    stored: Mapping[KeyPath, StoredArray],
    *,
    strict: bool = True,
    wanted: Collection[KeyPath] | None = None,
    plain_missing: tuple[KeyPath, ...] = (),
) -> LoadPlan:
    """Which inner chunks this rank reads and where each part goes.

    Raises ``StateDictMismatchError`` listing every problem when a shape or dtype differs, or (with
    ``strict``) when a key is missing on either side; with ``strict=False`` those keys are skipped and
    returned in the plan. ``wanted``: the keys any rank of the load asks for (default: this rank's); a
    stored key no rank wants is unexpected, one that only other ranks want (per-rank state) is not.
    ``plain_missing``: the state dict's plain values the checkpoint lacks, judged alike.
    """
    missing, unexpected = match_keys(targets, stored, strict=strict, wanted=wanted, plain_missing=plain_missing)
    tasks = [t for key, target in targets.items() if key in stored for t in _read_tasks(target, stored[key])]
    return LoadPlan(_coalesce(tasks), missing, unexpected)


def match_keys(
    targets: Mapping[KeyPath, TargetTensor],
    stored: Mapping[KeyPath, StoredArray],
    *,
    strict: bool = True,
    wanted: Collection[KeyPath] | None = None,
    plain_missing: tuple[KeyPath, ...] = (),
) -> tuple[tuple[KeyPath, ...], tuple[KeyPath, ...]]:
    """This rank's (missing, unexpected) keys, after refusing every shape or dtype mismatch (and, with
    ``strict``, any missing or unexpected key): the one rule every load format shares, so a key only some
    ranks ask for (``wanted`` across ranks) is judged alike whatever was saved. ``plain_missing`` (plain
    values) count as missing too: left as they were, they would resume silently from other values."""
    wanted = set(targets) if wanted is None else set(wanted)
    missing = tuple(k for k in targets if k not in stored) + tuple(plain_missing)
    unexpected = tuple(k for k in stored if k not in wanted)
    _check_match(targets, stored, missing, unexpected, strict)
    return missing, unexpected


def _names(keys: list[KeyPath]) -> dict[KeyPath, str]:
    """Each key's dotted name, or its key path written out where another key shares that name (``"a.b"``
    and ``a -> b``; an int key 0 and a str key "0"), so a message names one entry unambiguously."""
    counts = Counter(fqn(k) for k in set(keys))
    return {k: fqn(k) if counts[fqn(k)] == 1 else f"{fqn(k)} (key path {k!r})" for k in keys}


def _check_match(
    targets: Mapping[KeyPath, TargetTensor],
    stored: Mapping[KeyPath, StoredArray],
    missing: tuple[KeyPath, ...],
    unexpected: tuple[KeyPath, ...],
    strict: bool,
) -> None:
    differing = [(key, what) for key, target in targets.items() if key in stored for what in ("shape", "dtype")
                 if getattr(target, what) != getattr(stored[key], what)]
    if not (differing or (strict and (missing or unexpected))):
        return
    problems = []
    name = _names([*targets, *stored, *missing])  # only now: naming every key costs a 1000-tensor load ~5 ms
    if strict and missing:
        problems.append(f"missing from the checkpoint: {', '.join(name[k] for k in missing)}")
    if strict and unexpected:
        problems.append(f"in the checkpoint but not in the state dict: {', '.join(name[k] for k in unexpected)}")
    for key, what in differing:
        want, found = getattr(targets[key], what), getattr(stored[key], what)
        problems.append(f"{name[key]}: {what} {want} in the state dict, {found} in the checkpoint")
    _refuse(problems, unexpected if strict else ())


def check_unexpected_values(unexpected: tuple[KeyPath, ...], strict: bool) -> None:
    """Refuse (with ``strict``) the checkpoint's plain values that no rank's state dict holds, as
    unexpected tensors are: left out, they would not be loaded, silently (per-rank entries that some
    rank holds are expected)."""
    if strict and unexpected:
        names = _names(list(unexpected))
        _refuse([f"in the checkpoint but not in the state dict: {', '.join(names[k] for k in unexpected)}"], ())


def _refuse(problems: list[str], unexpected: tuple[KeyPath, ...]) -> None:
    raise StateDictMismatchError(
        "the state dict does not match the checkpoint:\n  " + "\n  ".join(problems)
        + "\nload into a state dict built like the saved one (shapes and dtypes must match exactly); "
        "pass strict=False to skip missing or unexpected keys" + _empty_optimizer_hint(unexpected)
    )


def _empty_optimizer_hint(unexpected: tuple[KeyPath, ...]) -> str:
    """Advice where the checkpoint holds optimizer state (``...state.<int>...``) the state dict lacks: an
    optimizer before its first step has none, and strict=False would then resume with it empty, silently."""
    if not any("state" in key[:-1] and isinstance(key[key.index("state") + 1], int) for key in unexpected):
        return ""
    return ("; but where the extra keys are an optimizer's state (an optimizer before its first step holds none), "
            "skipping them resumes with that state empty: build the state first, e.g. with torch's "
            "torch.distributed.checkpoint.state_dict.get_state_dict(model, optimizer), which creates it")


def _read_tasks(target: TargetTensor, array: StoredArray) -> list[ReadTask]:
    tasks = []
    inner_shape = array.inner_chunk_shape
    counts = tuple(c // i for c, i in zip(array.chunk_shape, inner_shape))
    for region in target.regions:
        for cell in cells_overlapping(array.chunk_shape, array.shape, region.box):
            cbox = cell_box(array.chunk_shape, array.shape, cell)
            part = cbox.intersect(region.box)
            per_dim = [_spans(*dim) for dim in zip(inner_shape, cbox.offsets, cbox.sizes, part.offsets, part.sizes)]
            for combo in itertools.product(*per_dim):
                inner, starts, sizes, lows, extents = tuple(zip(*combo)) or ((),) * 5
                ibox, overlap = Box(starts, sizes), Box(lows, extents)
                index = linear_index(inner, counts)
                tasks.append(ReadTask(target.key, cell, inner, index, ibox, overlap, region.dest, region.box))
    return tasks


def _spans(inner: int, cell_start: int, cell_size: int, low: int, size: int) -> list[tuple[int, int, int, int, int]]:
    """Along one dim, the inner chunks of a cell that meet [low, low + size): for each, its index in the
    cell, its start and size (clipped to the cell) and the start and size of the overlap. Per dim, so
    a task costs one product step instead of a box intersection."""
    spans = []
    for j in range((low - cell_start) // inner, -(-(low + size - cell_start) // inner)):
        start = cell_start + j * inner
        stop = min(start + inner, cell_start + cell_size)
        lo, hi = max(start, low), min(stop, low + size)
        spans.append((j, start, stop - start, lo, hi - lo))
    return spans


def _coalesce(tasks: list[ReadTask]) -> tuple[ReadRun, ...]:
    groups: dict[tuple[KeyPath, Coords], list[ReadTask]] = {}
    for task in tasks:
        groups.setdefault((task.key, task.cell), []).append(task)
    return tuple(run for group in groups.values() for run in _runs(sorted(group, key=lambda t: t.inner_index)))


def _runs(group: list[ReadTask]) -> Iterator[ReadRun]:
    """Split one object's tasks (sorted by inner index) where the inner indices jump."""
    start = 0
    for i in range(1, len(group) + 1):
        if i == len(group) or group[i].inner_index > group[i - 1].inner_index + 1:
            first, last = group[start], group[i - 1]
            yield ReadRun(first.key, first.cell, first.inner_index, last.inner_index + 1, tuple(group[start:i]))
            start = i


def side_by_side(chunk_tasks: Sequence[Sequence[ReadTask] | None], chunk_shape: tuple[int, ...]) -> list[int]:
    """Consecutive inner chunks of a run, grouped where each goes whole to one region of a destination
    and the group's regions lie side by side along the last dim, in order: the column bands of a row
    block landing in a tensor that holds whole rows, copied then in one pass
    (``memcopy.copy_side_by_side``). ``None`` marks a chunk that is not copied (it landed in place).
    Returns the lengths of the groups, in order (1: a chunk on its own)."""
    lengths: list[int] = []
    first: ReadTask | None = None  # the current group's first chunk's task, None if it groups with none
    for tasks in chunk_tasks:
        task = _goes_whole(tasks, chunk_shape)
        if first is not None and task is not None and _beside(first, task, lengths[-1]):
            lengths[-1] += 1
        else:
            lengths.append(1)
            first = task
    return lengths


def _goes_whole(tasks: Sequence[ReadTask] | None, chunk_shape: tuple[int, ...]) -> ReadTask | None:
    """The task of a chunk copied whole into one region (unclipped), else None."""
    if tasks is None or len(tasks) != 1:
        return None
    task = tasks[0]
    return task if task.overlap == task.inner_box and task.inner_box.sizes == tuple(chunk_shape) else None


def _beside(first: ReadTask, task: ReadTask, count: int) -> bool:
    """Whether ``task``'s region lies right after the ``count`` regions from ``first``'s on, along the
    last dim of the same destination."""
    a, b = first.overlap, task.overlap
    return (task.key, task.dest) == (first.key, first.dest) and b.offsets[:-1] == a.offsets[:-1] and \
        b.offsets[-1] == a.offsets[-1] + count * a.sizes[-1]
