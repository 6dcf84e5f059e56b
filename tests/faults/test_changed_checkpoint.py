"""An ``open()`` handle notices when the checkpoint at its URL was replaced and refuses to decode the new
bytes with its old metadata (``CheckpointChangedError``); re-opening reads the new checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import shardstore
from shardstore import api
from shardstore import format as fmt
from shardstore.errors import CheckpointChangedError
from shardstore.storage import Storage
from tests.faults.damage import files, root_file, saved, state, values


def _other_values() -> dict[str, torch.Tensor]:
    return {k: v + 1 for k, v in values().items()}


def _refused_after(ck: shardstore.Checkpoint, root: Path, says: str) -> str:
    before = files(root)
    with pytest.raises(CheckpointChangedError) as info:
        ck.read("model.w")
    msg = str(info.value)
    assert type(info.value) is CheckpointChangedError and says in msg, msg
    assert f"checkpoint {ck.url} changed after it was opened" in msg and f"shardstore.open({ck.url!r}) again" in msg
    assert files(root) == before
    return msg


def test_overwritten_checkpoint_is_refused_and_reopening_reads_the_new_one(tmp_path):
    url = saved(tmp_path)
    ck = shardstore.open(url)
    assert torch.equal(ck.read("model.w"), values()["w"])
    shardstore.save(state(_other_values(), step=8), url, overwrite=True)
    new_commit = fmt.read_root(Storage(url)).commit_id
    msg = _refused_after(ck, tmp_path, f"another save committed there (commit {new_commit})")
    assert ck.commit_id in msg and ck.commit_id != new_commit
    assert torch.equal(shardstore.open(url).read("model.w"), _other_values()["w"])


def test_deleted_checkpoint_is_refused(tmp_path):
    url = saved(tmp_path)
    ck = shardstore.open(url)
    shutil.rmtree(url)
    _refused_after(ck, tmp_path, "its root zarr.json is now unreadable (CheckpointNotFoundError")


def test_damaged_root_record_after_open_is_refused(tmp_path):
    url = saved(tmp_path)
    ck = shardstore.open(url)
    text = root_file(url).read_text()
    root_file(url).write_text(text.replace('"value": 7', '"value": 5'))
    _refused_after(ck, tmp_path, "its root zarr.json is now unreadable (CorruptCheckpointError")


def test_same_commit_rewritten_still_reads(tmp_path):
    url = saved(tmp_path)
    ck = shardstore.open(url)
    Storage(url).write(fmt.ZARR_JSON, root_file(url).read_bytes())  # new inode and mtime, same record
    assert torch.equal(ck.read("model.w"), values()["w"])
    assert torch.equal(ck.read("model.b", 3), values()["b"][3])


def test_replacement_racing_a_read_is_refused(tmp_path, monkeypatch):
    url = saved(tmp_path)
    ck = shardstore.open(url)
    real = api.read_checked

    def fetch_then_replace(*args):
        pieces = real(*args)
        shardstore.save(state(_other_values()), url, overwrite=True)
        return pieces

    monkeypatch.setattr(api, "read_checked", fetch_then_replace)
    with pytest.raises(CheckpointChangedError, match="another save committed there"):
        ck.read("model.w")


def test_object_store_checkpoint_replaced_is_refused():
    url = "memory://changed/ck"
    Storage(url).delete_prefix()
    shardstore.save(state(values()), url)
    ck = shardstore.open(url)
    assert torch.equal(ck.read("model.b"), values()["b"])
    shardstore.save(state(_other_values()), url, overwrite=True)
    with pytest.raises(CheckpointChangedError, match="another save committed there"):
        ck.read("model.b")
    assert torch.equal(shardstore.open(url).read("model.b"), _other_values()["b"])
    Storage(url).delete_prefix()

