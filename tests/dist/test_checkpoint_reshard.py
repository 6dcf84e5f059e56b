"""The reshard matrix: a checkpoint saved on one mesh loads onto every other, bit for bit.

Sources and targets mix our DTensor and torch's, over meshes (1,), (2,), (4,), (2,2), (2,3) with random
placement lists (several mesh dims on one tensor dim, uneven sizes) and dtypes fp32, bf16, fp16, int64,
bool and float8; every target is also loaded by one process with no process group.
"""

import math
import random

import pytest
import torch
import torch.distributed.tensor as tdt

import dtensor
import shardstore
from dtensor import Replicate, Shard
from tests.ranks import mesh, run_ranks

MESHES = [(1,), (2,), (4,), (2, 2), (2, 3)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool, torch.float8_e4m3fn]
SHAPES = [(13, 6), (8,), (5, 7, 3), (2, 9), (1, 4), (16, 16)]


def expected_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (shape, dtype) in enumerate(zip(SHAPES, DTYPES)):
        values = torch.randn(shape, generator=g, dtype=torch.float32) * 10
        out[f"t{i}"] = values > 0 if dtype == torch.bool else values.to(dtype)
    return out


def layouts(mesh_shape, seed: int) -> dict[str, tuple]:
    rng = random.Random(hash((mesh_shape, seed)) & 0xFFFF)
    out = {}
    for i, shape in enumerate(SHAPES):
        choices = [Shard(d) for d in range(len(shape))] + [Replicate()]
        out[f"t{i}"] = (tuple(rng.choice(choices) for _ in mesh_shape), rng.random() < 0.5)
    return out


def _to_torch(placements):
    return [tdt.Shard(p.dim) if isinstance(p, Shard) else tdt.Replicate() for p in placements]


def build_state(mesh_shape, layout_seed: int, values: dict[str, torch.Tensor]):
    m = mesh(mesh_shape)
    model = {}
    for name, (placements, use_torch) in layouts(mesh_shape, layout_seed).items():
        full = values[name]
        if use_torch:
            model[name] = tdt.distribute_tensor(full, m, _to_torch(placements), src_data_rank=None)
        else:
            model[name] = dtensor.distribute_tensor(full, m, placements, src_data_rank=None)
    return {"model": model, "step": 0, "extra": {"name": "run"}}


def _save(mesh_shape, url, seed):
    state = build_state(mesh_shape, seed, expected_tensors(seed))
    state["step"] = seed
    return shardstore.save(state, url).bytes_written


def check_local(name, value, expected):
    chunks = value.__create_chunk_list__() if hasattr(type(value), "__create_chunk_list__") else None
    local = value.to_local() if chunks is not None else value
    if chunks:
        box = chunks[0]
        expected = expected[tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))]
    assert local.dtype == expected.dtype, name
    assert torch.equal(local.view(torch.uint8), expected.contiguous().view(torch.uint8)), f"{name} differs"


def _load(mesh_shape, url, seed, layout_seed, staging_bytes=None):
    zeros = {k: torch.zeros_like(v) for k, v in expected_tensors(seed).items()}
    state = build_state(mesh_shape, layout_seed, zeros)
    result = shardstore.load(state, url, **({} if staging_bytes is None else {"staging_bytes": staging_bytes}))
    assert staging_bytes is None or result.streamed or result.bytes_read <= staging_bytes
    for name, expected in expected_tensors(seed).items():
        check_local(name, state["model"][name], expected)
    assert state["step"] == seed and state["extra"] == {"name": "run"}
    return True


@pytest.mark.parametrize("source", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_saved_on_one_mesh_loads_on_every_other(source, tmp_path):
    seed = 11 + MESHES.index(source)
    url = str(tmp_path / "ckpt")
    written = run_ranks(math.prod(source), _save, source, url, seed)
    assert sum(written) > 0
    for j, target in enumerate(MESHES):  # every other target streams through 2 KiB of staging memory
        staging = 2048 if j % 2 else None
        assert all(run_ranks(math.prod(target), _load, target, url, seed, 100 + j, staging)), target
    # and into one process with no process group, plain tensors as targets
    state = {"model": {k: torch.zeros_like(v) for k, v in expected_tensors(seed).items()}, "step": 0, "extra": {}}
    shardstore.load(state, url)
    for name, expected in expected_tensors(seed).items():
        check_local(name, state["model"][name], expected)
    assert state["step"] == seed
