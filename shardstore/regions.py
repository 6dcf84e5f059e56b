"""The region a ``Checkpoint.read`` asks for, as torch indexing reads it, and the limit on its size. Pure.

``region_box`` turns ints and step-1 slices (one per leading dim, an int dropping its dim) into the box
of the array to read and the shape of the result; ``check_read_size`` refuses a box over the handle's
``max_read_bytes`` with a message saying how to read it in parts, before anything is planned or
allocated for it.
"""

from __future__ import annotations

import math
import operator

import torch

from dtensor.placements import Box

__all__ = ["region_box", "check_read_size"]


def region_box(shape: tuple[int, ...], region, key: str) -> tuple[Box, tuple[int, ...]]:
    """The box ``region`` selects and the shape of the result (an int index drops its dim, as in torch).
    A list is refused: torch reads ``w[[0, 1]]`` as rows 0 and 1 (advanced indexing), not ``w[0, 1]``."""
    if isinstance(region, list):
        raise TypeError(f"read({key!r}): a list region {region!r} would be advanced indexing in torch (w[{region!r}] "
                        f"picks those entries of dim 0), which read does not do; give a tuple with one slice (step 1) "
                        f"or int per leading dim, e.g. {tuple(region)!r} for w[{', '.join(map(repr, region))}]")
    indices = () if region is None else tuple(region) if isinstance(region, tuple) else (region,)
    if len(indices) > len(shape):
        raise IndexError(f"read({key!r}): too many indices for a tensor of dimension {len(shape)}: got "
                         f"{len(indices)} ({indices!r}); give at most one slice or int per dim")
    offsets, sizes, kept = [], [], []
    for dim, (index, n) in enumerate(zip(indices + (slice(None),) * (len(shape) - len(indices)), shape)):
        if isinstance(index, slice):
            start, size = _slice_span(index, n, key)
            kept.append(size)
        else:
            start, size = _int_index(index, dim, n, key), 1
        offsets.append(start)
        sizes.append(size)
    return Box(tuple(offsets), tuple(sizes)), tuple(kept)


def _slice_span(s: slice, n: int, key: str) -> tuple[int, int]:
    start, stop, step = s.indices(n)
    if step != 1:
        raise ValueError(f"read({key!r}): region slices must have step 1, got {s}")
    return start, max(0, stop - start)


def _int_index(index, dim: int, n: int, key: str) -> int:
    if isinstance(index, bool) or not hasattr(type(index), "__index__"):
        raise TypeError(f"read({key!r}): an index must be a slice (step 1) or an int, got {index!r} for dim {dim}")
    i = operator.index(index)
    if not -n <= i < n:
        raise IndexError(f"read({key!r}): index {i} is out of bounds for dimension {dim} with size {n}")
    return i + n if i < 0 else i


def check_read_size(key: str, box: Box, dtype: torch.dtype, limit: int) -> None:
    """Refuse regions over ``limit`` bytes, saying how to read them in parts."""
    itemsize = dtype.itemsize
    nbytes = math.prod(box.sizes) * itemsize
    if nbytes <= limit:
        return
    dim = next((d for d in range(len(box.sizes)) if math.prod(box.sizes[d + 1 :]) * itemsize <= limit), None)
    if dim is None:
        parts = "raise max_read_bytes to at least one element"
    else:
        step = limit // (math.prod(box.sizes[dim + 1 :]) * itemsize)
        lo = box.offsets[dim]
        before = "" if not dim else "an int for dim 0 and " if dim == 1 else f"an int for each of dims 0..{dim - 1} and "
        parts = (f"read it in parts: {before}slices of at most {step} along dim {dim}, e.g. "
                 f"read({key!r}, ({''.join(f'{o}, ' for o in box.offsets[:dim])}slice({lo}, {lo + step}))), then slice({lo + step}, {lo + 2 * step}), ...")
    raise ValueError(
        f"read({key!r}): the region at {list(box.offsets)} of shape {list(box.sizes)} ({dtype}) is {nbytes} bytes, over "
        f"this handle's max_read_bytes of {limit}; {parts}; or pass a larger max_read_bytes to shardstore.open()"
    )
