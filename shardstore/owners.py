"""Which rank holds which block of a tensor, from a mesh shape and placements: pure arithmetic, no I/O.

The root record keeps each tensor's save-time mesh and placements as strings (``S(0)``, ``R``); the
command line takes them as users write them in code (``Shard(0)``, ``Replicate()``). Both parse here,
and both ``shardstore inspect`` (drawing the owners of a 2-D tensor) and ``shardstore reshard``
(cutting a tensor for a target mesh) take the rank boxes from ``dtensor.placements.local_box``, the one
place shard arithmetic lives.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

from dtensor.placements import Box, Partial, Placement, Replicate, Shard, local_box, mesh_coordinates, normalize_placements

__all__ = ["parse_placement", "parse_placements", "rank_boxes", "owner_blocks", "owner_art"]

_SHARD = re.compile(r"(?:S|Shard)\((-?\d+)\)")
_PARTIAL = re.compile(r"(?:P|Partial)\((?:'|\")?(\w*)(?:'|\")?\)")
_REPLICATE = ("R", "Replicate()", "Replicate")
MAX_DRAWN_BLOCKS = 16  # per tensor dim; more than this is listed, not drawn


def parse_placement(text: str) -> Placement:
    """``S(0)``/``Shard(0)``, ``R``/``Replicate()``, ``P(sum)``/``Partial(sum)`` -> the placement."""
    text = text.strip()
    if text in _REPLICATE:
        return Replicate()
    if match := _SHARD.fullmatch(text):
        return Shard(int(match.group(1)))
    if match := _PARTIAL.fullmatch(text):
        return Partial(match.group(1) or "sum")
    raise ValueError(f"placement {text!r} is not one of Shard(d), Replicate(), Partial(op) (or S(d), R, P(op))")


def parse_placements(text: str | Sequence[str]) -> tuple[Placement, ...]:
    """A comma-separated list (``"Shard(0),Replicate()"``) or a sequence of placement strings."""
    parts = re.split(r",(?![^(]*\))", text) if isinstance(text, str) else list(text)
    return tuple(parse_placement(p) for p in parts if p.strip())


def rank_boxes(shape: Sequence[int], mesh_shape: Sequence[int], placements: Sequence[Placement]) -> list[Box]:
    """The box of the global tensor each rank holds, by rank (row-major over the mesh)."""
    placements = normalize_placements(placements, len(mesh_shape), len(shape))
    return [local_box(tuple(shape), tuple(mesh_shape), placements, c) for c in mesh_coordinates(mesh_shape)]


def owner_blocks(shape: Sequence[int], mesh_shape: Sequence[int], placements: Sequence[Placement]) -> dict[Box, list[int]]:
    """Each distinct non-empty block and the ranks holding it (several where it is replicated)."""
    blocks: dict[Box, list[int]] = {}
    for rank, box in enumerate(rank_boxes(shape, mesh_shape, placements)):
        if box.numel:
            blocks.setdefault(box, []).append(rank)
    return blocks


def owner_art(shape: Sequence[int], mesh_shape: Sequence[int], placements: Sequence[Placement]) -> str:
    """A text drawing of a 2-D tensor's blocks, each labelled with the ranks that held it::

        +--------+--------+
        | 0      | 1      |  rows 0:2
        +--------+--------+
        | 2      | 3      |  rows 2:4
        +--------+--------+
          cols 0:3  cols 3:5
    """
    if len(shape) != 2 or math.prod(shape) == 0:
        raise ValueError(f"owner_art draws non-empty 2-D tensors, got shape {list(shape)}")
    blocks = owner_blocks(shape, mesh_shape, placements)
    rows, cols = (_edges(blocks, d, shape[d]) for d in (0, 1))
    if len(rows) - 1 > MAX_DRAWN_BLOCKS or len(cols) - 1 > MAX_DRAWN_BLOCKS:
        return f"({len(rows) - 1} x {len(cols) - 1} blocks: too many to draw)"
    labels = [[_label(blocks, r, c) for c in cols[:-1]] for r in rows[:-1]]
    width = max(8, *(len(lab) + 2 for row in labels for lab in row), *(len(_span("cols", cols, j)) for j in range(len(cols) - 1)))
    rule = "+" + "+".join("-" * width for _ in cols[:-1]) + "+"
    lines = [rule]
    for i, row in enumerate(labels):
        lines += ["|" + "|".join(f" {lab}".ljust(width) for lab in row) + "|  " + _span("rows", rows, i), rule]
    lines.append(" " + " ".join(_span("cols", cols, j).center(width) for j in range(len(cols) - 1)))
    return "\n".join(lines)


def _edges(blocks: dict[Box, list[int]], dim: int, size: int) -> list[int]:
    return sorted({0, size} | {b.offsets[dim] for b in blocks} | {b.offsets[dim] + b.sizes[dim] for b in blocks})


def _label(blocks: dict[Box, list[int]], row: int, col: int) -> str:
    """The ranks whose block covers the cell starting at (row, col)."""
    ranks = [r for box, owners in blocks.items() if _covers(box, (row, col)) for r in owners]
    return ",".join(str(r) for r in sorted(ranks)) or "-"


def _covers(box: Box, point: tuple[int, int]) -> bool:
    return all(o <= p < o + s for o, s, p in zip(box.offsets, box.sizes, point))


def _span(name: str, edges: list[int], i: int) -> str:
    return f"{name} {edges[i]}:{edges[i + 1]}"
