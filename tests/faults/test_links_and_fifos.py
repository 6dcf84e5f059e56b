"""Reads never leave the checkpoint: a symlinked chunk, group or metadata file, or a FIFO planted in a
checkpoint, is refused with ``CorruptCheckpointError`` naming it, before any target changes, and never
blocks. A symlink to the checkpoint root itself (``latest -> step-100``) is the user's and is followed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import shardstore
from shardstore.errors import CorruptCheckpointError


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((8, 4), value), "b": torch.full((4,), value)}, "step": int(value)}


@pytest.fixture()
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """Two checkpoints with the same keys: A (ones) and B (twos)."""
    a, b = tmp_path / "a", tmp_path / "b"
    shardstore.save(_state(1.0), str(a))
    shardstore.save(_state(2.0), str(b))
    return a, b


def _replace_with_link(path: Path, to: Path) -> None:
    if path.is_dir():
        for p in sorted(path.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        path.rmdir()
    else:
        path.unlink()
    path.symlink_to(to)


def _assert_refused(url: Path, what: str, name: str) -> None:
    target = {"model": {"w": torch.zeros(8, 4), "b": torch.zeros(4)}, "step": -1}
    with pytest.raises(CorruptCheckpointError, match=f"{name}.* is {what} where a (regular file|directory) was expected") as info:
        shardstore.load(target, str(url))
    assert "never follows links" in str(info.value)
    assert target["step"] == -1 and not target["model"]["w"].any() and not target["model"]["b"].any()


@pytest.mark.parametrize("node", ["model/w/c.0.0", "model/w", "model"])
def test_a_symlink_into_another_checkpoint_is_refused(pair, node):
    a, b = pair
    _replace_with_link(b / node, a / node)
    _assert_refused(b, "a symbolic link", node)
    with pytest.raises(CorruptCheckpointError, match="symbolic link"):
        shardstore.open(str(b)).read("model.w")


def test_a_symlinked_root_marker_is_refused(pair):
    a, b = pair
    _replace_with_link(b / "zarr.json", a / "zarr.json")
    with pytest.raises(CorruptCheckpointError, match="zarr.json is a symbolic link"):
        shardstore.open(str(b))


@pytest.mark.timeout(60)
def test_a_fifo_in_place_of_a_chunk_is_refused_without_blocking(pair):
    _, b = pair
    chunk = b / "model" / "w" / "c.0.0"
    chunk.unlink()
    os.mkfifo(chunk)
    _assert_refused(b, "a FIFO", "c.0.0")


def test_a_symlink_to_the_checkpoint_root_is_followed(pair, tmp_path):
    _, b = pair
    (tmp_path / "latest").symlink_to(b)
    target = {"model": {"w": torch.zeros(8, 4), "b": torch.zeros(4)}, "step": -1}
    shardstore.load(target, str(tmp_path / "latest"))
    assert target["step"] == 2 and torch.all(target["model"]["w"] == 2)


def test_a_load_never_mixes_the_checkpoint_it_started_with_and_one_swapped_in(tmp_path):
    """A commit that swaps a new checkpoint in after a handle opened (same layout, valid checksums: mixing
    would be silent): the handle refuses to read on (CheckpointChangedError), never the new bytes under the
    old metadata; a read already in flight keeps reading the tree it pinned."""
    url = str(tmp_path / "ck")
    shardstore.save(_state(1.0), url)
    handle = shardstore.open(url)
    shardstore.save(_state(2.0), url, overwrite=True)
    assert shardstore.open(url).read("model.w").eq(2).all()
    with pytest.raises(shardstore.CheckpointChangedError, match="another save committed there"):
        handle.read("model.w")


def test_a_directory_in_place_of_a_chunk_says_a_regular_file_was_expected(pair):
    _, b = pair
    chunk = b / "model" / "w" / "c.0.0"
    chunk.unlink()
    chunk.mkdir()
    _assert_refused(b, "a directory", "c.0.0")
