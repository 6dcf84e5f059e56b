"""``DTensorSpec``: what a DTensor is globally (mesh, placements, shape, stride, dtype), pure data.

The spec is the single source of truth about layout; the local tensor is only this rank's piece of it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from .placements import Box, Placement, Replicate, local_box, normalize_placements

__all__ = ["DTensorSpec", "contiguous_strides"]


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(strides))


@dataclass(frozen=True)
class DTensorSpec:
    mesh: object  # torch.distributed.device_mesh.DeviceMesh (hashable)
    placements: tuple[Placement, ...]
    shape: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype

    def __post_init__(self) -> None:
        # specs key the dispatch cache: hash once, not on every op
        object.__setattr__(self, "_hash", hash((self.mesh, self.placements, self.shape, self.stride, self.dtype)))

    def __hash__(self) -> int:
        return self._hash

    @classmethod
    def create(cls, mesh, placements: Sequence[Placement] | None, shape: Sequence[int], dtype: torch.dtype, stride=None) -> "DTensorSpec":
        shape = torch.Size(shape)
        placements = placements if placements is not None else [Replicate()] * mesh.ndim
        placements = normalize_placements(placements, mesh.ndim, len(shape))
        return cls(mesh, placements, shape, tuple(stride) if stride is not None else contiguous_strides(shape), dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def with_placements(self, placements: Sequence[Placement]) -> "DTensorSpec":
        return replace(self, placements=normalize_placements(placements, self.mesh.ndim, len(self.shape)))

    def box_at(self, coordinate: Sequence[int]) -> Box:
        """The global region held by the rank at ``coordinate``."""
        return local_box(self.shape, self.mesh.shape, self.placements, coordinate)

    def local_box(self) -> Box | None:
        """The region this rank holds, or None when this rank is not part of the mesh."""
        coordinate = self.mesh.get_coordinate()
        return None if coordinate is None else self.box_at(coordinate)

    def local_shape(self) -> torch.Size:
        box = self.local_box()
        return torch.Size([0] * len(self.shape) if box is None else box.sizes)

    @property
    def has_partial(self) -> bool:
        return any(p.is_partial() for p in self.placements)
