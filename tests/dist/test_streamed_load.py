"""Streamed loads: a rank whose share exceeds its ``staging_bytes`` makes every rank read, verify and copy
batch by batch through bounded memory. Every object's index is still checked before anything changes; a
checksum failure found later raises ``PartialLoadError`` on every rank that had copied tensors in, naming them.
Helpers (saved checkpoints, damage, snapshots) are the integrity suite's."""

from __future__ import annotations

import pytest
import torch

import shardstore
from shardstore.errors import CorruptCheckpointError, PartialLoadError
from tests.dist.test_integrity import (  # noqa: F401 - small_inner_chunks is a fixture
    _dist_save,
    _dist_state,
    _dist_values,
    _flip,
    _many_values,
    _saved,
    _saved_with_corrupt_last_tensor,
    _sevens,
    _shard,
    _snapshot,
    _state,
    _truncate,
    _unchanged,
    _zeros_state,
    small_inner_chunks,
)
from tests.ranks import run_ranks

STAGING = 3000  # bytes: a couple of ~1 KiB inner chunks per buffer, so five 4 KiB tensors take many batches


def test_streamed_load_equals_the_saved_values_in_bounded_memory(tmp_path, small_inner_chunks):
    url = str(tmp_path / "ck")
    shardstore.save(_state(_many_values()), url)
    sd = _state({k: torch.zeros_like(v) for k, v in _many_values().items()})
    result = shardstore.load(sd, url, staging_bytes=STAGING)
    assert result.streamed and 0 < result.staged_bytes <= STAGING + 2 * 8  # two buffers, each <= half (+crc)
    assert all(torch.equal(sd["model"][k], v) for k, v in _many_values().items()) and sd["step"] == 3
    assert result.bytes_read == sum(v.numel() * 4 for v in _many_values().values())
    whole = shardstore.load(_state({k: torch.zeros_like(v) for k, v in _many_values().items()}), url)
    assert not whole.streamed and whole.staged_bytes >= result.bytes_read


@pytest.mark.parametrize("staging", [None, -1, 1.5])
def test_staging_bytes_must_be_a_byte_count(tmp_path, staging):
    url = _saved(tmp_path)
    with pytest.raises(ValueError, match="staging_bytes must be a number of bytes"):
        shardstore.load(_zeros_state(), url, staging_bytes=staging)


@pytest.mark.parametrize("damage", ["delete", "truncate", "index"])
def test_streamed_load_checks_every_object_before_copying(tmp_path, small_inner_chunks, damage):
    url = str(tmp_path / "ck")
    shardstore.save(_state(_many_values()), url)
    last = _shard(url, f"model/{sorted(_many_values())[-1]}")
    if damage == "delete":
        last.unlink()
    elif damage == "truncate":
        _truncate(last, last.stat().st_size - 5)
    else:
        _flip(last, last.stat().st_size - 20)
    sd = _sevens()
    before = _snapshot(sd)
    with pytest.raises(CorruptCheckpointError) as info:
        shardstore.load(sd, url, staging_bytes=STAGING)
    assert not isinstance(info.value, PartialLoadError), info.value
    assert _unchanged(before, sd) and sd["step"] == -1


def test_streamed_load_names_what_it_wrote_when_a_late_chunk_is_corrupt(tmp_path, small_inner_chunks):
    url, last = _saved_with_corrupt_last_tensor(tmp_path)
    sd = _sevens()
    with pytest.raises(PartialLoadError) as info:
        shardstore.load(sd, url, staging_bytes=STAGING)
    msg = str(info.value)
    assert f"inner chunk 3 of 'model.{last}'" in msg and "partly loaded" in msg and "'model.t0'" in msg
    assert torch.equal(sd["model"]["t0"], _many_values()["t0"])  # written before the damage was reached



def _dist_streamed_load(url: str) -> tuple[str, str, bool]:
    """Rank 0's staging memory is tiny (so every rank streams); rank 1's would hold its whole share."""
    sd = _dist_state({k: torch.full_like(v, 7.0) for k, v in _dist_values().items()})
    staging = 64 if torch.distributed.get_rank() == 0 else 1 << 30
    try:
        result = shardstore.load(sd, url, staging_bytes=staging)
    except Exception as exc:  # noqa: BLE001 - reported to the test process
        return type(exc).__name__, str(exc), False
    return "no error", "", result.streamed


def test_one_rank_over_its_staging_memory_makes_every_rank_stream(tmp_path):
    url = str(tmp_path / "ck")
    run_ranks(2, _dist_save, url)
    assert [streamed for *_, streamed in run_ranks(2, _dist_streamed_load, url)] == [True, True]
    _flip(_shard(url, "model/z_last", "c/1/0"), 0)  # the half rank 1 loads
    (kind0, msg0, _), (kind1, msg1, _) = run_ranks(2, _dist_streamed_load, url)
    # rank 0 copied its share in before hearing of rank 1's failure; rank 1 (one batch: its staging memory
    # holds its whole share) failed before copying anything, so it raises the plain error
    assert (kind0, kind1) == ("PartialLoadError", "CorruptCheckpointError"), (kind0, msg0, kind1, msg1)
    assert "partly loaded" in msg0 and "rank(s) [1]" in msg0 and "inner chunk 0 of 'model.z_last'" in msg1
