"""Random numbers for DTensors that do not depend on the mesh: element i of the global tensor is a
pure function of (seed, i).

Each value is a counter-based hash (splitmix64) of the element's global flat index and a seed drawn
from torch's default generator, so replicas agree, shards differ, ``torch.manual_seed`` reproduces a run,
and the full tensor is the same whatever the mesh and placements (torch gives none of that on CPU). Every
rank computes only the elements of its own box; the same code runs on CPU and CUDA and gives the same
numbers on both.
"""

from __future__ import annotations

import math

import torch

from .placements import Box

__all__ = ["draw_seed", "uniform", "normal"]

_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_STREAM2 = 0x632BE59BD9B4E019


def draw_seed(generator: torch.Generator | None = None) -> int:
    """One 62-bit seed from ``generator`` (default: torch's CPU default generator), advanced the same way
    on every rank. Drawn on the CPU even when the default device is CUDA, so CPU and GPU runs agree."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 1 << 62, (), dtype=torch.int64, device=device, generator=generator))


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    return (z >> k) & ((1 << (64 - k)) - 1)  # logical shift on int64


def _splitmix(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def _flat_index(global_shape, box: Box, device) -> torch.Tensor:
    index = torch.zeros(box.sizes, dtype=torch.int64, device=device)
    stride = 1
    for dim in reversed(range(len(global_shape))):
        view = [1] * len(global_shape)
        view[dim] = box.sizes[dim]
        index += (torch.arange(box.offsets[dim], box.offsets[dim] + box.sizes[dim], device=device) * stride).view(view)
        stride *= global_shape[dim]
    return index


def _unit(seed: int, index: torch.Tensor, bits: int = 53) -> torch.Tensor:
    """Uniform float64 in [0, 1) with ``bits`` random bits per element (exact in a float of that many)."""
    hashed = _splitmix(index * _GOLDEN + seed)
    return _shr(hashed, 64 - bits).to(torch.float64) * (2.0**-bits)


def _mantissa_bits(dtype: torch.dtype) -> int:
    """Bits a float ``dtype`` holds exactly below 1, so rounding never gives 1.0 (float32: 24)."""
    return 1 - int(math.log2(torch.finfo(dtype).eps)) if dtype.is_floating_point else 53


def uniform(seed: int, global_shape, box: Box, dtype: torch.dtype, device) -> torch.Tensor:
    """The values in ``box`` of a global tensor of U[0, 1) numbers."""
    return _unit(seed, _flat_index(global_shape, box, device), _mantissa_bits(dtype)).to(dtype)


def normal(seed: int, global_shape, box: Box, dtype: torch.dtype, device) -> torch.Tensor:
    """The values in ``box`` of a global tensor of N(0, 1) numbers (Box-Muller on two hash streams)."""
    index = _flat_index(global_shape, box, device)
    u1 = 1.0 - _unit(seed, index)  # in (0, 1]: log is finite
    u2 = _unit(seed ^ _STREAM2, index)
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)).to(dtype)
