"""The reshape planner (``dtensor.ops.views``), pure: which sharded dims survive a view, no processes."""

import itertools
import math

import pytest
import torch

from dtensor import Partial, Replicate, Shard
from dtensor.ops.views import view_groups, view_placements
from dtensor.placements import local_box, mesh_coordinates

R, P = Replicate(), Partial()


@pytest.mark.parametrize(
    "src,dst,groups",
    [
        ((4, 6, 5), (24, 5), [((0, 1), (0,)), ((2,), (1,))]),
        ((24, 5), (4, 6, 5), [((0,), (0, 1)), ((1,), (2,))]),
        ((2, 3), (3, 2), [((0, 1), (0, 1))]),
        ((1, 5), (5,), [((0,), ()), ((1,), (0,))]),
        ((5,), (5, 1), [((0,), (0,)), ((), (1,))]),
        ((1, 5, 1), (1, 5), [((0,), (0,)), ((1,), (1,)), ((2,), ())]),
        ((4, 1, 6), (24,), [((0, 1, 2), (0,))]),
        ((0, 3), (3, 0), [((0, 1), (0, 1))]),
    ],
)
def test_view_groups(src, dst, groups):
    assert view_groups(src, dst) == groups


@pytest.mark.parametrize(
    "src,dst,mesh,placements,inputs,output",
    [
        ((4, 6, 5), (24, 5), (2,), [Shard(0)], [Shard(0)], [Shard(0)]),  # outermost of a merge: kept
        # the inner dim of a merge: sharded on the merge's outermost dim first, where that comes out exact
        ((4, 6, 5), (24, 5), (2,), [Shard(1)], [Shard(0)], [Shard(0)]),
        ((4, 6, 5), (4, 30), (2,), [Shard(2)], [Shard(1)], [Shard(1)]),
        ((3, 4, 5), (12, 5), (2,), [Shard(1)], [R], [R]),  # 3 rows -> 2, 1: not chunk-exact, replicated
        ((1, 4, 5), (4, 5), (2,), [Shard(1)], [Shard(1)], [Shard(0)]),  # a vanishing size-1 dim
        ((4, 6), (24,), (2, 2), [R, Shard(1)], [R, Shard(0)], [R, Shard(0)]),
        ((4, 6), (24,), (2, 2), [Shard(1), Shard(1)], [Shard(0), Shard(0)], [Shard(0), Shard(0)]),
        ((2, 6), (12,), (4,), [Shard(1)], [R], [R]),  # 2 rows for 4 ranks
        ((5, 3, 4), (15, 4), (2,), [Shard(0)], [R], [R]),  # 5 rows -> 3, 2; 15 -> 8, 7: not chunk-exact
        ((12,), (4, 3), (2,), [Shard(0)], [Shard(0)], [Shard(0)]),  # split: kept on the outer part
        ((10,), (5, 2), (2,), [Shard(0)], [R], [R]),  # 5, 5 rows vs 3, 2 -> 6, 4 elements
        ((6,), (3, 2), (4,), [Shard(0)], [Shard(0)], [Shard(0)]),  # 2,2,2,0 both ways (torch replicates)
        ((1, 5), (5,), (2,), [Shard(0)], [R], [R]),  # a vanishing size-1 dim
        ((5,), (1, 5), (2,), [Shard(0)], [Shard(0)], [Shard(1)]),
        ((4, 6), (24,), (2, 2), [Shard(0), Shard(1)], [Shard(0), R], [Shard(0), R]),
        ((8, 3), (24,), (2, 2), [Shard(0), Shard(0)], [Shard(0), Shard(0)], [Shard(0), Shard(0)]),
        ((4, 6), (2, 2, 6), (2,), [P], [P], [P]),  # a pending sum survives data movement
    ],
)
def test_view_placements(src, dst, mesh, placements, inputs, output):
    assert view_placements(src, dst, mesh, placements) == (tuple(inputs), tuple(output))


def _pieces(shape, mesh, placements):
    """Every rank's piece of arange(numel).view(shape), flattened, in mesh coordinate order."""
    full = torch.arange(math.prod(shape)).view(shape)
    out = []
    for c in mesh_coordinates(mesh):
        box = local_box(shape, mesh, placements, c)
        out.append(full[tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))].flatten().tolist())
    return out


@pytest.mark.parametrize("mesh", [(2,), (3,), (4,), (2, 2)])
def test_kept_shards_hold_the_same_elements(mesh):
    """Whenever the planner keeps a dim sharded, every rank's input piece viewed locally is exactly its
    piece of the output: the local view is correct without moving data."""
    shapes = [(4, 6), (6, 4), (24,), (2, 12), (12, 2), (5, 3), (15,), (3, 5), (1, 5, 3), (2, 3, 4), (6, 2, 2)]
    kept = 0
    for src, dst in itertools.permutations(shapes, 2):
        if math.prod(src) != math.prod(dst):
            continue
        for placements in itertools.product([R] + [Shard(d) for d in range(len(src))], repeat=len(mesh)):
            inputs, output = view_placements(src, dst, mesh, placements)
            if any(p.is_shard() for p in output):
                kept += 1
                assert _pieces(src, mesh, inputs) == _pieces(dst, mesh, output), (src, dst, placements)
    assert kept > 10
