"""``distribute_tensor`` of inputs that are not contiguous (transposed, channels_last, strided, expanded)
against torch's DTensor: the scattered shards were written into a tensor laid out like the input while
the collective fills raw memory in row-major order, so a transposed input came out scrambled."""

import math

import pytest
import torch

from tests.parity import assert_same, both
from tests.ranks import mesh, run_ranks

INPUTS = {
    "transposed": lambda: torch.arange(24.0).reshape(4, 6).t(),
    "channels_last": lambda: torch.arange(96.0).reshape(2, 4, 3, 4).to(memory_format=torch.channels_last),
    "strided": lambda: torch.arange(48.0).reshape(4, 12)[:, ::2],
    "expanded": lambda: torch.arange(6.0).expand(4, 6),
}
PLACEMENTS = {1: ["S0", "S1", "R", "P"], 2: ["S0 S1", "S1 S0", "R S1", "S1 S1", "S0 P"]}


def _placements(lib, text: str):
    named = {"S0": lib.Shard(0), "S1": lib.Shard(1), "R": lib.Replicate(), "P": lib.Partial()}
    return [named[p] for p in text.split()]


def _distribute(lib, kind: str, mesh_shape, text: str, src_data_rank):
    x = INPUTS[kind]()
    d = lib.distribute_tensor(x, mesh(mesh_shape), _placements(lib, text), src_data_rank=src_data_rank)
    local = d.to_local()
    # strides of dims of size 1 say nothing; with src_data_rank=None torch's shards keep the input's dim order
    strides = tuple(s for s, n in zip(local.stride(), local.shape) if n > 1) if src_data_rank is not None else ()
    return d, local, strides, d * 2, d.sum(0), d.transpose(0, 1)


def _case(mesh_shape):
    for kind in INPUTS:
        for text in PLACEMENTS[len(mesh_shape)]:
            for src in (0, None):
                ours, theirs = both(_distribute, kind, mesh_shape, text, src)
                assert_same(ours, theirs, what=f"distribute_tensor({kind}, [{text}], src_data_rank={src})")
                assert torch.equal(ours[0].full_tensor(), INPUTS[kind]()), f"{kind} [{text}] src {src}: values scrambled"
    return True


@pytest.mark.parametrize("mesh_shape", [(2,), (4,), (2, 2)])
def test_distribute_tensor_of_non_contiguous_inputs_matches_torch(mesh_shape):
    assert all(run_ranks(math.prod(mesh_shape), _case, mesh_shape))
