"""Per-rank training state (RNG states, data loader positions) under per-rank keys, and the refusal to
save plain tensors or values that differ across ranks under one key (one copy would silently win)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dtensor
import shardstore
from shardstore.coordinator import RemoteRankError
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
        target["dataloader"],
        target["step"],
        torch.equal(target["model"]["w"].full_tensor(), torch.arange(12.0).reshape(6, 2)),
    )


def test_per_rank_keys_round_trip_each_to_its_rank(tmp_path):
    url = str(tmp_path / "ck")
    out = run_ranks(2, _save_and_load, url)
    assert out[0] == (True, {"rank0": {"position": 0}}, 7, True)  # never the other rank's entries
    assert out[1] == (True, {"rank1": {"position": 100}}, 7, True)
    # one process asking for rank 0's state only: rank 1's is unexpected (strict) or reported
    one = {"rng": {"rank0": torch.zeros_like(_rng(0))}}
    with pytest.raises(StateDictMismatchError, match="rng.rank1"):
        shardstore.load(one, url)
    result = shardstore.load(one, url, strict=False)
    assert "rng.rank1" in result.unexpected and torch.equal(one["rng"]["rank0"], _rng(0))


def _plain(rank: int, position: int) -> dict:
    return {"w": torch.ones(4), "loader": {f"pos.rank{rank}": position}, f"seed.rank{rank}": position}


def _save_plain(url: str) -> None:
    rank = torch.distributed.get_rank()
    shardstore.save(_plain(rank, 10 + rank), url)


def _resume(url: str, strict: bool, again: str):
    """Load per-rank plain values saved on 2 ranks; with ``again``, advance this rank's position and save."""
    rank = torch.distributed.get_rank()
    target = _plain(rank, -1)
    try:
        result = shardstore.load(target, url, strict=strict)
    except (StateDictMismatchError, RemoteRankError) as exc:  # on rank 2 / on the ranks it failed with
        return "refused", str(exc)
    target["loader"][f"pos.rank{rank}"] += 1
    if again:
        shardstore.save(target, again)
    return target["loader"], target[f"seed.rank{rank}"], result.missing


def test_per_rank_plain_values_load_each_to_its_rank_on_any_number_of_ranks(tmp_path):
    """Each rank gets its own entries back, never the others' (a loader dict holding every rank's keys
    made the next save refuse them as differing across ranks); a rank the checkpoint has no entries
    for is refused under strict, and told which keys kept their values otherwise."""
    url = str(tmp_path / "ck")
    run_ranks(2, _save_plain, url)
    out = run_ranks(2, _resume, url, True, str(tmp_path / "again"))
    assert out == [({"pos.rank0": 11}, 10, ()), ({"pos.rank1": 12}, 11, ())]
    assert run_ranks(2, _resume, str(tmp_path / "again"), True, "")[1][:2] == ({"pos.rank1": 13}, 11)
    refused = run_ranks(3, _resume, url, True, "")
    assert all(r[0] == "refused" and "missing from the checkpoint: loader.pos.rank2, seed.rank2" in r[1] for r in refused)
    assert run_ranks(3, _resume, url, False, "")[2] == ({"pos.rank2": 0}, -1, ("loader.pos.rank2", "seed.rank2"))
    # on one rank, rank 1's entries are held by no rank: unexpected, as a tensor would be
    kind, message = run_ranks(1, _resume, url, True, "")[0]
    assert kind == "refused" and "in the checkpoint but not in the state dict: loader.pos.rank1, seed.rank1" in message


def test_plain_values_only_the_checkpoint_has_are_refused_before_any_tensor_changes(tmp_path):
    """A saved setting the state dict dropped would silently not load: refused with strict (the tensors
    untouched), loaded around and reported with strict=False."""
    url = str(tmp_path / "ck")
    shardstore.save({"w": torch.ones(3), "step": 3, "cfg": {"lr": 0.1, "warmup": 10}}, url)
    target = {"w": torch.zeros(3), "step": 0, "cfg": {"lr": 0.5}}
    with pytest.raises(StateDictMismatchError, match="in the checkpoint but not in the state dict: cfg.warmup"):
        shardstore.load(target, url)
    assert torch.equal(target["w"], torch.zeros(3)) and target["step"] == 0
    result = shardstore.load(target, url, strict=False)
    assert result.unexpected == ("cfg.warmup",) and target["cfg"] == {"lr": 0.1} and target["step"] == 3


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
