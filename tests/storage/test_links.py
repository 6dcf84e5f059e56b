"""``Storage.link_from``: an object of one checkpoint stored under the same key of another without
sending its bytes through the process (a hard link locally, a server-side copy elsewhere)."""

from __future__ import annotations

import os

import pytest

from shardstore.errors import MissingChunkError


def test_link_from_stores_the_same_bytes_and_survives_the_source(storage):
    old, new = storage.child("step-1"), storage.child("step-2")
    old.write("w/c/0", b"frozen bytes")
    new.link_from(old, "w/c/0")
    assert bytes(new.read("w/c/0")) == b"frozen bytes"
    old.delete_prefix()  # deleting the older checkpoint never breaks the newer one
    assert bytes(new.read("w/c/0")) == b"frozen bytes"


def test_link_from_a_missing_object_names_it(storage):
    old, new = storage.child("step-1"), storage.child("step-2")
    with pytest.raises(MissingChunkError, match="step-1/w/c/0"):
        new.link_from(old, "w/c/0")
    assert not new.exists("w/c/0")


def test_local_link_is_a_hard_link_that_a_later_write_never_changes(tmp_path):
    from shardstore.storage import Storage

    old, new = Storage(str(tmp_path / "step-1")), Storage(str(tmp_path / "step-2"))
    old.write("w/c/0", b"frozen")
    new.link_from(old, "w/c/0")
    a, b = tmp_path / "step-1/w/c/0", tmp_path / "step-2/w/c/0"
    assert os.stat(a).st_ino == os.stat(b).st_ino and os.stat(a).st_nlink == 2
    new.write("w/c/0", b"changed")  # a write renames a fresh file over the key: the other name keeps its bytes
    assert a.read_bytes() == b"frozen" and b.read_bytes() == b"changed"
    assert os.stat(a).st_ino != os.stat(b).st_ino
    assert not [p for p in (tmp_path / "step-2/w/c").iterdir() if ".tmp-" in p.name]


def test_local_link_refuses_a_symlinked_source(tmp_path):
    from shardstore.errors import CorruptCheckpointError
    from shardstore.storage import Storage

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "0").write_bytes(b"secret")
    (tmp_path / "step-1" / "w").mkdir(parents=True)
    os.symlink(tmp_path / "elsewhere", tmp_path / "step-1" / "w" / "c")
    with pytest.raises(CorruptCheckpointError, match="symbolic link"):
        Storage(str(tmp_path / "step-2")).link_from(Storage(str(tmp_path / "step-1")), "w/c/0")


def test_local_link_refuses_a_symlinked_object(tmp_path):
    from shardstore.errors import CorruptCheckpointError
    from shardstore.storage import Storage

    (tmp_path / "secret").write_bytes(b"secret")
    (tmp_path / "step-1" / "w" / "c").mkdir(parents=True)
    os.symlink(tmp_path / "secret", tmp_path / "step-1" / "w" / "c" / "0")
    with pytest.raises(CorruptCheckpointError, match="symbolic link"):
        Storage(str(tmp_path / "step-2")).link_from(Storage(str(tmp_path / "step-1")), "w/c/0")
    assert not (tmp_path / "step-2" / "w" / "c" / "0").exists()
