"""Shared helpers for codec tests: random tensors per dtype, whole-array encode/decode through shards."""

from __future__ import annotations

import torch

from dtensor.placements import Box
from shardstore.codec import ArrayLayout, decode_inner_chunk, encode_shard, index_nbytes, inner_chunk_ranges

DTYPES = [
    torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool,
    torch.float8_e4m3fn, torch.float8_e5m2,
]


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    return torch.randint(-100, 100, shape, generator=g).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes of ``t``: compares NaNs and float8 exactly."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def whole(layout: ArrayLayout) -> Box:
    return Box((0,) * len(layout.shape), layout.shape)


def encode_all(layout: ArrayLayout, x: torch.Tensor) -> dict[tuple[int, ...], bytes]:
    return {c: bytes(encode_shard(layout, c, x[layout.outer_chunk_box(c).relative_to(whole(layout))]))
            for c in layout.chunk_coords()}


def decode_all(layout: ArrayLayout, shards: dict[tuple[int, ...], bytes]) -> torch.Tensor:
    out = torch.zeros(layout.shape, dtype=layout.dtype)
    for coords, shard in shards.items():
        ranges = inner_chunk_ranges(layout, coords, shard[-index_nbytes(layout):])
        if layout.compressor is None:
            assert ranges == inner_chunk_ranges(layout, coords)  # index agrees with the computed layout
        for i, (r, box) in enumerate(zip(ranges, layout.inner_boxes(coords))):
            assert (r is None) == (box is None)
            if r is None:
                continue
            chunk = decode_inner_chunk(layout, bytearray(shard[r.offset:r.stop]), f"{coords}#{i}")
            out[box.relative_to(whole(layout))] = chunk[tuple(slice(0, s) for s in box.sizes)]
    return out
