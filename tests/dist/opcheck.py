"""Checking an op on DTensors against the same op on full tensors (and torch's DTensor's placements).

Used inside test bodies that run on every rank (``tests.ranks.run_ranks``): ``check_op`` distributes the
inputs with the given placements, runs ``fn`` on our DTensors, compares every output's ``full_tensor()``
with ``fn`` on the full tensors, and, when torch's DTensor can run the same call, that our output
placements equal torch's. The inputs must be identical on every rank (seed before making them). Returns a short record of what happened for the test to assert on.
"""

from __future__ import annotations

import random
import warnings
from typing import Callable, Sequence

import torch
import torch.distributed.tensor as tdt
from torch.utils import _pytree as pytree

import dtensor
from dtensor import Partial, Replicate, Shard
from dtensor.dispatch import fallback_ops


def to_torch_placements(placements):
    out = []
    for p in placements:
        if isinstance(p, Shard):
            out.append(tdt.Shard(p.dim))
        elif isinstance(p, Partial):
            out.append(tdt.Partial(p.reduce_op))
        else:
            out.append(tdt.Replicate())
    return out


def from_torch_placements(placements):
    return tuple(Shard(p.dim) if p.is_shard() else Partial(p.reduce_op) if p.is_partial() else Replicate() for p in placements)


def distribute(full: torch.Tensor, mesh, placements, ours: bool = True):
    """A DTensor of ``full`` laid out as ``placements`` (Partial: rank r holds full * w_r, w summing to 1)."""
    base = [Replicate() if isinstance(p, Partial) else p for p in placements]
    dt = dtensor.distribute_tensor(full.clone(), mesh, base, src_data_rank=None)  # like torch, may alias its input
    if any(isinstance(p, Partial) for p in placements):
        dt = dtensor.DTensor.from_local(dt.to_local(), mesh, base, shape=full.shape, stride=full.stride())
        dt = dt.redistribute(placements=placements)  # R -> P(sum) splits the value evenly
    if ours:
        return dt
    return dt.to_torch()


def stays_more_sharded(placements, ours, theirs) -> bool:
    """Whether our output placements differ from torch's only where torch's are Replicate, or where the
    input was not sharded on that mesh dim (from a Replicate or pending input, torch's cost model may pick
    a free local chunk that ours leaves whole): ours never gather what torch keeps split."""
    return all(
        b == Replicate() or not placements[m].is_shard()
        for o, t in zip(ours, theirs) for m, (a, b) in enumerate(zip(o, t)) if a != b
    )


def check_case(label: str, mesh, fn: Callable, inputs: Sequence, placements: Sequence, **kwargs) -> dict:
    """``check_op``, with ``label`` (the op and the drawn case) on any failure."""
    try:
        return check_op(mesh, fn, inputs, placements, **kwargs)
    except Exception as e:  # noqa: BLE001 - name the case, keep the cause
        raise AssertionError(f"{label} on mesh {tuple(mesh.shape)}: placements {placements}") from e


def seeded_mesh(mesh_shape, seed: int):
    """The mesh of ``mesh_shape`` with Python's and torch's generators seeded alike on every rank (random
    cases must be the same everywhere); (None, None) on a rank outside the mesh. Every rank must call it."""
    from tests.ranks import mesh

    m = mesh(mesh_shape)
    if m.get_coordinate() is None:
        return None, None
    torch.manual_seed(seed)
    return m, random.Random(seed)


def check_op(
    mesh,
    fn: Callable,
    inputs: Sequence,
    placements: Sequence,
    *,
    atol: float = 1e-10,
    compare_with_torch: bool = True,
    allow_fallback: bool = False,
) -> dict:
    """Run ``fn`` on DTensors and on full tensors; assert equal results; report output placements."""
    before = set(fallback_ops)
    dts = [distribute(x, mesh, p) if isinstance(x, torch.Tensor) and p is not None else x for x, p in zip(inputs, placements)]
    out = fn(*dts)
    expected = fn(*[x.clone() if isinstance(x, torch.Tensor) else x for x in inputs])
    got_leaves, expected_leaves = pytree.tree_leaves(out), pytree.tree_leaves(expected)
    assert len(got_leaves) == len(expected_leaves)
    ours = []
    for g, e in zip(got_leaves, expected_leaves):
        if isinstance(e, torch.Tensor):
            assert isinstance(g, dtensor.DTensor), f"expected a DTensor output, got {type(g)}"
            full = g.full_tensor()
            assert full.shape == e.shape, (full.shape, e.shape)
            assert torch.allclose(full.double(), e.double(), atol=atol, rtol=1e-7, equal_nan=True), (full, e)
            ours.append(tuple(g.placements))
    record = {"placements": ours, "fallback": sorted(set(fallback_ops) - before), "torch": None}
    if not allow_fallback:
        assert not record["fallback"], f"fell back to replicate for {record['fallback']}"
    if compare_with_torch:
        record["torch"] = _torch_placements(mesh, fn, inputs, placements)
    return record


def _torch_placements(mesh, fn, inputs, placements):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tdts = [distribute(x, mesh, p, ours=False) if isinstance(x, torch.Tensor) and p is not None else x for x, p in zip(inputs, placements)]
            out = fn(*tdts)
    except Exception:  # noqa: BLE001 - torch has no strategy for this call: nothing to compare
        return None
    return [from_torch_placements(o.placements) for o in pytree.tree_leaves(out) if isinstance(o, tdt.DTensor)]
