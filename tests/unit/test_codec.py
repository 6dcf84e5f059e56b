"""Shard object encoder/decoder: round trips, the byte layout zarr expects, corruption detection."""

from __future__ import annotations

import math
import threading

import crc32c
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dtensor.placements import Shard
from shardstore.codec import (
    ArrayLayout,
    decode_index,
    decode_inner_chunk,
    encode_shard,
    index_nbytes,
    inner_chunk_ranges,
    shard_parts,
)
from shardstore.errors import CorruptCheckpointError
from shardstore.tiling import WHOLE_CHUNK_BYTES, budget_tile, choose_inner_chunk_shape
from shardstore.load_plan import StoredArray, load_targets, plan_load
from shardstore.plan import local_save_plan, merge_save_plans
from tests.planning import per_rank
from tests.unit.codec_helpers import DTYPES, bits, decode_all, encode_all, random_tensor, whole

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


def _backwards_on_threads(fn, items) -> None:
    """An ``each`` for ``encode_shard`` as unordered as it may be: the last item first, each on a thread."""
    threads = [threading.Thread(target=fn, args=(item,)) for item in reversed(list(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool], ids=str)
@pytest.mark.parametrize("shape,chunks,inner", LAYOUTS, ids=str)
def test_inner_chunks_spread_over_threads_encode_the_same_bytes(dtype, shape, chunks, inner):
    layout = ArrayLayout(shape, dtype, chunks, inner)
    x = random_tensor(shape, dtype)
    for coords in layout.chunk_coords():
        data = x[layout.outer_chunk_box(coords).relative_to(whole(layout))]
        out = torch.full((1 << 12,), 0xAB, dtype=torch.uint8)  # reused memory: stale bytes everywhere
        spread = bytes(encode_shard(layout, coords, data, out=out, each=_backwards_on_threads))
        assert spread == bytes(encode_shard(layout, coords, data))


def _check_parts(layout: ArrayLayout, x: torch.Tensor) -> int:
    """Every object of ``layout`` that ``shard_parts`` gives uncopied holds exactly ``encode_shard``'s
    bytes, its first part aliasing the data; returns how many it gave."""
    given = 0
    for coords in layout.chunk_coords():
        data = x[layout.outer_chunk_box(coords).relative_to(whole(layout))]
        parts = shard_parts(layout, coords, data)
        whole_chunk = layout.chunk_shape == layout.inner_chunk_shape == layout.outer_chunk_box(coords).sizes
        assert (parts is not None) == (whole_chunk and data.is_contiguous() and layout.compressor is None)
        if parts is not None:
            assert b"".join(parts) == bytes(encode_shard(layout, coords, data))
            assert len(parts[0]) == 0 or np.frombuffer(parts[0], np.uint8).ctypes.data == data.data_ptr()
            given += 1
    return given


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,chunks,inner", LAYOUTS, ids=str)
def test_shard_parts_are_the_encoded_object_uncopied(dtype, shape, chunks, inner):
    layout = ArrayLayout(shape, dtype, chunks, inner)
    given = _check_parts(layout, random_tensor(shape, dtype))
    assert given == (math.prod(layout.grid_shape) if chunks == inner and chunks == shape else 0)


def test_shard_parts_refuse_what_needs_a_copy():
    layout = ArrayLayout((6, 4), torch.float32, (6, 4), (6, 4))
    strided = random_tensor((4, 12), torch.float32)[:, ::2].t()
    assert shard_parts(layout, (0, 0), strided) is None
    assert shard_parts(layout, (0, 0), strided.contiguous()) is not None
    assert shard_parts(ArrayLayout((6, 4), torch.float32, (6, 4), (6, 4), "zstd"), (0, 0), strided.contiguous()) is None
    # one chunk wide but clipped by the array's edge: the object would hold padding
    assert shard_parts(ArrayLayout((13,), torch.int8, (6,), (6,)), (2,), torch.ones(1, dtype=torch.int8)) is None


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
    ((8192, 8192), 4, (1024, 1024)),  # square 2-D tile, exactly 4 MiB, already within a quarter of each dim
    ((8192, 1024), 4, (1024, 256)),  # the 4 MiB tile (1024, 1024) cut to a quarter of the columns
    ((4096, 1024), 2, (1024, 256)),  # bf16: (1024, 1024) cut the same way; 512-byte rows are enough
    ((128, 1024), 4, (128, 1024)),  # 512 KiB: whole
    ((256, 1024), 4, (256, 1024)),  # exactly 1 MiB: whole
    ((512, 1024), 4, (128, 256)),  # 2 MiB: one budget tile, cut to a quarter of both dims
    ((64, 1024, 1024), 4, (1, 256, 256)),  # leading dims shrink first, then the cut
    ((100, 1000, 100), 4, (10, 250, 100)),  # a quarter of 100 fp32 columns is under 512 bytes a row
    ((8191, 8192), 4, (8191, 128)),  # prime rows: split columns instead; no divisor near a quarter
    ((23247, 512), 2, (2583, 256)),  # a quarter of 512 bf16 columns is under 512 bytes a row: halves
    ((23247, 128), 4, (7749, 128)),  # halves of 128 fp32 columns are too narrow as well: whole columns
    ((256, 2018), 4, (64, 1009)),  # 2 x prime columns: no divisor near a quarter, so halves
    ((3, 102400), 4, (3, 25600)),  # fewer rows than splits stay whole
    ((1 << 20,), 4, (1 << 18,)),  # 1-D over 1 MiB: a quarter
    ((2000006,), 4, (1000003,)),  # 2 x prime: one oversized-but-close chunk, not 1-element ones
    ((16, 256), 4, (16, 256)),  # 16 KiB: whole
    ((256, 256), 4, (256, 256)),  # 256 KiB: whole
    ((7,), 4, (7,)),
    ((), 4, ()),
])
def test_choose_inner_chunk_shape_examples(outer, itemsize, expected):
    assert choose_inner_chunk_shape(outer, itemsize) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=0, max_size=4), st.sampled_from([1, 2, 4, 8]),
       st.sampled_from([1 << 10, 1 << 16, 4 << 20]))
