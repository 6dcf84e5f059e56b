"""Differential tests against torch.distributed.tensor: same local shards, same full tensors.

Randomized (seeded) over shapes with uneven and empty shards, meshes (4,), (2,2), (2,3), (8,), (2,2,2)
and placement lists that include several mesh dims sharding one tensor dim.
"""

import math
import random

import pytest
import torch
import torch.distributed.tensor as tdt

import dtensor
from dtensor import Partial, Replicate, Shard
from tests.ranks import mesh, run_ranks

MESHES = [(4,), (2, 2), (2, 3), (8,), (2, 2, 2)]


def random_placements(rng: random.Random, mesh_ndim: int, tensor_ndim: int, partial: bool = False):
    choices = [Shard(d) for d in range(tensor_ndim)] + [Replicate()]
    if partial:
        choices.append(Partial("sum"))
    return tuple(rng.choice(choices) for _ in range(mesh_ndim))


def random_shape(rng: random.Random, mesh_size: int):
    ndim = rng.randint(1, 3)
    return tuple(rng.choice([0, 1, 2, 3, 5, mesh_size - 1, mesh_size + 1, 2 * mesh_size + 3]) if d == 0 else rng.randint(1, 7) for d in range(ndim))


def cases(mesh_shape, count, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        shape = random_shape(rng, max(mesh_shape))
        rng.shuffle(shape := list(shape))
        src = random_placements(rng, len(mesh_shape), len(shape))
        dst = random_placements(rng, len(mesh_shape), len(shape))
        out.append((tuple(shape), src, dst))
    return out


def torch_placements(placements):
    return [to_torch_placement(p) for p in placements]


def to_torch_placement(p):
    if isinstance(p, Shard):
        return tdt.Shard(p.dim)
    if isinstance(p, Partial):
        return tdt.Partial(p.reduce_op)
    return tdt.Replicate()


def _compare_with_torch(mesh_shape, case_list, seed):
    m = mesh(mesh_shape)
    for i, (shape, src, dst) in enumerate(case_list):
        torch.manual_seed(seed + i)
        full = torch.randn(shape, dtype=torch.float64)
        ours = dtensor.distribute_tensor(full, m, src)
        theirs = tdt.distribute_tensor(full, m, torch_placements(src))
        where = f"case {i}: shape {shape} {src} -> {dst}"
        assert torch.equal(ours.to_local(), theirs.to_local()), f"distribute_tensor differs, {where}"
        moved = ours.redistribute(placements=dst)
        moved_theirs = theirs.redistribute(placements=torch_placements(dst))
        assert moved.placements == dst
        assert moved.to_local().shape == moved_theirs.to_local().shape, where
        assert torch.equal(moved.to_local(), moved_theirs.to_local()), f"redistribute differs, {where}"
        assert torch.equal(moved.full_tensor(), full), f"full_tensor differs, {where}"
    return len(case_list)


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_distribute_and_redistribute_match_torch(mesh_shape):
    seed = 1000 + sum(mesh_shape) * 7
    case_list = cases(mesh_shape, 25, seed)
    results = run_ranks(math.prod(mesh_shape), _compare_with_torch, mesh_shape, case_list, seed)
    assert results == [len(case_list)] * math.prod(mesh_shape)


def _partial_sources_match_torch(mesh_shape, case_list, seed):
    m = mesh(mesh_shape)
    rank = torch.distributed.get_rank()
    for i, (shape, src, dst) in enumerate(case_list):
        torch.manual_seed(seed + i)
        full = torch.randn(shape, dtype=torch.float64)
        replicated = dtensor.distribute_tensor(full, m, [Replicate()] * m.ndim)
        # a Partial source: every rank holds its own term
        src_p = tuple(Partial("sum") if isinstance(p, Replicate) else p for p in src)
        local = dtensor.distribute_tensor(full, m, [p if isinstance(p, Shard) else Replicate() for p in src_p]).to_local()
        local = local * (rank + 1)
        stride = torch.empty(shape).stride()
        ours = dtensor.DTensor.from_local(local, m, src_p, shape=shape, stride=stride)
        theirs = tdt.DTensor.from_local(local, m, torch_placements(src_p), shape=shape, stride=stride)
        moved = ours.redistribute(placements=dst)
        moved_theirs = theirs.redistribute(placements=torch_placements(dst))
        where = f"case {i}: shape {shape} {src_p} -> {dst}"
        assert torch.allclose(moved.to_local(), moved_theirs.to_local()), f"redistribute differs, {where}"
        assert torch.allclose(moved.full_tensor(), moved_theirs.full_tensor()), where
        del replicated
    return True


@pytest.mark.parametrize("mesh_shape", [(4,), (2, 2), (2, 3)])
def test_partial_sources_match_torch(mesh_shape):
    seed = 77 + sum(mesh_shape)
    case_list = cases(mesh_shape, 15, seed)
    assert all(run_ranks(math.prod(mesh_shape), _partial_sources_match_torch, mesh_shape, case_list, seed))


def _sub_mesh(case_list, seed):
    m = mesh((2,))  # ranks 0 and 1 of a 4-rank world
    rank = torch.distributed.get_rank()
    for i, (shape, src, dst) in enumerate(case_list):
        torch.manual_seed(seed + i)
        full = torch.randn(shape, dtype=torch.float64)
        ours = dtensor.distribute_tensor(full, m, src)
        theirs = tdt.distribute_tensor(full, m, torch_placements(src))
        moved = ours.redistribute(placements=dst)
        moved_theirs = theirs.redistribute(placements=torch_placements(dst))
        if rank < 2:
            assert torch.equal(moved.to_local(), moved_theirs.to_local())
            assert torch.equal(moved.full_tensor(), full)
        else:
            assert moved.to_local().numel() == 0
    return True


def test_sub_mesh_of_the_world():
    case_list = cases((2,), 10, 5)
    assert all(run_ranks(4, _sub_mesh, case_list, 5))
