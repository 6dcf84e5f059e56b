"""Every rank writes its share of the arrays' ``zarr.json`` beside its chunks: together, each exactly once."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from shardstore import format as fmt
from shardstore import saving
from shardstore.flatten import flatten
from shardstore.plan import local_save_plan, merge_save_plans
from shardstore.storage import Storage
from shardstore.tiling import choose_inner_chunk_shape


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_the_ranks_shares_write_every_array_and_group_once(tmp_path, monkeypatch, world):
    items, _ = flatten({"model": {f"layer{i}": {"w": torch.zeros(4, 3), "b": torch.zeros(3)} for i in range(5)}, "x": torch.ones(2)})
    plan = merge_save_plans([local_save_plan(0, items, 1)], inner_chunks=choose_inner_chunk_shape)
    arrays, groups = Counter(), Counter()
    monkeypatch.setattr(fmt, "write_array", lambda storage, node, layout: arrays.update([node]))
    monkeypatch.setattr(fmt, "write_group", lambda storage, path: groups.update([path]))
    for rank in range(world):
        before = sum(groups.values())
        saving.write_array_metadata(Storage(str(tmp_path)), plan, None, (rank, world))
        assert rank == 0 or sum(groups.values()) == before  # groups are rank 0's
    assert arrays == Counter(a.node for a in plan.arrays) and set(arrays.values()) == {1}
    assert set(groups) == {"model"} | {f"model/layer{i}" for i in range(5)} and set(groups.values()) == {1}
