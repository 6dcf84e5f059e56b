"""``local_map``'s outputs against torch's: ``out_placements=None`` (and a None entry of a tuple) makes a
Replicate DTensor, as ``from_local``'s default (ours returned the plain local tensor), a tuple gives
one entry per output, and without a DTensor argument the result stays plain even with ``device_mesh``
(ours wrapped it)."""

import pytest
import torch
from torch.distributed.tensor.experimental import local_map as torch_local_map

import dtensor
from dtensor.experimental import local_map
from tests.parity import assert_same, both
from tests.ranks import mesh, run_ranks


def _mapped(lib, case: str, mesh_shape):
    fn = local_map if lib is dtensor else torch_local_map
    m = mesh(mesh_shape)
    S, R = lib.Shard, lib.Replicate()
    d = lib.distribute_tensor(torch.arange(24.0).reshape(4, 6), m, [S(0)] + [R] * (len(mesh_shape) - 1))
    shard = [S(0)] + [R] * (len(mesh_shape) - 1)
    pair = lambda x: (x * 2, x + 1)  # noqa: E731
    calls = {
        "None": (lambda x: x * 2, None, (d,), None),
        "tuple with None": (pair, (shard, None), (d,), None),
        "tuple": (pair, (shard, shard), (d,), None),
        "value and None": (lambda x: (x * 2, 3), (shard, None), (d,), None),
        "plain inputs with device_mesh": (lambda x: x * 2, shard, (torch.ones(4, 2),), m),
    }
    f, out_placements, args, device_mesh = calls[case]
    return fn(f, out_placements=out_placements, device_mesh=device_mesh)(*args)


def _case(mesh_shape):
    for case in ("None", "tuple with None", "tuple", "value and None", "plain inputs with device_mesh"):
        ours, theirs = both(_mapped, case, mesh_shape)
        assert_same(ours, theirs, what=f"local_map ({case})")
    return True


@pytest.mark.parametrize("mesh_shape", [(2,), (2, 2)])
def test_local_map_outputs_match_torch(mesh_shape):
    assert all(run_ranks(4, _case, mesh_shape))


def _miscounted():
    d = dtensor.distribute_tensor(torch.ones(4, 2), mesh((2,)), [dtensor.Shard(0)])
    errors = []
    for out_placements in (None, [dtensor.Shard(0)], ([dtensor.Shard(0)],)):
        with pytest.raises(AssertionError, match="out_placements gives 1 entries for 2 outputs"):
            local_map(lambda x: (x, x), out_placements=out_placements)(d)  # torch raises AssertionError too
        errors.append(True)
    return errors


def test_local_map_refuses_one_placement_for_several_outputs_like_torch():
    assert run_ranks(2, _miscounted) == [[True] * 3] * 2
