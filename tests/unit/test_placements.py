"""Pure shard arithmetic and redistribute planning, checked without processes."""

import itertools
import random

import pytest
import torch

from dtensor.placements import (
    Box,
    Partial,
    Replicate,
    Shard,
    local_box,
    mesh_coordinates,
    normalize_placements,
    shard_size_and_offset,
)
from dtensor.redistribute import plan_steps


@pytest.mark.parametrize("size,n", [(s, n) for s in range(0, 13) for n in range(1, 9)])
def test_shard_sizes_follow_torch_chunk(size, n):
    pieces = [p.shape[0] for p in torch.chunk(torch.empty(size), n)] if size else []
    pieces += [0] * (n - len(pieces))
    got = [shard_size_and_offset(size, n, i) for i in range(n)]
    assert [s for s, _ in got] == pieces
    starts = [sum(pieces[:i]) for i in range(n)]
    assert [o if s else None for s, o in got] == [st if p else None for st, p in zip(starts, pieces)]
    assert all(o == size for s, o in got if s == 0)  # DCP's convention for empty shards


def test_nested_sharding_cuts_the_outer_piece_again():
    # 10 rows over a 2x2 mesh both sharding dim 0: 5 | 5 then 3,2 | 3,2 -> boundaries 0,3,5,8,10
    boxes = [local_box((10,), (2, 2), (Shard(0), Shard(0)), c) for c in mesh_coordinates((2, 2))]
    assert [(b.offsets[0], b.sizes[0]) for b in boxes] == [(0, 3), (3, 2), (5, 3), (8, 2)]


def test_boxes_tile_the_tensor_for_random_layouts():
    rng = random.Random(0)
    for _ in range(300):
        mesh_shape = rng.choice([(4,), (2, 2), (2, 3), (2, 2, 2), (3,)])
        shape = tuple(rng.randint(0, 9) for _ in range(rng.randint(1, 3)))
        placements = [rng.choice([Replicate()] + [Shard(d) for d in range(len(shape))]) for _ in mesh_shape]
        owners = torch.zeros(shape, dtype=torch.int64)
        for c in mesh_coordinates(mesh_shape):
            box = local_box(shape, mesh_shape, placements, c)
            if box.numel:
                owners[tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))] += 1
        replicas = 1
        for m, p in zip(mesh_shape, placements):
            replicas *= m if isinstance(p, Replicate) else 1
        assert bool((owners == replicas).all()), (shape, mesh_shape, placements)


def test_normalize_placements_checks_and_fixes_dims():
    assert normalize_placements([Shard(-1)], 1, 3) == (Shard(2),)
    with pytest.raises(ValueError, match="out of range"):
        normalize_placements([Shard(3)], 1, 3)
    with pytest.raises(ValueError, match="the mesh has 2 dims, got 1 placements"):
        normalize_placements([Shard(0)], 2, 3)
    with pytest.raises(ValueError):
        Partial("prod")


def test_box_intersection():
    a, b = Box((0, 0), (4, 4)), Box((2, 3), (5, 5))
    assert a.intersect(b) == Box((2, 3), (2, 1))
    assert a.intersect(Box((4, 0), (1, 1))) is None
    assert Box((2, 3), (2, 1)).relative_to(a) == (slice(2, 4), slice(3, 4))


ALL = [Replicate(), Partial("sum"), Shard(0), Shard(1)]


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_plans_reach_the_target_and_never_cut_under_an_inner_shard(ndim):
    for src, dst in itertools.product(itertools.product(ALL, repeat=ndim), repeat=2):
        current = list(src)
        for step in plan_steps(src, dst):
            assert list(step.before) == current and step.src == current[step.mesh_dim] != step.dst
            touched = {p.dim for p in (step.src, step.dst) if isinstance(p, Shard)}
            inner = {p.dim for p in current[step.mesh_dim + 1 :] if isinstance(p, Shard)}
            assert not touched & inner, (src, dst, step)
            current[step.mesh_dim] = step.dst
        assert tuple(current) == dst


def test_single_dim_transitions_take_one_step():
    assert len(plan_steps((Shard(0),), (Shard(1),))) == 1
    assert len(plan_steps((Partial(),), (Shard(0),))) == 1
    assert plan_steps((Shard(0),), (Shard(0),)) == ()


def test_merge_steps_fuses_the_same_collective_on_several_mesh_dims():
    from dtensor.redistribute import merged_plan, nested_pieces

    S0, R = Shard(0), Replicate()
    reduce_both = merged_plan((Partial(), Partial()), (R, R))
    assert [(s.src, s.dst, s.group) for s in reduce_both] == [(Partial(), R, (0, 1))]
    gather_both = merged_plan((S0, S0, S0), (S0, R, R))
    assert [(s.src, s.dst, s.group) for s in gather_both] == [(S0, R, (1, 2))]
    assert len(merged_plan((S0, Shard(1)), (R, R))) == 2  # different tensor dims: two all-gathers
    assert len(merged_plan((Partial("sum"), Partial("max")), (R, R))) == 2  # different reductions
    assert [s.group for s in merged_plan((Partial(), S0), (R, R))] == [(), ()]  # different collectives
    assert nested_pieces(10, [2, 2]) == [3, 2, 3, 2] and nested_pieces(3, [2, 2]) == [1, 1, 1, 0]
