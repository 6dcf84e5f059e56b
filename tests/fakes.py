"""A stand-in for DeviceMesh in pure rule tests: only the shape, no process group."""

from dataclasses import dataclass


@dataclass(frozen=True)
class FakeMesh:
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def size(self, mesh_dim: int) -> int:
        return self.shape[mesh_dim]
