"""The root record and the commit protocol, on every storage backend."""

from __future__ import annotations

import pytest
import torch

import shardstore
from shardstore import commit, commit_lock
from shardstore import format as fmt
from shardstore.codec import ArrayLayout
from shardstore.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConcurrentSaveError,
    IncompleteCheckpointError,
    NotACheckpointError,
)
from shardstore.storage import CURRENT, VERSION_PREFIX, Storage


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


def _commit(storage: Storage, step: int, overwrite: bool = False) -> None:
    """A whole save through the commit protocol: claim, write where told, finish."""
    claim = commit.begin(storage, overwrite)
    _save(_dest(storage, claim), step)
    commit.finish(storage, _dest(storage, claim), claim)


def _dest(storage: Storage, claim: commit.Claim) -> Storage:
    """Where ``claim`` says to write, on the same connection (bucket storages carry their options)."""
    base = storage.parent()
    return base.child(claim.dest_url[len(base.url) + 1:])


def _siblings(storage: Storage) -> list[str]:
    return storage.parent().list_names(storage.name + ".")


def test_commit_into_empty_target(storage):
    _commit(storage, 1)
    assert fmt.read_root(storage).tree == _root(1).tree
    assert _siblings(storage) == [] and sorted(storage.list()) == ["w/c/0", "w/zarr.json", "zarr.json"]


def test_commit_into_an_existing_empty_directory(tmp_path):
    (tmp_path / "ckpt").mkdir()
    storage = Storage(str(tmp_path / "ckpt"))
    _commit(storage, 1)
    assert fmt.read_root(storage).tree == _root(1).tree


def test_overwrite_replaces_an_existing_checkpoint(storage):
    _commit(storage, 1)
    storage.write("w/c/1", b"only in the old one")
    _commit(storage, 2, overwrite=True)
    assert fmt.read_root(storage.pinned()).tree == _root(2).tree
    assert storage.pinned().read("w/c/0") == bytes([2]) * 8
    assert "w/c/1" not in storage.pinned().list() and _siblings(storage) == []
    if not storage.can_rename_trees:  # only the pointer and the new version remain
        version = storage.pinned().name
        assert storage.read(CURRENT) == version.encode() and version.startswith(VERSION_PREFIX)
        assert all(k == CURRENT or k.startswith(version + "/") for k in storage.list()), storage.list()


def test_without_overwrite_an_existing_checkpoint_is_refused(storage):
    _commit(storage, 1)
    with pytest.raises(CheckpointExistsError, match="pass overwrite=True"):
        commit.begin(storage, overwrite=False)
    assert fmt.read_root(storage.pinned()).tree == _root(1).tree and _siblings(storage) == []


@pytest.mark.parametrize("layout", ["notes", "runs", "notes-in-checkpoint", "foreign-root"])
def test_overwrite_never_replaces_what_is_not_a_checkpoint(storage, layout):
    files = {
        "notes": {"notes.txt": b"mine"},
        "runs": {"run1/zarr.json": b"{}", "run1/w/c/0": b"x", "run2/notes.md": b"x"},
        "notes-in-checkpoint": {"w/c/0": b"x", "w/zarr.json": b"{}", "README": b"mine"},
        "foreign-root": {"zarr.json": b'{"zarr_format": 3, "node_type": "group", "attributes": {}}'},
    }[layout]
    for key, data in files.items():
        storage.write(key, data)
    with pytest.raises(NotACheckpointError, match="not part of a shardstore checkpoint") as info:
        commit.begin(storage, overwrite=True)
    assert storage.url in str(info.value)
    assert {k: bytes(storage.read(k)) for k in storage.list()} == files and _siblings(storage) == []


@pytest.mark.parametrize("nested", [
    {"other_run/zarr.json": b"{}", "other_run/p/zarr.json": b"{}", "other_run/p/c.0": b"x"},  # another checkpoint
    {"eval/zarr.json": b"{}", "eval/c/0": b"x"},  # a Zarr array kept beside the tensors
    {"w/extra/zarr.json": b"{}", "w/extra/c.0": b"x"},  # under a recorded array, not one of its objects
])
def test_overwrite_never_deletes_zarr_nodes_the_checkpoints_record_does_not_name(storage, nested):
    """Names alone do not make files ours: another checkpoint or a Zarr array in a sub-directory is made
    of ``zarr.json`` files and chunk objects too. Only the nodes the root record names are replaced."""
    _commit(storage, 1)
    for key, data in nested.items():
        storage.write(key, data)
    with pytest.raises(NotACheckpointError, match="not part of a shardstore checkpoint") as info:
        commit.begin(storage, overwrite=True)
    assert sorted(nested)[0] in str(info.value)
    assert all(bytes(storage.read(k)) == data for k, data in nested.items())
    assert fmt.read_root(storage.pinned()).tree == _root(1).tree and _siblings(storage) == []


