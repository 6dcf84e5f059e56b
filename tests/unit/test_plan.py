"""Save and load planning with ranks simulated in one process."""

import pickle
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dtensor.placements import Box, Partial, Replicate, Shard
from shardstore.errors import StateDictMismatchError
from shardstore.load_plan import LoadRegion, StoredArray, TargetTensor, load_targets, plan_load, side_by_side
from shardstore.plan import local_save_plan, merge_save_plans
from tests.planning import FakeDTensor, per_rank, read_counts, write_counts


def save_plan(per_rank_items, **kwargs):
    return merge_save_plans([local_save_plan(r, items) for r, items in enumerate(per_rank_items)], **kwargs)


def sharded(key, shape, mesh, placements, dtype=torch.float32):
    return [{key: t} for t in per_rank(shape, mesh, placements, dtype)]


def stored_from(plan):
    return {a.key: StoredArray(a.key, a.shape, a.dtype, a.chunk_shape, a.inner_chunk_shape) for a in plan.arrays}


def assert_exactly_once(counts):
    for key, c in counts.items():
        assert (c == 1).all(), f"{key}: counts {np.unique(c)}"


# ------------------------------------------------------------------------------------------ local save


def test_plain_tensor_is_held_whole():
    held = local_save_plan(3, {("w",): torch.zeros(4, 5, dtype=torch.bfloat16)}).tensors[0]
    assert (held.shape, held.dtype, held.itemsize, held.boxes) == ((4, 5), "bfloat16", 2, (Box((0, 0), (4, 5)),))
    assert held.mesh_shape is None and held.placements is None


def test_plain_tensors_are_digested_only_where_another_rank_could_differ():
    t = torch.arange(20.0).reshape(4, 5)
    assert local_save_plan(0, {("w",): t}).tensors[0].digest is not None
    assert local_save_plan(0, {("w",): t}, world_size=2).tensors[0].digest is not None
    assert local_save_plan(0, {("w",): t}, world_size=1).tensors[0].digest is None


def test_dtensor_like_reports_box_mesh_and_placements():
    t = FakeDTensor((10, 4), (2, 2), (Shard(0), Replicate()), (1, 0), torch.float16)
    held = local_save_plan(2, {("m", "w"): t}).tensors[0]
    assert held.boxes == (Box((5, 0), (5, 4)),) and held.dtype == "float16" and held.itemsize == 2
    assert held.mesh_shape == (2, 2) and held.placements == ("S(0)", "R")


def test_empty_shard_and_outside_submesh_hold_nothing():
    empty = FakeDTensor((5,), (4,), (Shard(0),), (3,))  # torch.chunk: 2, 2, 1, 0
    outside = FakeDTensor((5,), (4,), (Shard(0),), None)
    for t in (empty, outside):
        held = local_save_plan(0, {("x",): t}).tensors[0]
        assert held.boxes == () and held.shape == (5,) and held.dtype == "float32"


def test_partial_is_refused_with_the_fix():
    t = FakeDTensor((4,), (2,), (Partial(),), (0,))
    with pytest.raises(ValueError, match=r"'opt.grad'.*P\(sum\).*redistribute.*full_tensor"):
        local_save_plan(0, {("opt", "grad"): t})


def test_non_tensor_write_items_are_refused():
    class Bytesy(FakeDTensor):
        def __create_write_items__(self, fqn, obj):
            return [SimpleNamespace(tensor_data=None)]

    with pytest.raises(TypeError, match="'b'"):
        local_save_plan(0, {("b",): Bytesy((2,), (1,), (Replicate(),), (0,))})


# ------------------------------------------------------------------------------------------ merge


def test_even_shards_are_written_by_their_owners():
    plan = save_plan(sharded(("w",), (10, 4), (2,), (Shard(0),)))
    (array,) = plan.arrays
    assert array.chunk_shape == (5, 4) and array.node == "w" and array.placements == ("S(0)",)
    assert [[(t.cell, t.cell_box) for t in ts] for ts in plan.writes] == [
        [((0, 0), Box((0, 0), (5, 4)))], [((1, 0), Box((5, 0), (5, 4)))]]


def test_nested_uneven_sharding_writes_every_row_once_from_its_owner():
    plan = save_plan(sharded(("w",), (10, 3), (2, 2), (Shard(0), Shard(0))))
    assert plan.arrays[0].chunk_shape == (1, 3)
    rows = [[t.cell[0] for t in ts] for ts in plan.writes]
    assert rows == [[0, 1, 2], [3, 4], [5, 6, 7], [8, 9]]
    assert_exactly_once(write_counts(plan))


