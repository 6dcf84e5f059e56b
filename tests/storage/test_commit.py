"""The root record and the commit protocol, on every storage backend."""

from __future__ import annotations

import pytest
import torch

from shardstore import format as fmt
from shardstore.codec import ArrayLayout
from shardstore.errors import CheckpointNotFoundError, IncompleteCheckpointError
from shardstore.storage import Storage


def _root(step: int) -> fmt.RootMetadata:
    layout = ArrayLayout((4,), torch.float32, (4,), (2,))
    tree = {"dict": {"step": {"value": step}, "w": {"tensor": ["w"]}}}
    return fmt.RootMetadata(tree, {"w": fmt.TensorRecord.from_layout("w", layout)}, commit_id=f"{step:032x}")


def _save(storage: Storage, step: int) -> None:
    storage.write("w/zarr.json", b"{}")
    storage.write("w/c/0", bytes([step]) * 8)
    fmt.write_root(storage, _root(step))


def test_read_root_round_trip(storage):
    _save(storage, 7)
    root = fmt.read_root(storage)
    assert root == _root(7) and root.tensors["w"].layout.inner_chunk_shape == (2,)


def test_nothing_at_all_is_not_found(storage):
    with pytest.raises(CheckpointNotFoundError, match=f"no checkpoint at {storage.url}") as info:
        fmt.read_root(storage)
    assert isinstance(info.value, FileNotFoundError)


def test_objects_without_root_marker_are_incomplete(storage):
    storage.write("w/c/0", b"x")
    with pytest.raises(IncompleteCheckpointError) as info:
        fmt.read_root(storage)
    assert str(info.value) == (
        f"checkpoint {storage.url} has no root zarr.json: it is incomplete (a save was interrupted or is "
        "still running); load an earlier checkpoint or re-run the save"
    )


def test_commit_into_empty_target(storage):
    staging = fmt.staging_storage(storage)
    _save(staging, 1)
    fmt.commit_staged(staging, storage)
    assert fmt.read_root(storage).tree == _root(1).tree
    assert staging.is_empty()


def test_commit_replaces_an_existing_checkpoint(storage):
    _save(storage, 1)
    storage.write("stale/only/in/old", b"x")
    staging = fmt.staging_storage(storage)
    _save(staging, 2)
    fmt.commit_staged(staging, storage)
    assert fmt.read_root(storage).tree == _root(2).tree
    assert storage.read("w/c/0") == bytes([2]) * 8
    assert "stale/only/in/old" not in storage.list()
    assert staging.is_empty()


def test_commit_refuses_an_unfinished_staging(storage):
    staging = fmt.staging_storage(storage)
    staging.write("w/c/0", b"x")
    with pytest.raises(IncompleteCheckpointError, match="did not finish"):
        fmt.commit_staged(staging, storage)


def test_interrupted_commit_leaves_a_loadable_checkpoint(storage, monkeypatch):
    """Crash in the middle of the switch: the old or the new checkpoint must still load from somewhere."""
    _save(storage, 1)
    staging = fmt.staging_storage(storage)
    _save(staging, 2)
    step = "rename_to" if storage.is_local else "copy_to"
    calls = []

    def crash(self, *args):
        calls.append(args)
        if len(calls) == 2:  # local: old moved aside, staging not yet in; object store: mid-copy
            raise OSError("simulated crash")
        return original(self, *args)

    original = getattr(Storage, step)
    monkeypatch.setattr(Storage, step, crash)
    with pytest.raises(OSError, match="simulated crash"):
        fmt.commit_staged(staging, storage)
    monkeypatch.undo()
    assert fmt.read_root(staging).tree == _root(2).tree  # new still complete in staging
    with pytest.raises((IncompleteCheckpointError, CheckpointNotFoundError)):
        fmt.read_root(storage)  # never a half-copied checkpoint that claims to be complete
    fmt.commit_staged(staging, storage)  # recovery: re-run the commit
    assert fmt.read_root(storage).tree == _root(2).tree
