"""The ranks on one host share its staging memory: a save's encode slab and a load's landing scratch are
each a rank's share of a host budget, since a process's first save or load faults all of its memory
in (the kernel clearing every page), and ranks outnumbering the cores wait on each other to do so.
Checked on real process groups (all ranks on this host), with the budgets made small."""

from __future__ import annotations

import pytest
import torch

import dtensor
import shardstore
from tests.ranks import mesh, run_ranks

HOST_BUDGET = 16 << 20


def _sharded(values: torch.Tensor) -> dtensor.DTensor:
    m = mesh((torch.distributed.get_world_size(),))
    return dtensor.distribute_tensor(values, m, [dtensor.Shard(0)], src_data_rank=None)


def _values() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {f"w{i}": torch.randn(4096, 512, generator=g) for i in range(6)}  # 8 MiB each, column bands


def _save_then_load(url: str, rank_max: int = HOST_BUDGET) -> tuple[bool, int, int]:
    """Save, then load, 48 MiB Shard(0) over every rank, each host budget set to ``HOST_BUDGET`` (a rank's
    landing scratch to at most ``rank_max``): whether every value arrived, the encode slab the save kept
    and the scratch the load used."""
    from shardstore import api, buffers, cell_writer

    values = _values()
    saved = cell_writer._SLAB_BYTES, api.LANDING_SCRATCH_BYTES, api.LANDING_SCRATCH_MIN, api.LANDING_SCRATCH_MAX, buffers._kept
    cell_writer._SLAB_BYTES, api.LANDING_SCRATCH_BYTES, api.LANDING_SCRATCH_MIN = HOST_BUDGET, HOST_BUDGET, 1 << 20
    api.LANDING_SCRATCH_MAX = rank_max
    buffers._kept = (0, None)  # nothing kept from an earlier test
    try:
        shardstore.save({k: _sharded(v) for k, v in values.items()}, url)
        slab = buffers.take_kept(1)
        sd = {k: _sharded(torch.zeros_like(v)) for k, v in values.items()}
        result = shardstore.load(sd, url)
    finally:
        cell_writer._SLAB_BYTES, api.LANDING_SCRATCH_BYTES, api.LANDING_SCRATCH_MIN, api.LANDING_SCRATCH_MAX, buffers._kept = saved
    arrived = all(torch.equal(sd[k].full_tensor(), v) for k, v in values.items())
    return arrived, 0 if slab is None else slab.numel(), result.staged_bytes


@pytest.mark.parametrize("world", [2, 4])
def test_the_ranks_on_a_host_share_its_encode_slab_and_landing_scratch(tmp_path, world):
    """A rank whose objects or chunks need more than its share waits for room (fewer writes in flight,
    more read batches), and every value still arrives."""
    out = run_ranks(world, _save_then_load, str(tmp_path / "ck"))
    share = HOST_BUDGET // world
    assert all(arrived for arrived, _, _ in out), out
    assert all(share // 2 < slab <= share for _, slab, _ in out), (share, out)
    assert all(share // 2 < staged <= share for _, _, staged in out), (share, out)


def test_a_ranks_landing_scratch_is_capped_where_its_host_share_is_bigger(tmp_path):
    """Fewer ranks than the host budget is meant for: each takes at most ``LANDING_SCRATCH_MAX``."""
    cap = HOST_BUDGET // 4
    out = run_ranks(2, _save_then_load, str(tmp_path / "ck"), cap)
    assert all(arrived for arrived, _, _ in out), out
    assert all(cap // 2 < staged <= cap for _, _, staged in out), (cap, out)
