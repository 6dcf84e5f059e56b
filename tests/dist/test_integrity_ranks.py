"""Integrity across ranks: an all-or-nothing load whose corrupt chunk only one rank reads leaves every
rank's tensors (our DTensor and torch's) untouched, the other rank naming the failing one; Partial
DTensors are refused naming the key, on save and load. Single-process damage cases:
test_integrity.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.tensor as tdt

import dtensor
import shardstore
from shardstore.coordinator import RemoteRankError
from tests.dist.test_integrity import _flip, _shard
from tests.ranks import mesh, run_ranks

DIST_SHAPES = {"a": (8, 6), "b": (10, 4), "z_last": (6, 5)}


def _dist_values() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {k: torch.randn(s, generator=g) for k, s in DIST_SHAPES.items()}


def _dist_state(values: dict[str, torch.Tensor]) -> dict:
    m = mesh((2,))
    model = {}
    for i, (k, v) in enumerate(values.items()):
        if i % 2:
            model[k] = tdt.distribute_tensor(v, m, [tdt.Shard(0)], src_data_rank=None)
        else:
            model[k] = dtensor.distribute_tensor(v, m, [dtensor.Shard(0)], src_data_rank=None)
    return {"model": model, "step": 1}


def _dist_save(url: str) -> None:
    shardstore.save(_dist_state(_dist_values()), url)


def _dist_failed_load(url: str) -> tuple[str, str, bool]:
    sd = _dist_state({k: torch.full_like(v, 7.0) for k, v in _dist_values().items()})
    before = {k: v.to_local().clone() for k, v in sd["model"].items()}
    try:
        shardstore.load(sd, url, all_or_nothing=True)
    except Exception as exc:  # noqa: BLE001 - reported to the test process
        outcome = (type(exc).__name__, str(exc))
    else:
        outcome = ("no error", "")
    untouched = all(torch.equal(before[k], v.to_local()) for k, v in sd["model"].items())
    return (*outcome, untouched)


def _partial_state(kind: str) -> dict:
    m = mesh((2,))
    local = torch.ones(4, 4)
    if kind == "ours":
        return {"model": {"p": dtensor.DTensor.from_local(local, m, [dtensor.Partial()])}}
    return {"model": {"p": tdt.DTensor.from_local(local, m, [tdt.Partial()])}}


def _dist_partial(save_url: str, load_url: str, kind: str) -> list[tuple[str, str]]:
    out = []
    for step in (lambda: shardstore.save(_partial_state(kind), save_url),
                 lambda: shardstore.load(_partial_state(kind), load_url)):
        try:
            step()
            out.append(("no error", ""))
        except Exception as exc:  # noqa: BLE001
            out.append((type(exc).__name__, str(exc)))
    return out


def test_all_or_nothing_two_ranks_corrupt_chunk_on_one_rank_leaves_every_rank_untouched(tmp_path):
    url = str(tmp_path / "ck")
    run_ranks(2, _dist_save, url)
    shards = sorted(p.name for p in (Path(url) / "model/z_last").iterdir())
    assert shards == ["c.0.0", "c.1.0", "zarr.json"], shards  # one shard object per rank's half
    _flip(_shard(url, "model/z_last", "c.1.0"), 0)  # the half rank 1 loads
    (kind0, msg0, untouched0), (kind1, msg1, untouched1) = run_ranks(2, _dist_failed_load, url)
    assert kind1 == "CorruptCheckpointError" and f"{url}/model/z_last/c.1.0 inner chunk 0 of 'model.z_last'" in msg1
    assert kind0 == RemoteRankError.__name__ and "rank(s) [1]" in msg0 and "model/z_last/c.1.0" in msg0
    assert untouched1, "rank 1 changed its tensors although its load failed"
    assert untouched0, "rank 0 changed its tensors although the load failed on rank 1"


@pytest.mark.parametrize("kind", ["ours", "torch"])
def test_partial_dtensor_is_refused_naming_the_key(tmp_path, kind):
    url = str(tmp_path / "ck")
    shardstore.save({"model": {"p": torch.ones(4, 4)}}, url)
    for rank_outcome in run_ranks(2, _dist_partial, str(tmp_path / "new"), url, kind):
        for name, msg in rank_outcome:
            assert name in ("ValueError", "StateDictMismatchError"), (name, msg)
            assert "'model.p'" in msg and "Partial" in msg and "redistribute" in msg, msg
    assert not (tmp_path / "new").exists()
