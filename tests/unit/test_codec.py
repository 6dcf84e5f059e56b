"""Shard object encoder/decoder: round trips, the byte layout zarr expects, corruption detection."""

from __future__ import annotations

import math

import crc32c
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardstore.codec import (
    ArrayLayout,
    choose_inner_chunk_shape,
    decode_index,
    decode_inner_chunk,
    encode_shard,
    index_nbytes,
    inner_chunk_ranges,
)
from shardstore.errors import CorruptCheckpointError
from tests.unit.codec_helpers import DTYPES, bits, decode_all, encode_all, random_tensor

LAYOUTS = [  # shape, chunk_shape, inner_chunk_shape: 0-d, 1-d, edge chunks, uneven inner choices
    ((), (), ()),
    ((1,), (1,), (1,)),
    ((13,), (6,), (2,)),
    ((5, 7), (4, 4), (2, 2)),
    ((5, 7), (5, 7), (5, 7)),
    ((9, 6), (9, 6), (3, 1)),
    ((3, 5, 4), (2, 4, 4), (1, 2, 4)),
    ((0, 4), (1, 4), (1, 2)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,chunks,inner", LAYOUTS, ids=str)
def test_round_trip(dtype, shape, chunks, inner):
    layout = ArrayLayout(shape, dtype, chunks, inner)
    x = random_tensor(shape, dtype)
    assert torch.equal(bits(decode_all(layout, encode_all(layout, x))), bits(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8], ids=str)
def test_round_trip_zstd(dtype):
    layout = ArrayLayout((10, 6), dtype, (4, 6), (2, 3), compressor="zstd")
    x = random_tensor((10, 6), dtype)
    assert torch.equal(bits(decode_all(layout, encode_all(layout, x))), bits(x))


def test_non_contiguous_input_is_gathered_without_prior_copy():
    layout = ArrayLayout((6, 4), torch.float32, (6, 4), (3, 2))
    base = random_tensor((4, 12), torch.float32)
    x = base[:, ::2].t()  # transposed and strided: no unit stride anywhere
    assert not x.is_contiguous()
    assert torch.equal(decode_all(layout, encode_all(layout, x)), x)


def test_byte_layout_matches_zarr_sharding():
    """Edge chunk zero-padded, crc after each chunk, index (offset, nbytes incl. crc), missing = 2^64-1."""
    layout = ArrayLayout((5, 3), torch.float32, (4, 3), (2, 3))
    x = torch.arange(15, dtype=torch.float32).reshape(5, 3) + 1
    shard = bytes(encode_shard(layout, (1, 0), x[4:]))
    chunk = np.array([[13, 14, 15], [0, 0, 0]], dtype="<f4").tobytes()
    index = np.array([0, 28, 2**64 - 1, 2**64 - 1], dtype="<u8").tobytes()
    crc = lambda b: crc32c.crc32c(b).to_bytes(4, "little")  # noqa: E731
    assert shard == chunk + crc(chunk) + index + crc(index)
    assert len(shard) == 28 + index_nbytes(layout)


def test_out_buffer_is_reused():
    layout = ArrayLayout((8,), torch.int64, (8,), (4,))
    out = torch.empty(1000, dtype=torch.uint8)
    view = encode_shard(layout, (0,), torch.arange(8), out=out)
    assert np.frombuffer(view, dtype=np.uint8).ctypes.data == out.data_ptr()
    assert torch.equal(decode_all(layout, {(0,): bytes(view)}), torch.arange(8))


@pytest.mark.parametrize("compressor", [None, "zstd"])
def test_flipped_data_byte_names_the_chunk(compressor):
    layout = ArrayLayout((4, 4), torch.float32, (4, 4), (2, 4), compressor=compressor)
    shard = bytearray(encode_shard(layout, (0, 0), random_tensor((4, 4), torch.float32)))
    r = inner_chunk_ranges(layout, (0, 0), shard[-index_nbytes(layout):])[1]
    shard[r.offset + 1] ^= 0x40
    with pytest.raises(CorruptCheckpointError, match=r"file:///ck/w/c/0/0 inner chunk 1: crc32c mismatch"):
        decode_inner_chunk(layout, shard[r.offset:r.stop], "file:///ck/w/c/0/0 inner chunk 1")


def test_truncated_chunk_and_index_are_errors():
    layout = ArrayLayout((4, 4), torch.float32, (4, 4), (2, 4))
    shard = bytes(encode_shard(layout, (0, 0), random_tensor((4, 4), torch.float32)))
    with pytest.raises(CorruptCheckpointError, match="inner chunk is 31 bytes, expected 36"):
        decode_inner_chunk(layout, bytearray(shard[5:36]), "w/c/0/0 inner chunk 0")
    with pytest.raises(CorruptCheckpointError, match="shard index is 30 bytes, expected 36"):
        decode_index(layout, shard[-30:], "w/c/0/0")
    damaged = bytearray(shard[-index_nbytes(layout):])
    damaged[3] ^= 1
    with pytest.raises(CorruptCheckpointError, match=r"w/c/0/0 \(shard index\): crc32c mismatch"):
        decode_index(layout, damaged, "w/c/0/0")


def test_wrong_input_shape_and_bad_layouts_are_refused():
    layout = ArrayLayout((5, 7), torch.float32, (4, 4), (2, 2))
    with pytest.raises(ValueError, match=r"shape \[1, 3\]"):
        encode_shard(layout, (1, 1), torch.zeros(4, 4))
    with pytest.raises(IndexError):
        layout.outer_chunk_box((2, 0))
    with pytest.raises(ValueError, match="divide"):
        ArrayLayout((5,), torch.float32, (4,), (3,))
    with pytest.raises(ValueError, match=">= 1"):
        ArrayLayout((0,), torch.float32, (0,), (0,))
    with pytest.raises(TypeError, match="cannot be stored"):
        ArrayLayout((1,), torch.quint8, (1,), (1,))


def test_layout_geometry():
    layout = ArrayLayout((5, 7), torch.float32, (4, 4), (2, 2))
    assert layout.grid_shape == (2, 2) and layout.inner_grid_shape == (2, 2)
    assert list(layout.chunk_coords()) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert layout.outer_chunk_box((1, 1)).sizes == (1, 3)
    assert [b and b.sizes for b in layout.inner_boxes((1, 1))] == [(1, 2), (1, 1), None, None]
    assert list(ArrayLayout((), torch.float32, (), ()).chunk_coords()) == [()]
    assert list(ArrayLayout((0, 3), torch.float32, (1, 3), (1, 3)).chunk_coords()) == []


# -- choose_inner_chunk_shape ---------------------------------------------------------------------------


@pytest.mark.parametrize("outer,itemsize,expected", [
    ((8192, 8192), 4, (1024, 1024)),  # square 2-D tile, exactly 4 MiB
    ((64, 1024, 1024), 4, (1, 1024, 1024)),  # leading dims shrink first
    ((100, 1000, 100), 4, (10, 1000, 100)),
    ((8191, 8192), 4, (8191, 128)),  # prime rows: split columns instead
    ((2000006,), 4, (1000003,)),  # 2 x prime: one oversized-but-close chunk, not 1-element ones
    ((7,), 4, (7,)),
    ((), 4, ()),
])
def test_choose_inner_chunk_shape_examples(outer, itemsize, expected):
    assert choose_inner_chunk_shape(outer, itemsize) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=0, max_size=4), st.sampled_from([1, 2, 4, 8]),
       st.sampled_from([1 << 10, 1 << 16, 4 << 20]))