def test_choose_inner_chunk_shape_divides_the_budget_tile(outer, itemsize, target):
    budget = budget_tile(tuple(outer), itemsize, target)
    inner = choose_inner_chunk_shape(tuple(outer), itemsize, target)
    assert len(inner) == len(budget) == len(outer)
    assert all(n % b == 0 for n, b in zip(outer, budget))
    assert all(b % i == 0 for b, i in zip(budget, inner))  # every inner chunk lies inside one budget tile
    if math.prod(outer) * itemsize <= min(target, WHOLE_CHUNK_BYTES):
        assert inner == tuple(outer)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 13), min_size=1, max_size=4), st.sampled_from([1, 2, 4, 8]),
       st.sampled_from([1 << 10, 1 << 16, 4 << 20]))
def test_budget_tile_fills_the_target_for_powers_of_two(exponents, itemsize, target):
    outer = tuple(2**e for e in exponents)
    nbytes = math.prod(budget_tile(outer, itemsize, target)) * itemsize
    assert nbytes <= target
    assert nbytes * 2 >= min(target, math.prod(outer) * itemsize)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 13), min_size=1, max_size=4), st.sampled_from([1, 2, 4, 8]))
def test_inner_chunks_of_powers_of_two_fit_a_4_way_split_of_the_last_two_dims(exponents, itemsize):
    outer = tuple(2**e for e in exponents)
    inner = choose_inner_chunk_shape(outer, itemsize)
    if math.prod(outer) * itemsize <= WHOLE_CHUNK_BYTES:
        return
    for d in range(max(0, len(outer) - 2), len(outer)):
        row_bytes = (outer[d] // 4) * itemsize if d == len(outer) - 1 else 512
        if outer[d] >= 4 and row_bytes >= 512:
            assert (outer[d] // 4) % inner[d] == 0, (outer, inner, d)


# -- bytes a load reads with these inner chunks ----------------------------------------------------------


def _bytes_read(rows, dtype, load_mesh, load_dim, inner_chunks, cols=1024):
    """Per rank: (bytes of the inner chunks a load reads, bytes it needs), for a rows x cols tensor saved
    Shard(0) on 2 ranks and loaded Shard(load_dim) on load_mesh ranks. Planning only, no I/O."""
    shape, key = (rows, cols), ("w",)
    saved = merge_save_plans([local_save_plan(r, {key: t}) for r, t in enumerate(per_rank(shape, (2,), (Shard(0),), dtype))],
                             inner_chunks=inner_chunks)
    array = saved.arrays[0]
    stored = {key: StoredArray(key, array.shape, array.dtype, array.chunk_shape, array.inner_chunk_shape)}
    chunk_nbytes = math.prod(array.inner_chunk_shape) * dtype.itemsize
    result = []
    for target in per_rank(shape, (load_mesh,), (Shard(load_dim),), dtype):
        plan = plan_load(load_targets({key: target}), stored)
        read = sum((run.stop - run.start) * chunk_nbytes for run in plan.runs)
        result.append((read, target.box.numel * dtype.itemsize))
    return result


BENCHMARK_TENSORS = [(256, torch.float32), (1024, torch.float32), (4096, torch.float32), (16384, torch.float32),
                     (512, torch.bfloat16), (8192, torch.bfloat16), (32768, torch.bfloat16)]  # 1-64 MiB, 1024 columns


@pytest.mark.parametrize("rows,dtype", BENCHMARK_TENSORS)
@pytest.mark.parametrize("load_mesh,load_dim", [(4, 1), (2, 1), (4, 0), (8, 0), (2, 0)])
def test_loads_splitting_a_saved_shard_up_to_4_ways_read_only_what_they_need(rows, dtype, load_mesh, load_dim):
    """Saved shards of up to ``WHOLE_CHUNK_BYTES`` are one chunk each, read whole (for objects that
    small a read costs its latency, not its bytes, and each chunk costs its own bookkeeping)."""
    saved_shard = rows // 2 * 1024 * dtype.itemsize
    for read, needed in _bytes_read(rows, dtype, load_mesh, load_dim, choose_inner_chunk_shape):
        if saved_shard > WHOLE_CHUNK_BYTES:
            assert read == needed
        else:
            assert needed <= read <= 2 * saved_shard and read % saved_shard == 0


@pytest.mark.parametrize("rows,dtype", [(46494, torch.bfloat16), (66182, torch.bfloat16), (58762, torch.bfloat16),
                                        (38570, torch.float32), (122132, torch.bfloat16)])
@pytest.mark.parametrize("load_mesh", [2, 4])
def test_column_sharded_loads_of_shards_split_for_want_of_a_row_divisor_read_only_what_they_need(rows, dtype, load_mesh):
    """Big shards whose row counts have no divisor near what fits in a cell (prime 33091, 23247 = 3^4 x 7
    x 41, 29381 = 11 x 2671, ...) are split along their columns: a Shard(1) load on 2
    or 4 ranks reads exactly its bytes (these shapes made the 2 GiB benchmark read 1.06x)."""
    for read, needed in _bytes_read(rows, dtype, load_mesh, 1, choose_inner_chunk_shape):
        assert read == needed


@pytest.mark.parametrize("rows,cols", [(512, 2018), (1024, 2 * 521), (600, 2 * 1297)])
def test_column_sharded_loads_of_two_prime_column_counts_read_halves(rows, cols):
    """Columns with no divisor near a quarter (2 x prime) are cut in halves: a Shard(1) load on 2 ranks
    reads exactly its bytes (each read every column before), one on 4 ranks reads less than before."""
    halves = _bytes_read(rows, torch.float32, 2, 1, choose_inner_chunk_shape, cols)
    assert all(read == needed for read, needed in halves), halves
    old = _bytes_read(rows, torch.float32, 4, 1, lambda c, i: budget_tile(c, i, 4 << 20), cols)
    new = _bytes_read(rows, torch.float32, 4, 1, choose_inner_chunk_shape, cols)
    assert sum(n for n, _ in new) < sum(o for o, _ in old), (new, old)


@pytest.mark.parametrize("rows,dtype", BENCHMARK_TENSORS + [(1000, torch.float32), (3000, torch.bfloat16), (96, torch.float32)])
@pytest.mark.parametrize("load_mesh,load_dim", [(3, 0), (8, 0), (16, 0), (32, 0), (3, 1), (8, 1)])
def test_no_load_reads_more_than_with_4_mib_budget_tiles(rows, dtype, load_mesh, load_dim):
    """The case that sank wider tiles: row slices of small tensors (Shard(0) on 8 and more) must not read
    more than the budget tiles alone made them read."""
    old = _bytes_read(rows, dtype, load_mesh, load_dim, lambda c, i: budget_tile(c, i, 4 << 20))
    new = _bytes_read(rows, dtype, load_mesh, load_dim, choose_inner_chunk_shape)
    assert all(n[0] <= o[0] for n, o in zip(new, old)), (new, old)


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
    _check_parts(layout, x)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 9), st.integers(1, 4), st.integers(1, 3)), min_size=0, max_size=3), st.data())
def test_uncompressed_inner_chunk_ranges_skip_exactly_the_inner_chunks_past_the_array(dims, data):
    """Computed without boxes (a load asks it of every object), the ranges must still be None exactly
    where an inner chunk lies past the array's end, the stored ones back to back in C order."""
    shape = tuple(d[0] for d in dims)
    inner = tuple(min(d[2], s) for d, s in zip(dims, shape))
    chunk = tuple(min(i * d[1], max(s, 1)) // i * i for i, d, s in zip(inner, dims, shape))
    layout = ArrayLayout(shape, torch.float32, chunk, inner)
    coords = tuple(data.draw(st.integers(0, n - 1)) for n in layout.grid_shape)
    stride = layout.inner_chunk_nbytes + 4
    boxes = layout.inner_boxes(coords)
    expected, pos = [], 0
    for box in boxes:
        expected.append(None if box is None else (pos, stride))
        pos += 0 if box is None else stride
    got = [None if r is None else (r.offset, r.nbytes) for r in inner_chunk_ranges(layout, coords)]
    assert got == expected
    with pytest.raises(IndexError):
        inner_chunk_ranges(layout, tuple(n for n in layout.grid_shape) or (1,))
