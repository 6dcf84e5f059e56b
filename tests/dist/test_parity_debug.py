"""``dtensor.debug.visualize_sharding`` against torch's: the same table, printed on the same rank.

torch draws it with ``tabulate`` (and raises without it); the expected tables below are what torch
2.13 printed with ``tabulate`` installed, and where ``tabulate`` is importable the test also compares
with torch's live output."""

import contextlib
import importlib.util
import io

import pytest
import torch
import torch.distributed.tensor as tdt
from torch.distributed.tensor.debug import visualize_sharding as torch_visualize_sharding

import dtensor
from dtensor.debug import visualize_sharding
from tests.ranks import mesh, run_ranks

CASES = [  # (shape, mesh shape, placements, torch's table)
    ((8,), (4,), "S0", "         Col 0-0\n-------  ---------\nRow 0-1  cpu:0\nRow 2-3  cpu:1\nRow 4-5  cpu:2\nRow 6-7  cpu:3\n"),
    ((8,), (4,), "R", "         Col 0-0\n-------  -----------\nRow 0-7  cpu:0,1,2,3\n"),
    ((3,), (4,), "S0", "         Col 0-0\n-------  ---------\nRow 0-0  cpu:0\nRow 1-1  cpu:1\nRow 2-2  cpu:2\nRow 3-2  cpu:3\n"),
    ((7,), (2, 2), "S0 S0", "         Col 0-0\n-------  ---------\nRow 0-1  cpu:0\nRow 2-3  cpu:1\nRow 4-5  cpu:2\nRow 6-6  cpu:3\n"),
    ((10, 6), (2, 2), "S0 S1",
     "         Col 0-2    Col 3-5\n-------  ---------  ---------\nRow 0-4  cpu:0      cpu:1\nRow 5-9  cpu:2      cpu:3\n"),
    ((10, 6), (2, 2), "S1 S0",
     "         Col 0-2    Col 3-5\n-------  ---------  ---------\nRow 0-4  cpu:0      cpu:2\nRow 5-9  cpu:1      cpu:3\n"),
    ((10, 6), (2, 2), "R S0", "         Col 0-5\n-------  ---------\nRow 0-4  cpu:0,2\nRow 5-9  cpu:1,3\n"),
    ((10, 6), (2, 2), "S0 S0",
     "         Col 0-5\n-------  ---------\nRow 0-2  cpu:0\nRow 3-4  cpu:1\nRow 5-7  cpu:2\nRow 8-9  cpu:3\n"),
    ((5, 3), (4,), "S0", "         Col 0-2\n-------  ---------\nRow 0-1  cpu:0\nRow 2-3  cpu:1\nRow 4-4  cpu:2\nRow 5-4  cpu:3\n"),
    ((5, 3), (2, 2), "P S1", "         Col 0-1    Col 2-2\n-------  ---------  ---------\nRow 0-4  cpu:0,2    cpu:1,3\n"),
    ((4, 4), (4,), "R", "         Col 0-3\n-------  -----------\nRow 0-3  cpu:0,1,2,3\n"),
]


def _printed(lib, shape, mesh_shape, text: str) -> str:
    named = {"S0": lib.Shard(0), "S1": lib.Shard(1), "R": lib.Replicate(), "P": lib.Partial()}
    d = lib.distribute_tensor(torch.zeros(shape), mesh(mesh_shape), [named[p] for p in text.split()])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        (visualize_sharding if lib is dtensor else torch_visualize_sharding)(d, header="ignored")
    return out.getvalue()


def _case():
    first = torch.distributed.get_rank() == 0
    for shape, mesh_shape, text, table in CASES:
        ours = _printed(dtensor, shape, mesh_shape, text)
        assert ours == (table if first else ""), f"{shape} on {mesh_shape} [{text}]:\n{ours}\nexpected\n{table}"
        if importlib.util.find_spec("tabulate"):
            assert ours == _printed(tdt, shape, mesh_shape, text)
    return True


def test_visualize_sharding_prints_torchs_table():
    assert all(run_ranks(4, _case))


def _refusals():
    d3 = dtensor.distribute_tensor(torch.zeros(2, 2, 2), mesh((2,)), [dtensor.Shard(0)])
    with pytest.raises(RuntimeError, match="supports only 1D or 2D DTensor"):
        visualize_sharding(d3)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        visualize_sharding(dtensor.distribute_tensor(torch.zeros(0, 3), mesh((2,)), [dtensor.Shard(1)]))
    return out.getvalue()


def test_visualize_sharding_refuses_3d_and_prints_nothing_for_empty_tensors():
    assert run_ranks(2, _refusals) == ["", ""]
