"""The multi-rank harness itself: results come back per rank, failures and hangs become errors fast."""

import time

import pytest
import torch
import torch.distributed as dist

from tests.ranks import RankFailure, mesh, run_ranks


def _sum_of_ranks():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), int(t.item())


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_results_come_back_per_rank(world_size):
    results = run_ranks(world_size, _sum_of_ranks)
    expected = sum(range(world_size))
    assert results == [(r, expected) for r in range(world_size)]


def _fail_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("boom on one")
    dist.barrier()


def test_failure_on_one_rank_is_reported_quickly():
    start = time.monotonic()
    with pytest.raises(RankFailure, match="boom on one"):
        run_ranks(2, _fail_on_rank_one)
    assert time.monotonic() - start < 20
    assert run_ranks(2, _sum_of_ranks) == [(0, 1), (1, 1)]  # a fresh pool replaces the broken one


def _mesh_coordinates(shape):
    return tuple(mesh(shape).get_coordinate() or ())


def test_two_dim_mesh_over_six_ranks():
    coords = run_ranks(6, _mesh_coordinates, (2, 3))
    assert coords == [(i, j) for i in range(2) for j in range(3)]