def test_replicas_are_deduplicated_and_spread():
    plan = save_plan(sharded(("w",), (8, 6), (2, 3), (Replicate(), Shard(1))))
    assert_exactly_once(write_counts(plan))
    assert sorted(len(ts) for ts in plan.writes) == [0, 0, 0, 1, 1, 1]


def test_fully_replicated_state_dict_is_balanced():
    rng = random.Random(0)
    sd = {("p", str(i)): torch.zeros(rng.choice([1, 7, 64, 300, 1000]), rng.choice([1, 16, 128])) for i in range(60)}
    plan = save_plan([sd] * 4)
    assert_exactly_once(write_counts(plan))
    loads = plan.bytes_per_rank()
    total = sum(t.numel() * 4 for t in sd.values())
    assert sum(loads) == total and max(loads) <= 1.25 * total / 4


def test_big_replicated_tensor_is_split_across_ranks():
    plan = save_plan([{("emb",): torch.zeros(4096, 1024)}] * 4, max_cell_bytes=4 * 2**20)
    rows, cols = plan.arrays[0].chunk_shape
    assert cols == 1024 and rows * cols * 4 <= 4 * 2**20 and plan.bytes_per_rank() == [4 * 2**20] * 4


def test_one_dominant_replicated_tensor_is_still_balanced():
    sd = {("emb",): torch.zeros(1000, 64), ("bias",): torch.zeros(64), ("small",): torch.zeros(300, 10)}
    loads = save_plan([sd] * 4).bytes_per_rank()
    assert max(loads) <= 1.25 * sum(loads) / 4, loads


def test_ranks_disagreeing_on_shape_are_named():
    items = [{("w",): torch.zeros(4)}, {("w",): torch.zeros(5)}]
    with pytest.raises(StateDictMismatchError, match=r"'w'.*rank 0 has shape \(4,\).*rank 1 has shape \(5,\)"):
        save_plan(items)


def test_a_dtensor_missing_on_a_rank_is_named():
    w = lambda c: FakeDTensor((6,), (3,), (Shard(0),), c)  # noqa: E731
    with pytest.raises(StateDictMismatchError, match=r"DTensor 'b'.*ranks \[1\]"):
        save_plan([{("a",): torch.zeros(1), ("b",): w((0,))}, {("a",): torch.zeros(1)}])


def test_plain_tensors_may_be_per_rank_and_are_written_by_their_holder():
    plan = save_plan([{("a",): torch.zeros(1), ("r0",): torch.ones(3)}, {("a",): torch.zeros(1), ("r1",): torch.ones(2)}])
    written = [{t.key for t in tasks} for tasks in plan.writes]
    assert ("r0",) in written[0] and ("r1",) in written[1]


def test_big_replicas_that_drifted_apart_are_refused_by_their_samples():
    same = torch.arange(100_000, dtype=torch.float32)
    save_plan([{("w",): same}, {("w",): same.clone()}])  # equal replicas: fine
    with pytest.raises(StateDictMismatchError, match=r"'w' holds different values"):
        save_plan([{("w",): same}, {("w",): same + 1e-3}])


@pytest.mark.parametrize(
    "a, b",
    [
        (torch.arange(40_000.0).reshape(200, 200), torch.arange(40_000.0).reshape(200, 200).t().contiguous().t()),
        (torch.arange(96_000.0).reshape(10, 3, 40, 80),
         torch.arange(96_000.0).reshape(10, 3, 40, 80).to(memory_format=torch.channels_last)),
        (torch.tensor([0.0, float("nan")]), torch.tensor([-0.0, 0.0]) / torch.tensor([1.0, 0.0])),  # -0.0, 0/0 NaN
        (torch.tensor([1 + 2j, 3j]), torch.tensor([1 - 2j, -3j]).conj()),  # a lazy conjugate view
    ],
)
def test_equal_values_in_any_memory_layout_are_equal(a, b):
    save_plan([{("w",): a}, {("w",): b}])


def test_ranks_holding_different_values_of_a_plain_tensor_are_refused():
    items = [{("rng",): torch.tensor([1, 2, 3])}, {("rng",): torch.tensor([1, 2, 3])}, {("rng",): torch.tensor([9, 2, 3])}]
    with pytest.raises(StateDictMismatchError, match=r"'rng' holds different values.*ranks \[0, 1\] vs ranks \[2\].*rng.rank\{r\}"):
        save_plan(items)


