"""Choosing the inner chunk (tile) shape of a shard object: pure arithmetic on shapes, no I/O.

The tile decides what a partial read fetches: a load reads whole inner chunks, so a tile spanning every
column is read whole by each rank of a column-sharded load. ``choose_inner_chunk_shape`` balances few,
large reads (a ~4 MiB budget) against reads of only the bytes a resharded load needs.
"""

from __future__ import annotations

import math
from bisect import bisect_right

__all__ = ["choose_inner_chunk_shape", "budget_tile", "reshard_cut", "largest_divisor_at_most", "RESHARD_SPLITS",
           "WHOLE_CHUNK_BYTES", "MIN_ROW_BYTES"]


def choose_inner_chunk_shape(
    outer_chunk_shape: tuple[int, ...], itemsize: int, target_bytes: int = 4 << 20
) -> tuple[int, ...]:
    """An inner chunk shape that divides ``outer_chunk_shape``: a tile of about ``target_bytes``
    (``budget_tile``), then, for outer chunks over ``WHOLE_CHUNK_BYTES``, cut to a divisor of itself of at
    most a quarter of each of the last two dims of the outer chunk (``reshard_cut``).

    Why both: the budget keeps reads large and chunks few; the cut makes loads that shard one of the last
    two dims over up to ``RESHARD_SPLITS`` ranks read only the bytes they need (a tile spanning every
    column is read whole by each rank of a column-sharded load: 4x its bytes on 4 ranks). Cutting the
    budget tile into divisors of itself, rather than choosing again within a quarter, keeps every new
    tile inside an old one, so no slice of any shape reads more than it did with the budget tile alone
    (widening the rows instead, to keep 4 MiB per tile, made row slices of small tensors read every
    chunk).
    """
    outer = tuple(int(n) for n in outer_chunk_shape)
    if any(n < 1 for n in outer):
        raise ValueError(f"outer chunk shape {outer}: chunk sizes must be >= 1")
    tile = budget_tile(outer, itemsize, target_bytes)
    if math.prod(outer) * itemsize <= WHOLE_CHUNK_BYTES:
        return tile
    return reshard_cut(tile, outer, itemsize)


def budget_tile(outer: tuple[int, ...], itemsize: int, target_bytes: int) -> tuple[int, ...]:
    """A divisor tile of ``outer`` of about ``target_bytes``: leading dims shrink first (to 1 if needed);
    the last two dims are tiled in 2-D, so reading a column slice does not fetch whole rows. Among the
    divisor pairs that fit, the largest win, near-ties going to the squarest. When only tiny tiles fit
    (prime sizes), the smallest tile above the target is used instead: a few oversized chunks beat
    millions of tiny ones."""
    budget = max(1, target_bytes // max(1, itemsize))  # elements per inner chunk
    if math.prod(outer) <= budget:
        return outer
    tail = outer[-2:]
    if math.prod(tail) > budget:
        return (1,) * (len(outer) - len(tail)) + _tile(tail, budget)
    lead: list[int] = []
    room = budget // math.prod(tail)
    for n in reversed(outer[: -len(tail)]):
        d = largest_divisor_at_most(n, room)
        lead.insert(0, d)
        room //= d
    return tuple(lead) + tail


RESHARD_SPLITS = 4  # a load sharding one of the last two dims over this many ranks reads only what it needs
WHOLE_CHUNK_BYTES = 1 << 20  # outer chunks up to this stay whole: a read of one costs its latency, not its bytes
MIN_ROW_BYTES = 512  # narrower inner chunk rows make scattered reads and copies inefficient


def reshard_cut(tile: tuple[int, ...], outer: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """``tile`` with each of its last two dims cut to its largest divisor of at most ``1 / RESHARD_SPLITS``
    of that dim of ``outer``. Where that divisor is under an eighth of the outer dim (prime-ish sizes:
    many tiny tiles that would not match the ranks' boundaries anyway) or, for the last dim, the tile's
    rows would hold fewer than ``MIN_ROW_BYTES``, the dim is cut in halves instead where a divisor near
    half fits (rows wide enough); else, and where the outer dim is under ``RESHARD_SPLITS``, it keeps
    the tile's size. Why halves: a save splits the columns of a big shard whose row count has no fitting
    divisor (``grid._split_dims``); a 512-column bf16 cell of a 1024-column tensor, left whole, made each
    rank of a Shard(1)-on-4 load read twice its bytes of it (1.06x over the whole 2 GiB benchmark
    state), where its halves are exactly those ranks' quarters. And 2 x prime columns (2018) have no
    divisor near a quarter, but their halves are a Shard(1)-on-2 rank's share (each read them all).

    A tile a quarter of the columns wide also spans whole rows of a Shard(1)-on-4 rank's local tensor,
    so it lands there without a copy.
    """
    last = len(outer) - 1
    return tuple(
        _cut(t, n, itemsize if d == last else None) if d >= last - 1 else t
        for d, (t, n) in enumerate(zip(tile, outer))
    )


def _cut(size: int, outer: int, row_itemsize: int | None) -> int:
    """One dim of ``reshard_cut``; ``row_itemsize`` is given for the last dim (its rows' byte floor)."""
    if outer < RESHARD_SPLITS:
        return size
    for splits in (RESHARD_SPLITS, 2):
        part = largest_divisor_at_most(size, outer // splits)
        if part * 2 * splits >= outer and (row_itemsize is None or part * row_itemsize >= MIN_ROW_BYTES):
            return part
    return size


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def largest_divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of ``n`` (>= 1) that is at most ``limit`` (1 where none is)."""
    divs = _divisors(n)
    return divs[max(0, bisect_right(divs, limit) - 1)]


def _tile(dims: tuple[int, ...], budget: int) -> tuple[int, ...]:
    """Best divisor tile of one or two dims for ``budget`` elements (see choose_inner_chunk_shape)."""
    if len(dims) == 1:
        candidates = [(d,) for d in _divisors(dims[0])]
    else:
        candidates = [(a, b) for a in _divisors(dims[0]) for b in _divisors(dims[1])]
    fitting = [c for c in candidates if math.prod(c) <= budget]
    best = max(math.prod(c) for c in fitting)
    if best * 8 < budget:  # only tiny tiles fit: take the smallest one above the budget
        return min((c for c in candidates if math.prod(c) > budget), key=math.prod)
    near = [c for c in fitting if math.prod(c) * 2 >= best]
    return min(near, key=lambda c: (max(c) / min(c), -math.prod(c)))