def test_an_interrupted_save_may_be_overwritten(storage):
    storage.write("w/zarr.json", b"{}")
    storage.write("w/c/0", b"half")
    with pytest.raises(CheckpointExistsError):
        commit.begin(storage, overwrite=False)
    _commit(storage, 3, overwrite=True)
    assert fmt.read_root(storage.pinned()).tree == _root(3).tree


@pytest.mark.parametrize("overwrite", [False, True])
def test_of_two_racing_saves_exactly_one_commits(storage, overwrite):
    if overwrite:
        _commit(storage, 1)
    first = commit.begin(storage, overwrite)
    try:
        second = commit.begin(storage, overwrite)
    except ConcurrentSaveError:
        assert not storage.can_rename_trees and not overwrite  # object stores refuse at the claim
        return
    for claim, step in ((first, 5), (second, 6)):
        _save(_dest(storage, claim), step)
    commit.finish(storage, _dest(storage, second), second)
    with pytest.raises(ConcurrentSaveError, match="another save committed"):
        commit.finish(storage, _dest(storage, first), first)
    commit.abandon(_dest(storage, first), first)
    assert fmt.read_root(storage.pinned()).tree == _root(6).tree and storage.pinned().read("w/c/0") == bytes([6]) * 8
    assert _siblings(storage) == []


def test_a_failed_swap_leaves_the_old_checkpoint_and_no_blocking_litter(tmp_path, monkeypatch):
    storage = Storage(str(tmp_path / "ckpt"))
    _commit(storage, 1)
    claim = commit.begin(storage, overwrite=True)
    dest = Storage(claim.dest_url)
    _save(dest, 2)
    monkeypatch.setattr(type(storage), "rename_tree", lambda *a, **k: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError, match="disk gone"):
        commit.finish(storage, dest, claim)
    monkeypatch.undo()
    assert fmt.read_root(storage.pinned()).tree == _root(1).tree
    assert len(_siblings(storage)) == 1  # the new tree, complete but never committed
    _commit(storage, 3, overwrite=True)  # a later save sweeps it
    assert fmt.read_root(storage.pinned()).tree == _root(3).tree and _siblings(storage) == []


def test_a_live_save_is_not_swept_but_a_dead_ones_tree_is(tmp_path):
    storage = Storage(str(tmp_path / "ckpt"))
    live = commit.begin(storage, overwrite=False)
    _commit(storage, 1)  # another save commits first; the live one keeps its staging tree
    assert Storage(live.dest_url).exists(commit.OWNER)
    commit.abandon(Storage(live.dest_url), live)
    assert _siblings(storage) == []


def test_an_overwrite_keeps_the_old_checkpoint_loadable_until_it_commits(storage):
    _commit(storage, 1)
    claim = commit.begin(storage, overwrite=True)
    _save(_dest(storage, claim), 2)  # the new checkpoint is complete, not yet committed
    assert fmt.read_root(storage.pinned()).tree == _root(1).tree
    assert storage.pinned().read("w/c/0") == bytes([1]) * 8
    commit.finish(storage, _dest(storage, claim), claim)
    assert fmt.read_root(storage.pinned()).tree == _root(2).tree
    assert storage.pinned().read("w/c/0") == bytes([2]) * 8


