"""Incremental saves through ``shardstore.save``: the digests file, links, and what is refused."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import shardstore
from shardstore.errors import CheckpointNotFoundError, CorruptCheckpointError
from shardstore.incremental import DIGESTS


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"frozen": torch.randn(32, 16, generator=torch.Generator().manual_seed(0)), "lora": torch.randn(4, 16, generator=g)}


def test_digests_are_the_sha256_of_every_stored_object(tmp_path):
    shardstore.save(_state(1), str(tmp_path / "a"), incremental=True)
    record = json.loads((tmp_path / "a" / DIGESTS).read_text())
    assert record["algorithm"] == "sha256" and sorted(record["objects"]) == ["frozen/c/0/0", "lora/c/0/0"]
    for key, digest in record["objects"].items():
        assert hashlib.sha256((tmp_path / "a" / key).read_bytes()).hexdigest() == digest


def test_a_plain_save_records_no_digests(tmp_path):
    shardstore.save(_state(1), str(tmp_path / "a"))
    assert not (tmp_path / "a" / DIGESTS).exists()


def test_only_changed_objects_are_written(tmp_path):
    shardstore.save(_state(1), str(tmp_path / "a"), incremental=True)
    result = shardstore.save(_state(2), str(tmp_path / "b"), incremental=str(tmp_path / "a"))
    assert (result.chunks_written, result.chunks_linked) == (2, 1)
    assert result.bytes_written == (tmp_path / "b" / "lora/c/0/0").stat().st_size
    assert (tmp_path / "b" / "frozen/c/0/0").stat().st_ino == (tmp_path / "a" / "frozen/c/0/0").stat().st_ino
    target = {k: torch.zeros_like(v) for k, v in _state(0).items()}
    shardstore.load(target, str(tmp_path / "b"))
    assert all(torch.equal(target[k], v) for k, v in _state(2).items())


def test_a_base_without_digests_links_nothing(tmp_path):
    shardstore.save(_state(1), str(tmp_path / "a"))
    result = shardstore.save(_state(1), str(tmp_path / "b"), incremental=str(tmp_path / "a"))
    assert result.chunks_linked == 0 and (tmp_path / "b" / DIGESTS).exists()


def test_a_damaged_digests_file_is_refused_before_anything_is_written(tmp_path):
    shardstore.save(_state(1), str(tmp_path / "a"), incremental=True)
    (tmp_path / "a" / DIGESTS).write_text('{"format": "shardstore-digests", "objects": []}')
    with pytest.raises(CorruptCheckpointError, match=f"{tmp_path / 'a' / DIGESTS} is not a shardstore digests file"):
        shardstore.save(_state(2), str(tmp_path / "b"), incremental=str(tmp_path / "a"))
    with pytest.raises(CheckpointNotFoundError):
        shardstore.open(str(tmp_path / "b"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_incremental_must_be_a_bool_or_a_url(tmp_path):
    with pytest.raises(TypeError, match="incremental must be False, True or the URL of an earlier checkpoint, got 5"):
        shardstore.save(_state(1), str(tmp_path / "a"), incremental=5)
    assert not (tmp_path / "a").exists()
