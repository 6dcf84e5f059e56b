"""Per-rank training state (RNG states, data loader positions) under per-rank keys, and the refusal to
save plain tensors or values that differ across ranks under one key (one copy would silently win)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dtensor
import shardstore
from shardstore.errors import StateDictMismatchError
from tests.ranks import mesh, run_ranks


def _rng(rank: int) -> torch.Tensor:
    return torch.Generator().manual_seed(1000 + rank).get_state()


def _state(rank: int, fill: float | None = None) -> dict:
    m = mesh((2,))
    full = torch.arange(12.0).reshape(6, 2) if fill is None else torch.full((6, 2), fill)
    rng = _rng(rank) if fill is None else torch.zeros_like(_rng(rank))
    return {
        "model": {"w": dtensor.distribute_tensor(full, m, [dtensor.Shard(0)], src_data_rank=None)},
        "step": 7 if fill is None else -1,
        "rng": {f"rank{rank}": rng},
        "dataloader": {f"rank{rank}": {"position": 100 * rank if fill is None else -1}},
    }


def _save_and_load(url: str):
    rank = torch.distributed.get_rank()
    shardstore.save(_state(rank), url)
    target = _state(rank, fill=0.0)
    shardstore.load(target, url)
    return (
        torch.equal(target["rng"][f"rank{rank}"], _rng(rank)),
        target["dataloader"][f"rank{rank}"],
        target["step"],
        torch.equal(target["model"]["w"].full_tensor(), torch.arange(12.0).reshape(6, 2)),
    )


def test_per_rank_keys_round_trip_each_to_its_rank(tmp_path):
    url = str(tmp_path / "ck")
    out = run_ranks(2, _save_and_load, url)
    assert out[0] == (True, {"position": 0}, 7, True)
    assert out[1] == (True, {"position": 100}, 7, True)
    # one process asking for rank 0's state only: rank 1's is unexpected (strict) or reported
    one = {"rng": {"rank0": torch.zeros_like(_rng(0))}}
    with pytest.raises(StateDictMismatchError, match="rng.rank1"):
        shardstore.load(one, url)
    result = shardstore.load(one, url, strict=False)
    assert "rng.rank1" in result.unexpected and torch.equal(one["rng"]["rank0"], _rng(0))


def _save_diverging(url: str, what: str):
    rank = torch.distributed.get_rank()
    state = {"w": torch.ones(3), "step": 1}
    if what == "tensor":
        state["rng"] = _rng(rank)
    else:
        state["step"] = rank
    try:
        shardstore.save(state, url)
    except Exception as exc:  # noqa: BLE001 - reported to the test process
        return type(exc).__name__, str(exc)
    return "no error", ""


@pytest.mark.parametrize("what, key", [("tensor", "'rng' holds different values"), ("value", "'step' differs across ranks")])
def test_values_differing_across_ranks_under_one_key_are_refused(tmp_path, what, key):
    url = str(tmp_path / "ck")
    (kind0, msg0), (kind1, msg1) = run_ranks(2, _save_diverging, url, what)
    assert kind0 == "StateDictMismatchError" and key in msg0 and ".rank{r}" in msg0, msg0
    assert kind1 == "RemoteRankError" and key in msg1
    assert not Path(url).exists() or not any(Path(url).iterdir())  # nothing was written
