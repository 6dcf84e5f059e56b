"""Properties of the chunk grid, the save plan and the load plan over random meshes and placements.

Boxes come from ``dtensor.placements.local_box`` (torch.chunk semantics, nested shardings, empty
shards); every rank is simulated in this process through ``tests.planning.FakeDTensor``.
"""

import random

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dtensor.placements import Box, Replicate, Shard, local_box, mesh_coordinates
from shardstore.grid import cell_box, cells_in_box, cells_overlapping, choose_chunk_shape, grid_shape
from shardstore.load_plan import StoredArray, load_targets, plan_load
from shardstore.plan import local_save_plan, merge_save_plans
from tests.planning import per_rank, read_counts, slices, write_counts

MESHES = [(1,), (2,), (4,), (2, 2), (2, 3), (2, 2, 2)]


@st.composite
def layouts(draw, shape=None):
    """(shape, mesh shape, placements): any mix of Replicate and Shard, several mesh dims may cut one dim."""
    if shape is None:
        shape = tuple(draw(st.lists(st.integers(0, 13), min_size=0, max_size=3)))
    mesh = draw(st.sampled_from(MESHES))
    choices = [Replicate()] + [Shard(d) for d in range(len(shape))]
    placements = tuple(draw(st.sampled_from(choices)) for _ in mesh)
    return shape, mesh, placements


def holder_boxes(shape, mesh, placements):
    return [local_box(shape, mesh, placements, c) for c in mesh_coordinates(mesh)]


def divisor_picker(seed):
    """An inner_chunks callable that picks a random divisor of each chunk dim."""
    rng = random.Random(seed)
    return lambda chunks, itemsize: tuple(rng.choice([d for d in range(1, c + 1) if c % d == 0]) for c in chunks)


@settings(max_examples=150, deadline=None)
@given(layouts(), st.sampled_from([None, 8, 64, 10**6]))
def test_grid_cells_tile_the_array_and_lie_in_a_holder(layout, max_cell_bytes):
    shape, mesh, placements = layout
    boxes = holder_boxes(shape, mesh, placements)
    chunks = choose_chunk_shape(shape, boxes, itemsize=4, max_cell_bytes=max_cell_bytes)
    counts = np.zeros(shape, dtype=np.int32)
    everything = Box((0,) * len(shape), shape)
    cells = cells_overlapping(chunks, shape, everything)
    assert len(cells) == int(np.prod(grid_shape(chunks, shape)))
    for coords in cells:
        cb = cell_box(chunks, shape, coords)
        counts[slices(cb)] += 1
        assert any(b.numel and b.intersect(cb) == cb for b in boxes), f"cell {cb} has no single holder"
    assert (counts == 1).all()
    in_boxes = {c for b in boxes for c in cells_in_box(chunks, shape, b)}
    assert in_boxes == set(cells)


@settings(max_examples=100, deadline=None)
@given(layouts(), st.integers(0, 2**16), st.sampled_from([None, 16, 10**6]))
def test_save_plan_writes_every_element_exactly_once_from_a_holder(layout, seed, max_cell_bytes):
    shape, mesh, placements = layout
    ranks = per_rank(shape, mesh, placements)
    plans = [local_save_plan(r, {("t",): t, ("plain",): torch.zeros(3, 2)}) for r, t in enumerate(ranks)]
    plan = merge_save_plans(plans, inner_chunks=divisor_picker(seed), max_cell_bytes=max_cell_bytes)
    for key, counts in write_counts(plan).items():
        assert (counts == 1).all(), key
    for rank, tasks in enumerate(plan.writes):
        held = {b for h in plans[rank].tensors for b in h.boxes}
        assert all(t.source_box in held for t in tasks)


@st.composite
def save_and_load_layouts(draw):
    shape, mesh, placements = draw(layouts())
    return (shape, mesh, placements), draw(layouts(shape=shape))


@settings(max_examples=100, deadline=None)
@given(save_and_load_layouts(), st.integers(0, 2**16))
def test_load_plan_fills_every_target_element_exactly_once(layouts_pair, seed):
    (shape, mesh, placements), (_, load_mesh, load_placements) = layouts_pair
    plans = [local_save_plan(r, {("t",): t}) for r, t in enumerate(per_rank(shape, mesh, placements))]
    save = merge_save_plans(plans, inner_chunks=divisor_picker(seed))
    stored = {a.key: StoredArray(a.key, a.shape, a.dtype, a.chunk_shape, a.inner_chunk_shape) for a in save.arrays}
    for target in per_rank(shape, load_mesh, load_placements):
        targets = load_targets({("t",): target})
        plan = plan_load(targets, stored)
        for key, counts in read_counts(plan, targets).items():
            assert (counts == 1).all(), key
        for run in plan.runs:
            cb = cell_box(stored[("t",)].chunk_shape, shape, run.cell)
            assert all(cb.intersect(t.inner_box) == t.inner_box for t in run.tasks)