def test_shards_that_do_not_cover_the_tensor_are_refused():
    items = [{("w",): FakeDTensor((6,), (3,), (Shard(0),), c)} for c in [(0,), (1,), None]]
    with pytest.raises(StateDictMismatchError, match=r"'w'.*Box\(offsets=\(4,\), sizes=\(2,\)\) is held by no rank"):
        save_plan(items)


def test_inner_chunks_come_from_the_callable_and_must_divide():
    items = sharded(("w",), (8, 8), (2,), (Shard(0),))
    plan = save_plan(items, inner_chunks=lambda chunks, itemsize: (2, 4))
    assert plan.arrays[0].inner_chunk_shape == (2, 4)
    with pytest.raises(ValueError, match=r"\(3, 4\).*'w'.*\(4, 8\)"):
        save_plan(items, inner_chunks=lambda chunks, itemsize: (3, 4))


def test_zero_d_and_empty_tensors():
    plan = save_plan([{("s",): torch.tensor(1.0), ("e",): torch.zeros(0, 3)}] * 2)
    assert {a.key: a.chunk_shape for a in plan.arrays} == {("s",): (), ("e",): (1, 3)}
    assert [t.cell for ts in plan.writes for t in ts] == [()]


def test_merge_needs_plans_in_rank_order():
    with pytest.raises(ValueError, match="rank order"):
        merge_save_plans([local_save_plan(1, {})])


def test_global_plan_pickles_small():
    plan = save_plan(sharded(("w",), (1024, 1024), (8,), (Shard(0),)))
    assert pickle.loads(pickle.dumps(plan)) == plan and len(pickle.dumps(plan)) < 4000


# ------------------------------------------------------------------------------------------ load


def stored_w(shape=(4, 4), dtype="float32"):
    return {("w",): StoredArray(("w",), shape, dtype, (2, 4), (1, 2))}


def target_w(shape=(4, 4), dtype="float32"):
    return {("w",): TargetTensor(("w",), shape, dtype, (LoadRegion(Box((0, 0), shape), 0),))}


def test_mismatches_are_all_named_before_reading():
    stored = {**stored_w(), ("gone",): StoredArray(("gone",), (1,), "float32", (1,), (1,))}
    targets = {**target_w((4, 5), "bfloat16"), ("new",): TargetTensor(("new",), (1,), "float32", ())}
    with pytest.raises(StateDictMismatchError) as err:
        plan_load(targets, stored)
    message = str(err.value)
    for part in ("missing from the checkpoint: new", "not in the state dict: gone", "w: shape (4, 5) in the state dict, (4, 4)",
                 "w: dtype bfloat16 in the state dict, float32", "strict=False"):
        assert part in message


def test_non_strict_lists_missing_and_unexpected_but_still_checks_shapes():
    stored = {**stored_w(), ("gone",): StoredArray(("gone",), (1,), "float32", (1,), (1,))}
    targets = {**target_w(), ("new",): TargetTensor(("new",), (1,), "float32", ())}
    plan = plan_load(targets, stored, strict=False)
    assert plan.missing == (("new",),) and plan.unexpected == (("gone",),)
    assert_exactly_once(read_counts(plan, target_w()))
    with pytest.raises(StateDictMismatchError, match="shape"):
        plan_load(target_w((4, 5)), stored, strict=False)


def test_stored_shapes_from_json_lists_compare_equal():
    stored = {("w",): StoredArray(("w",), [4, 4], "float32", [2, 4], [1, 2])}
    assert plan_load(target_w(), stored).runs


def test_whole_load_reads_each_object_in_one_run():
    plan = plan_load(target_w(), stored_w())
    assert [(r.cell, r.start, r.stop, len(r.tasks)) for r in plan.runs] == [((0, 0), 0, 4, 4), ((1, 0), 0, 4, 4)]


def test_a_column_slice_reads_only_its_inner_chunks():
    targets = {("w",): TargetTensor(("w",), (4, 4), "float32", (LoadRegion(Box((0, 2), (4, 1)), 5),))}
    plan = plan_load(targets, stored_w())
    assert [(r.cell, r.start, r.stop) for r in plan.runs] == [((0, 0), 1, 2), ((0, 0), 3, 4), ((1, 0), 1, 2), ((1, 0), 3, 4)]
    task = plan.runs[1].tasks[0]
    assert (task.inner, task.inner_box, task.overlap, task.dest) == ((1, 1), Box((1, 2), (1, 2)), Box((1, 2), (1, 1)), 5)
    assert_exactly_once(read_counts(plan, targets))


def chunk_tasks(run):
    return [[t for t in run.tasks if t.inner_index == i] for i in range(run.start, run.stop)]


