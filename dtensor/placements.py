"""Placements and all shard arithmetic, pure: no collectives, no I/O.

A placement says what one mesh dimension does to a tensor: ``Shard(dim)`` cuts it into ``torch.chunk``
pieces along ``dim``, ``Replicate()`` gives every rank the whole, ``Partial(op)`` gives every rank a
term of a pending reduction. Sharding is applied mesh dim by mesh dim, outer first, so several mesh dims
sharding one tensor dim nest (the inner one cuts the outer one's piece). Every size and offset in the
package comes from the functions here, so there is one place to get uneven shards right.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = [
    "Placement",
    "Shard",
    "Replicate",
    "Partial",
    "Box",
    "chunk_size",
    "shard_size_and_offset",
    "local_box",
    "logical_shape",
    "mesh_coordinates",
    "normalize_placements",
    "PlacementError",
]

REDUCE_OPS = ("sum", "avg", "max", "min")


class Placement:
    """Base of the three placements; mirrors ``torch.distributed.tensor.Placement``."""

    def is_shard(self, dim: int | None = None) -> bool:
        return False

    def is_replicate(self) -> bool:
        return False

    def is_partial(self, reduce_op: str | None = None) -> bool:
        return False


@dataclass(frozen=True)
class Shard(Placement):
    """Cut the tensor along ``dim`` into ``torch.chunk`` pieces, one per rank of the mesh dim."""

    dim: int

    def is_shard(self, dim: int | None = None) -> bool:
        return dim is None or dim == self.dim

    def __repr__(self) -> str:
        return f"Shard(dim={self.dim})"

    def __str__(self) -> str:
        return f"S({self.dim})"


@dataclass(frozen=True)
class Replicate(Placement):
    """Every rank of the mesh dim holds the whole (logical) tensor."""

    def is_replicate(self) -> bool:
        return True

    def __repr__(self) -> str:
        return "Replicate()"

    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Partial(Placement):
    """Every rank holds one term; the logical tensor is their reduction with ``reduce_op``."""

    reduce_op: str = "sum"

    def __post_init__(self) -> None:
        if self.reduce_op not in REDUCE_OPS:
            raise ValueError(f"Partial reduce_op must be one of {REDUCE_OPS}, got {self.reduce_op!r}")

    def is_partial(self, reduce_op: str | None = None) -> bool:
        return reduce_op is None or reduce_op == self.reduce_op

    def __repr__(self) -> str:
        return f"Partial({self.reduce_op})"

    def __str__(self) -> str:
        return f"P({self.reduce_op})"


@dataclass(frozen=True)
class Box:
    """A rectangular region of a global tensor: where one rank's shard (or one chunk) lies."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.sizes:
            n *= s
        return n

    def intersect(self, other: "Box") -> "Box | None":
        """The overlap of two boxes, or None when they share no element."""
        lo = tuple(max(a, b) for a, b in zip(self.offsets, other.offsets))
        hi = tuple(min(a + s, b + t) for a, s, b, t in zip(self.offsets, self.sizes, other.offsets, other.sizes))
        if any(h <= l for l, h in zip(lo, hi)):
            return None
        return Box(lo, tuple(h - l for l, h in zip(lo, hi)))

    def relative_to(self, outer: "Box") -> tuple[slice, ...]:
        """Slices that select this box inside a tensor holding ``outer``."""
        return tuple(slice(o - p, o - p + s) for o, s, p in zip(self.offsets, self.sizes, outer.offsets))


def chunk_size(dim_size: int, num_chunks: int) -> int:
    """The size of every non-trailing ``torch.chunk`` piece: ceil(dim_size / num_chunks)."""
    return -(-dim_size // num_chunks)


def shard_size_and_offset(dim_size: int, num_chunks: int, index: int) -> tuple[int, int]:
    """Size and offset of piece ``index`` when ``dim_size`` is cut like ``torch.chunk``.

    Trailing pieces may be short or empty (5 over 4 gives 2, 2, 1, 0); an empty piece's offset is
    ``dim_size``, the convention DCP's dedup relies on.
    """
    if not 0 <= index < num_chunks:
        raise IndexError(f"shard index {index} out of range for {num_chunks} shards")
    c = chunk_size(dim_size, num_chunks)
    start = min(dim_size, c * index)
    stop = min(dim_size, c * (index + 1))
    return stop - start, start


class PlacementError(ValueError, AssertionError):
    """Placements that do not fit the mesh or the tensor. A ``ValueError``; also an ``AssertionError``
    because torch's DTensor raises that for some of these cases and code written for it catches it."""


def normalize_placements(placements: Sequence[Placement], mesh_ndim: int, tensor_ndim: int) -> tuple[Placement, ...]:
    """Check placements against mesh and tensor ranks; turn negative shard dims positive."""
    if len(placements) != mesh_ndim:
        raise PlacementError(
            f"`placements` must have the same length as `device_mesh.ndim`! the mesh has {mesh_ndim} dims, got "
            f"{len(placements)} placements {list(placements)}; pass one placement per mesh dim"
        )
    out = []
    for p in placements:
        if not isinstance(p, Placement):
            raise TypeError(f"placements must be Shard/Replicate/Partial, got {p!r}")
        if isinstance(p, Shard):
            dim = p.dim + tensor_ndim if p.dim < 0 else p.dim
            if not 0 <= dim < tensor_ndim:
                raise PlacementError(f"{p!r} is out of range for a tensor of {tensor_ndim} dims; shard one of dims 0..{tensor_ndim - 1}")
            p = Shard(dim)
        out.append(p)
    return tuple(out)


def local_box(
    global_shape: Sequence[int],
    mesh_shape: Sequence[int],
    placements: Sequence[Placement],
    coordinate: Sequence[int],
) -> Box:
    """The region of the global tensor held by the rank at ``coordinate`` of the mesh.

    Mesh dims are applied outer to inner; a tensor dim sharded by several mesh dims is cut again
    inside the previous piece, as torch does.
    """
    sizes = list(global_shape)
    offsets = [0] * len(sizes)
    for mesh_dim, p in enumerate(placements):
        if isinstance(p, Shard):
            size, off = shard_size_and_offset(sizes[p.dim], mesh_shape[mesh_dim], coordinate[mesh_dim])
            offsets[p.dim] += off
            sizes[p.dim] = size
    for d, size in enumerate(sizes):
        if size == 0:
            offsets[d] = global_shape[d]
    return Box(tuple(offsets), tuple(sizes))


def logical_shape(
    global_shape: Sequence[int],
    mesh_shape: Sequence[int],
    placements: Sequence[Placement],
    coordinate: Sequence[int],
    mesh_dim: int,
) -> tuple[int, ...]:
    """The shape mesh dim ``mesh_dim`` acts on: the global shape cut by the outer mesh dims only."""
    return local_box(global_shape, mesh_shape[:mesh_dim], placements[:mesh_dim], coordinate[:mesh_dim]).sizes


def mesh_coordinates(mesh_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Every coordinate of a mesh in row-major order (the order of ranks in ``mesh.mesh.flatten()``)."""
    coords: list[tuple[int, ...]] = [()]
    for n in mesh_shape:
        coords = [c + (i,) for c in coords for i in range(n)]
    return coords