def test_a_users_directories_named_like_staging_siblings_are_never_swept(tmp_path):
    """Only the names the protocol makes (``<name>.staging-<16 hex>``) and trees holding only files of
    ours are taken for a dead save's litter."""
    import os
    import time

    storage = Storage(str(tmp_path / "ckpt"))
    mine = tmp_path / "ckpt.staging-old"  # not a name the protocol makes
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    theirs = tmp_path / f"ckpt.staging-{'0' * 16}"  # the protocol's name, but a user's files in it
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    dead = tmp_path / f"ckpt.staging-{'1' * 16}"  # a killed save's tree: objects, no owner, old
    (dead / "w").mkdir(parents=True)
    (dead / "w" / "c.0").write_bytes(b"x")
    old = time.time() - 2 * commit.YOUNG_S
    for path in (mine, theirs, dead, dead / "w"):
        os.utime(path, (old, old))
    _commit(storage, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt", "ckpt.staging-old", theirs.name])
    assert (mine / "notes.txt").read_text() == "mine" and (theirs / "notes.txt").read_text() == "mine"


def test_overwrites_through_a_symlink_and_through_its_target_never_both_commit(tmp_path, monkeypatch):
    """A save to ``latest -> step-1`` and one to ``step-1`` replace the same directory, so they take the
    same commit lock: the one finishing second sees the first's commit and commits nothing (each under a
    lock of its own, both committed, the second swapping out and deleting the first's checkpoint)."""
    real = Storage(str(tmp_path / "step-1"))
    _commit(real, 1)
    (tmp_path / "latest").symlink_to("step-1")
    via = Storage(str(tmp_path / "latest"))
    first, second = commit.begin(via, overwrite=True), commit.begin(real, overwrite=True)
    _save(Storage(first.dest_url), 5)
    _save(Storage(second.dest_url), 6)
    check, outcome = commit._check_unchanged, []

    def check_then_race(target, claim):  # the second save finishes while the first holds its commit lock
        check(target, claim)
        if claim is first:
            monkeypatch.setattr(commit_lock, "LOCK_WAIT_S", 0.2)
            try:
                commit.finish(real, Storage(second.dest_url), second)
                outcome.append("committed")
            except ConcurrentSaveError:
                outcome.append("refused")

    monkeypatch.setattr(commit, "_check_unchanged", check_then_race)
    commit.finish(via, Storage(first.dest_url), first)
    commit.abandon(Storage(second.dest_url), second)
    assert outcome == ["refused"]
    assert fmt.read_root(real.pinned()).tree == _root(5).tree and real.pinned().read("w/c/0") == bytes([5]) * 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-1"]


@pytest.mark.parametrize("suffix", ["new/.", "ckpt/sub/.."])
def test_a_url_ending_in_dot_or_dotdot_saves_to_the_directory_it_names(tmp_path, suffix):
    """Its staging sibling and lock sit beside that directory, not inside it (where the save wrote into
    the checkpoint it replaces, then refused it as holding foreign files, or took its own staging tree
    for a racing save's commit)."""
    import shardstore

    shardstore.save({"w": torch.zeros(3)}, str(tmp_path / "ckpt"))
    shardstore.save({"w": torch.ones(3)}, f"{tmp_path}/{suffix}", overwrite=True)  # (pathlib drops a ".")
    name = suffix.split("/")[0]
    assert torch.equal(shardstore.open(str(tmp_path / name)).read("w"), torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"ckpt", name})
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["w", "zarr.json"]


def test_a_users_directory_named_like_a_trash_sibling_is_never_deleted(tmp_path):
    """A ``<name>.trash-<16 hex>`` holding files no save of ours writes is not a swept tree: kept, as a
    staging-named one is; a real trash tree is deleted."""
    storage = Storage(str(tmp_path / "ckpt"))
    theirs = tmp_path / f"ckpt.trash-{'0' * 16}"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    ours = tmp_path / f"ckpt.trash-{'1' * 16}"  # a swept tree whose deletion was cut short
    (ours / "w").mkdir(parents=True)
    (ours / "w" / "c.0").write_bytes(b"x")
    _commit(storage, 1)
    commit.sweep(storage)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt", theirs.name])
    assert (theirs / "notes.txt").read_text() == "mine"


def test_a_name_too_long_for_its_staging_sibling_is_refused_saying_why(tmp_path):
    fits, too_long = tmp_path / ("c" * 230), tmp_path / ("c" * 231)
    shardstore.save({"w": torch.ones(2)}, str(fits))
    with pytest.raises(ValueError, match="the checkpoint's name is 231 bytes.*at most 230 bytes"):
        shardstore.save({"w": torch.ones(2)}, str(too_long))
    assert sorted(p.name for p in tmp_path.iterdir()) == [fits.name]
