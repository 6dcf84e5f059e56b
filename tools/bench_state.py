"""The states the checkpoint benchmarks save and load: seeded, mixed fp32/bf16 tensors, and how they lie
on the ranks. Seeded, so runs on different days or machines compare.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import chain
from typing import Iterator

import torch
import torch.distributed as dist

import dtensor
from dtensor import Shard

MIB = 1 << 20
GIB = 1 << 30
COLS = 1024
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a benchmark state: ``rows`` x COLS of ``dtype`` (a key of DTYPES)."""

    name: str
    rows: int
    dtype: str

    @property
    def nbytes(self) -> int:
        return self.rows * COLS * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class State:
    """A seeded benchmark state: what it is called and its tensors."""

    title: str
    specs: tuple[TensorSpec, ...]
    seed: int

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


def _log_uniform(rng: random.Random, lo: int, hi: int) -> Iterator[float]:
    while True:
        yield lo * (hi / lo) ** rng.random()


def _spec(index: int, size: float, rng: random.Random) -> TensorSpec:
    dtype = rng.choice(sorted(DTYPES))
    return TensorSpec(f"layers.{index}.weight", max(1, int(size) // (COLS * DTYPES[dtype].itemsize)), dtype)


def mixed_state(gib: float, seed: int) -> State:
    """``gib`` of fp32 and bf16 tensors of 1-256 MiB (one of each extreme, the rest log-uniform). A
    state under 1 GiB caps its tensors at a quarter of it, so tiny runs still mix sizes and dtypes."""
    rng, left, specs = random.Random(seed), int(gib * GIB), []
    largest = min(256 * MIB, max(MIB, left // 4))
    for size in chain([largest, MIB], _log_uniform(rng, MIB, largest)):
        if left < COLS * 4:
            break
        specs.append(_spec(len(specs), min(size, left), rng))
        left -= specs[-1].nbytes
    title = f"{len(specs)} fp32/bf16 tensors of 1-{largest // MIB} MiB"
    return State(title, tuple(specs), seed)


def small_state(count: int, seed: int) -> State:
    """``count`` fp32 and bf16 tensors of 64 KiB-1 MiB: the per-tensor overhead case."""
    rng = random.Random(seed)
    specs = [_spec(i, size, rng) for i, size in zip(range(count), _log_uniform(rng, 64 << 10, MIB))]
    return State(f"{count} fp32/bf16 tensors of 64 KiB-1 MiB", tuple(specs), seed)


@dataclass(frozen=True)
class Layout:
    """How a state lies on the ranks: plain tensors in one process (no process group) when
    ``shard_dim`` is None, else our DTensors with Shard(shard_dim) on a 1-d mesh of ``world`` ranks."""

    world: int
    shard_dim: int | None

    def describe(self) -> str:
        if self.shard_dim is None:
            return "plain tensors, 1 process, no process group"
        return f"Shard({self.shard_dim}) on {self.world} rank{'s' if self.world > 1 else ''}"


def build_state(state: State, layout: Layout, fill: bool) -> tuple[dict, int]:
    """This rank's state dict and the bytes it holds. Every byte is touched before any timer starts:
    seeded values for a save, zeros for load targets (a resumed job's model is initialised)."""
    rank = dist.get_rank() if layout.shard_dim is not None else 0
    mesh = dtensor.init_device_mesh("cpu", (layout.world,)) if layout.shard_dim is not None else None
    out, held = {}, 0
    for index, spec in enumerate(state.specs):
        tensor = _empty(spec, mesh, layout.shard_dim)
        with torch.no_grad():
            local = tensor.to_local() if mesh is not None else tensor
        if fill:
            seed = (state.seed * 1_000_003 + index) * 1009 + rank
            local.uniform_(-1, 1, generator=torch.Generator().manual_seed(seed))
        else:
            local.zero_()
        out[spec.name] = tensor
        held += local.numel() * local.element_size()
    return out, held


def _empty(spec: TensorSpec, mesh, shard_dim: int | None):
    dtype = DTYPES[spec.dtype]
    if mesh is None:
        return torch.empty(spec.rows, COLS, dtype=dtype)
    return dtensor.empty(spec.rows, COLS, dtype=dtype, device_mesh=mesh, placements=[Shard(shard_dim)])
