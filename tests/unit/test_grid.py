"""The chunk grid: gcd of shard boundaries, clipped cells, and cell lookups by arithmetic."""

import itertools

import pytest

from dtensor.placements import Box, Replicate, Shard, local_box, mesh_coordinates
from shardstore.grid import cell_box, cells_in_box, cells_overlapping, choose_chunk_shape, grid_shape, linear_index


def boxes(shape, mesh_shape, placements):
    return [local_box(shape, mesh_shape, placements, c) for c in mesh_coordinates(mesh_shape)]


def all_cells(chunks, shape):
    return list(itertools.product(*(range(n) for n in grid_shape(chunks, shape))))


@pytest.mark.parametrize(
    "shape, mesh, placements, expected",
    [
        ((10, 4), (2,), (Shard(0),), (5, 4)),  # even: one shard = one cell
        ((5,), (4,), (Shard(0),), (2,)),  # torch.chunk 2,2,1,0: the last cell is clipped
        ((10,), (2, 2), (Shard(0), Shard(0)), (1,)),  # nested uneven 0,3,5,8,10: the degenerate gcd
        ((8,), (2, 2), (Shard(0), Shard(0)), (2,)),  # nested even
        ((6, 9), (2, 3), (Shard(0), Shard(1)), (3, 3)),
        ((6, 9), (2, 3), (Replicate(), Shard(1)), (6, 3)),
        ((7, 3), (4,), (Replicate(),), (7, 3)),  # nobody shards: full size
        ((0, 3), (2,), (Shard(0),), (1, 3)),  # zero-size dim: chunk sizes stay positive
        ((), (2,), (Replicate(),), ()),  # 0-d
    ],
)
def test_choose_chunk_shape(shape, mesh, placements, expected):
    assert choose_chunk_shape(shape, boxes(shape, mesh, placements)) == expected


def test_cells_of_uneven_torch_chunk_are_the_shards():
    chunks = choose_chunk_shape((5,), boxes((5,), (4,), (Shard(0),)))
    assert [cell_box(chunks, (5,), c) for c in all_cells(chunks, (5,))] == [
        Box((0,), (2,)), Box((2,), (2,)), Box((4,), (1,))]


def test_zero_d_has_one_cell_and_zero_size_has_none():
    assert grid_shape((), ()) == () and all_cells((), ()) == [()]
    assert cells_in_box((), (), Box((), ())) == [()] and cells_overlapping((), (), Box((), ())) == [()]
    assert cell_box((), (), ()) == Box((), ())
    assert grid_shape((1, 3), (0, 3)) == (0, 1)
    assert cells_overlapping((1, 3), (0, 3), Box((0, 0), (0, 3))) == []


def test_max_cell_bytes_splits_outer_dims_first_and_cut_dims_only_at_divisors():
    shape = (1000, 64)
    replicated = [Box((0, 0), shape)] * 4
    assert choose_chunk_shape(shape, replicated, itemsize=4, max_cell_bytes=64 * 4 * 100) == (100, 64)
    sharded = boxes(shape, (4,), (Shard(0),))  # rows cut at 250, 500, 750
    assert choose_chunk_shape(shape, sharded, itemsize=4, max_cell_bytes=64 * 4 * 10) == (10, 64)  # row bands
    assert choose_chunk_shape(shape, sharded, itemsize=4, max_cell_bytes=64 * 4 * 12) == (10, 64)  # 10 divides 250
    assert choose_chunk_shape(shape, sharded, itemsize=4, max_cell_bytes=10**9) == (250, 64)
    prime = boxes((1018, 64), (2,), (Shard(0),))  # shards of 509 rows: no divisor near 10, so columns are split
    assert choose_chunk_shape((1018, 64), prime, itemsize=4, max_cell_bytes=64 * 4 * 10) == (509, 1)
    whole = [Box((0,), (1000,))]  # nobody cuts: a divisor within half of what fits, else equal pieces
    assert choose_chunk_shape((1000,), whole, max_cell_bytes=334) == (250,)
    assert choose_chunk_shape((1009,), [Box((0,), (1009,))], max_cell_bytes=334) == (253,)


def test_columns_split_for_want_of_a_row_divisor_fall_on_the_quarters_of_a_column_sharded_load():
    prime = boxes((1018, 1024), (2,), (Shard(0),))  # 509 rows each; 400 columns fit: 3 equal pieces were 342 wide
    assert choose_chunk_shape((1018, 1024), prime, itemsize=2, max_cell_bytes=509 * 2 * 400) == (509, 256)


def test_cell_box_clips_and_rejects_outside():
    assert cell_box((4, 4), (10, 5), (2, 1)) == Box((8, 4), (2, 1))
    with pytest.raises(IndexError):
        cell_box((4, 4), (10, 5), (3, 0))
    with pytest.raises(ValueError):
        cell_box((0, 4), (10, 5), (0, 0))


def brute(chunks, shape, box, inside):
    out = []
    for coords in all_cells(chunks, shape):
        cb = cell_box(chunks, shape, coords)
        hit = cb.intersect(box)
        if hit is not None and (hit == cb or not inside):
            out.append(coords)
    return out


@pytest.mark.parametrize("box", [Box((0, 0), (10, 7)), Box((3, 2), (4, 4)), Box((4, 3), (4, 2)), Box((9, 6), (1, 1)),
                                 Box((8, 0), (2, 7)), Box((5, 5), (0, 2)), Box((10, 0), (0, 7))])
def test_cell_lookups_match_brute_force(box):
    chunks, shape = (4, 3), (10, 7)
    assert cells_overlapping(chunks, shape, box) == brute(chunks, shape, box, inside=False)
    assert cells_in_box(chunks, shape, box) == brute(chunks, shape, box, inside=True)


def test_linear_index_is_row_major():
    counts = (2, 3, 4)
    flat = [linear_index(c, counts) for c in itertools.product(range(2), range(3), range(4))]
    assert flat == list(range(24)) and linear_index((), ()) == 0
