"""Collective merging: a Partial over several mesh dims becomes Replicate in ONE all-reduce over the
flattened sub-mesh, and several mesh dims cutting one tensor dim gather in ONE all-gather (torch 2.13
issues one per mesh dim; its development branch merges them). Values and gradients equal torch's
DTensor; the counts come from each library's CommDebugMode."""

import pytest
import torch

from dtensor.dispatch import fallback_ops
from tests.parity import assert_same, comm_counts
from tests.ranks import mesh, run_ranks

import dtensor
import torch.distributed.tensor as tdt


def _placements(lib, names):
    return [lib.Shard(int(n[1:])) if n[0] == "S" else lib.Partial(n[1:]) if n[0] == "P" else lib.Replicate() for n in names]


def _local_term(full: torch.Tensor, src) -> torch.Tensor:
    """This rank's term of ``full`` under Partial placements (every mesh dim partial with one op)."""
    rank, n = torch.distributed.get_rank(), torch.distributed.get_world_size()
    op = src[0][1:]
    if op == "sum":
        return full * (rank + 1) / (n * (n + 1) / 2)
    if op == "avg":
        return full * (rank + 1) * n / (n * (n + 1) / 2)
    return full - rank  # max: rank 0 holds the maximum


def _move(lib, full: torch.Tensor, mesh_shape, src, dst):
    """``full`` laid out as ``src``, moved to ``dst``, and the gradient of a weighted sum of the result."""
    m = mesh(mesh_shape)
    if src[0][0] == "P":
        x = _local_term(full, src).requires_grad_()
        d = lib.DTensor.from_local(x, m, _placements(lib, src))
    else:
        d = x = lib.distribute_tensor(full.clone().requires_grad_(), m, _placements(lib, src))
    out, counts = comm_counts(lib, lambda: d.redistribute(m, _placements(lib, dst)))
    weight = lib.distribute_tensor(torch.arange(float(full.numel())).reshape(full.shape), m, [lib.Replicate()] * len(mesh_shape))
    (out * weight).sum().backward()
    return out, x.grad, counts


def _case(shape, mesh_shape, src, dst, expected):
    seen = set(fallback_ops)
    torch.manual_seed(4)
    full = torch.randn(*shape, dtype=torch.float64)
    ours = _move(dtensor, full, mesh_shape, src, dst)
    theirs = _move(tdt, full, mesh_shape, src, dst)
    assert_same(ours[:2], theirs[:2], atol=1e-12, what=f"{src} -> {dst}")
    assert ours[2] == expected, f"our collectives {ours[2]}, expected {expected} (torch 2.13: {theirs[2]})"
    assert sorted(fallback_ops - seen) == []
    return theirs[2]


CASES = [
    ((4, 6), (2, 2), ("Psum", "Psum"), ("R", "R"), {"all_reduce": 1}),
    ((4, 6), (2, 2), ("Pavg", "Pavg"), ("R", "R"), {"all_reduce": 1}),
    ((4, 6), (2, 2), ("Pmax", "Pmax"), ("R", "R"), {"all_reduce": 1}),
    ((8, 6), (2, 2), ("S0", "S0"), ("R", "R"), {"all_gather_into_tensor": 1}),
    ((10, 3), (2, 2), ("S0", "S0"), ("R", "R"), {"all_gather_into_tensor": 1}),  # nested uneven: 3, 2, 3, 2
    ((3, 5), (2, 2), ("S0", "S0"), ("R", "R"), {"all_gather_into_tensor": 1}),  # 1, 1, 1, 0
    ((10, 3), (2, 2), ("S0", "S0"), ("R", "S1"), {"all_gather_into_tensor": 1}),
    ((8, 6), (2, 2), ("S0", "S1"), ("R", "R"), {"all_gather_into_tensor": 2}),  # two tensor dims: no merge
]


@pytest.mark.parametrize("shape,mesh_shape,src,dst,expected", CASES)
def test_one_collective_over_the_flattened_mesh_dims(shape, mesh_shape, src, dst, expected):
    run_ranks(4, _case, shape, mesh_shape, src, dst, expected)
