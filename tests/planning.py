"""Planning-test helpers: a DTensor stand-in with DCP's hooks, and exactly-once coverage counters.

It holds no data; it answers what one simulated rank holds, as torch's DTensor does through
``__create_write_items__`` / ``__create_chunk_list__``, so ranks can be simulated in one process.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from dtensor.placements import Box, local_box, mesh_coordinates


class FakeDTensor:
    def __init__(self, shape, mesh_shape, placements, coordinate, dtype=torch.float32):
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.placements = tuple(placements)
        self.device_mesh = SimpleNamespace(shape=tuple(mesh_shape))
        self.box = local_box(shape, mesh_shape, placements, coordinate) if coordinate is not None else None

    def __create_write_items__(self, fqn, obj):
        if self.box is None:  # outside the sub-mesh
            return []
        chunk = SimpleNamespace(offsets=torch.Size(self.box.offsets), sizes=torch.Size(self.box.sizes))
        data = SimpleNamespace(chunk=chunk, properties=SimpleNamespace(dtype=self.dtype), size=self.shape)
        return [SimpleNamespace(tensor_data=data)]

    def __create_chunk_list__(self):
        if self.box is None:
            return []
        return [SimpleNamespace(offsets=torch.Size(self.box.offsets), sizes=torch.Size(self.box.sizes))]

    def __get_tensor_shard__(self, index):
        raise NotImplementedError("planning tests never touch data")


def per_rank(shape, mesh_shape, placements, dtype=torch.float32):
    """One FakeDTensor per rank of the mesh, in rank (row-major coordinate) order."""
    return [FakeDTensor(shape, mesh_shape, placements, c, dtype) for c in mesh_coordinates(mesh_shape)]


def slices(box: Box) -> tuple[slice, ...]:
    """The global slices of a box."""
    return tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))


def write_counts(plan) -> dict:
    """How many times the save plan writes each element of each array (all ones when correct)."""
    counts = {a.key: np.zeros(a.shape, dtype=np.int32) for a in plan.arrays}
    for rank_tasks in plan.writes:
        for task in rank_tasks:
            assert task.source_box.intersect(task.cell_box) == task.cell_box, "a cell outside its source box"
            counts[task.key][slices(task.cell_box)] += 1
    return counts


def read_counts(load_plan, targets) -> dict:
    """How many times the load plan fills each element of each target region (all ones when correct)."""
    counts = {(key, r.dest): np.zeros(r.box.sizes, dtype=np.int32) for key, t in targets.items() for r in t.regions}
    for run in load_plan.runs:
        assert run.stop - run.start >= 1 and {t.inner_index for t in run.tasks} == set(range(run.start, run.stop))
        for task in run.tasks:
            assert task.inner_box.intersect(task.overlap) == task.overlap, "an overlap outside its inner chunk"
            counts[(task.key, task.dest)][task.overlap.relative_to(task.dest_box)] += 1
    return counts