def test_choose_inner_chunk_shape_divides(outer, itemsize, target):
    inner = choose_inner_chunk_shape(tuple(outer), itemsize, target)
    assert len(inner) == len(outer)
    assert all(n % i == 0 for n, i in zip(outer, inner))
    if math.prod(outer) * itemsize <= target:
        assert inner == tuple(outer)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 13), min_size=1, max_size=4), st.sampled_from([1, 2, 4, 8]),
       st.sampled_from([1 << 10, 1 << 16, 4 << 20]))
def test_choose_inner_chunk_shape_fills_the_target_for_powers_of_two(exponents, itemsize, target):
    outer = tuple(2**e for e in exponents)
    inner = choose_inner_chunk_shape(outer, itemsize, target)
    nbytes = math.prod(inner) * itemsize
    assert nbytes <= target
    assert nbytes * 2 >= min(target, math.prod(outer) * itemsize)


# -- property round trip --------------------------------------------------------------------------------


@st.composite
def layouts(draw):
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.integers(0, 9)) for _ in range(ndim))
    chunks = tuple(draw(st.integers(1, 6)) for _ in range(ndim))
    inner = tuple(draw(st.sampled_from([d for d in range(1, c + 1) if c % d == 0])) for c in chunks)
    return ArrayLayout(shape, draw(st.sampled_from(DTYPES)), chunks, inner)


@settings(max_examples=60, deadline=None)
@given(layouts(), st.integers(0, 2**31))
def test_round_trip_property(layout, seed):
    x = random_tensor(layout.shape, layout.dtype, seed)
    assert torch.equal(bits(decode_all(layout, encode_all(layout, x))), bits(x))