def test_the_column_bands_of_a_row_block_are_grouped_side_by_side():
    plan = plan_load(target_w(), stored_w())  # inner chunks (1, 2): each row block is two column bands
    assert [side_by_side(chunk_tasks(run), (1, 2)) for run in plan.runs] == [[2, 2], [2, 2]]
    a, b, c, d = chunk_tasks(plan.runs[0])
    assert side_by_side([a, None, c, d], (1, 2)) == [1, 1, 2]  # one landed in place
    assert side_by_side([b, a], (1, 2)) == [1, 1]  # out of order
    assert side_by_side([a, d], (1, 2)) == [1, 1]  # another row
    assert side_by_side([a, b], (2, 2)) == [1, 1]  # clipped: smaller than an inner chunk


@pytest.mark.parametrize("regions", [
    ((Box((0, 0), (4, 2)), 0), (Box((0, 2), (4, 2)), 1)),  # each band into a tensor of its own
    ((Box((0, 0), (4, 3)), 0), (Box((0, 3), (4, 1)), 1)),  # the second band split between two
    ((Box((0, 1), (4, 2)), 0),),  # a column slice: part of each band
])
def test_bands_not_filling_one_region_side_by_side_are_copied_one_by_one(regions):
    targets = {("w",): TargetTensor(("w",), (4, 4), "float32", tuple(LoadRegion(box, dest) for box, dest in regions))}
    for run in plan_load(targets, stored_w()).runs:
        assert side_by_side(chunk_tasks(run), (1, 2)) == [1] * (run.stop - run.start)


def test_reshard_row_sharded_save_onto_column_sharded_load():
    save = save_plan(sharded(("w",), (10, 6), (2,), (Shard(0),)), inner_chunks=lambda c, i: (1, c[1]))
    for rank_t in per_rank((10, 6), (4,), (Shard(1),)):
        targets = load_targets({("w",): rank_t})
        plan = plan_load(targets, stored_from(save))
        assert_exactly_once(read_counts(plan, targets))


def test_load_targets_from_plain_and_dtensor_like_values():
    targets = load_targets({("a",): torch.zeros(2, 3, dtype=torch.int64), ("b",): FakeDTensor((5,), (4,), (Shard(0),), (2,))})
    assert targets[("a",)] == TargetTensor(("a",), (2, 3), "int64", (LoadRegion(Box((0, 0), (2, 3)), 0),))
    assert targets[("b",)].regions == (LoadRegion(Box((4,), (1,)), 0),)
    with pytest.raises(ValueError, match="Partial"):
        load_targets({("p",): FakeDTensor((4,), (2,), (Partial(),), (0,))})


def test_zero_d_and_empty_loads():
    stored = {("s",): StoredArray(("s",), (), "float32", (), ()), ("e",): StoredArray(("e",), (0, 3), "float32", (1, 3), (1, 3))}
    targets = load_targets({("s",): torch.tensor(0.0), ("e",): torch.zeros(0, 3)})
    plan = plan_load(targets, stored)
    assert [(r.key, r.cell, r.start, r.stop) for r in plan.runs] == [(("s",), (), 0, 1)]


# ------------------------------------------------------------------------------------------ torch's DTensor


@pytest.fixture
def fake_world():
    """Simulate each rank of torch's DTensor in turn on torch's fake process group (no processes)."""
    dist = pytest.importorskip("torch.distributed")
    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")

    def as_rank(rank, world, fn):
        dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=rank, world_size=world)
        try:
            return fn()
        finally:
            dist.destroy_process_group()

    return as_rank


def test_torch_dtensor_hooks_agree_with_the_planner(fake_world):
    from torch.distributed.tensor import DTensor, init_device_mesh
    from torch.distributed.tensor import Shard as TShard

    def local_plan(rank):
        mesh = init_device_mesh("cpu", (2, 2))
        t = DTensor.from_local(torch.zeros(3, 4), mesh, [TShard(0), TShard(0)], run_check=False,
                               shape=torch.Size((10, 4)), stride=(4, 1))
        return local_save_plan(rank, {("w",): t})

    plan = merge_save_plans([fake_world(r, 4, lambda r=r: local_plan(r)) for r in range(4)])
    assert [[t.cell_box for t in ts] for ts in plan.writes] == [
        [Box((i, 0), (1, 4)) for i in rows] for rows in ([0, 1, 2], [3, 4], [5, 6, 7], [8, 9])]
    assert plan.arrays[0].placements == ("S(0)", "S(0)") and plan.arrays[0].mesh_shape == (2, 2)
