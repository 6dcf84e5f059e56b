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


@pytest.mark.parametrize("write", ["write", "write_parts"])
def test_a_private_tree_writes_new_keys_in_place_and_replaces_linked_ones(tmp_path, monkeypatch, write):
    """A save's staging tree (``Storage.private``) creates a new key where it belongs, with no temporary
    and no rename; a key that is already there (linked from an older checkpoint) still gets a fresh
    inode, so the other checkpoint's name keeps its bytes."""
    from shardstore.storage import Storage, local

    renames = []
    real_replace = local.os.replace
    monkeypatch.setattr(local.os, "replace", lambda a, b: (renames.append(b), real_replace(a, b)))
    old, new = Storage(str(tmp_path / "step-1")), Storage(str(tmp_path / "step-2")).private()
    put = (lambda s, k, d: s.write(k, d)) if write == "write" else (lambda s, k, d: s.write_parts(k, [d[:3], d[3:]]))
    old.write("w/c.0", b"frozen")
    renames.clear()
    put(new, "v/c.0", b"fresh bytes")
    assert renames == [] and (tmp_path / "step-2/v/c.0").read_bytes() == b"fresh bytes"
    new.link_from(old, "w/c.0")
    renames.clear()
    put(new, "w/c.0", b"changed")
    assert renames == [str(tmp_path / "step-2/w/c.0")]
    assert (tmp_path / "step-1/w/c.0").read_bytes() == b"frozen"
    assert (tmp_path / "step-2/w/c.0").read_bytes() == b"changed"
    assert not [p for p in (tmp_path / "step-2").rglob("*") if ".tmp-" in p.name]


def test_a_failed_write_in_a_private_tree_leaves_no_file(tmp_path):
    from shardstore.storage import Storage

    new = Storage(str(tmp_path / "step-2")).private()

    def parts():
        yield b"half"
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        new.write_parts("w/c.0", parts())
    assert not new.exists("w/c.0") and list((tmp_path / "step-2/w").iterdir()) == []


def _inode_flags(path, set_flag: int = 0) -> int | None:
    """The inode flags of ``path`` (after or-ing in ``set_flag``); None where the filesystem has none."""
    import fcntl

    from shardstore.storage import posix

    fd = os.open(path, os.O_RDONLY)
    try:
        flags = bytearray(8)
        fcntl.ioctl(fd, posix._FS_IOC_GETFLAGS, flags)
        if set_flag:
            fcntl.ioctl(fd, posix._FS_IOC_SETFLAGS, (int.from_bytes(flags, "little") | set_flag).to_bytes(8, "little"))
            fcntl.ioctl(fd, posix._FS_IOC_GETFLAGS, flags)
        return int.from_bytes(flags, "little")
    except OSError:
        return None
    finally:
        os.close(fd)


def test_a_new_local_root_is_marked_as_a_top_directory_where_the_filesystem_allows(tmp_path):
    """ext4 then spreads the tensors' directories over its block groups (``posix.mark_top_directory``);
    a filesystem without the flag (tmpfs) is left as it is and the write succeeds."""
    from shardstore.storage import Storage, posix

    Storage(str(tmp_path / "ck")).write("w/zarr.json", b"{}")
    (tmp_path / "probe").mkdir()
    if not (_inode_flags(tmp_path / "probe", posix._FS_TOPDIR_FL) or 0) & posix._FS_TOPDIR_FL:
        pytest.skip("this filesystem has no top-directory flag")
    assert _inode_flags(tmp_path / "ck") & posix._FS_TOPDIR_FL
    assert not _inode_flags(tmp_path / "ck/w") & posix._FS_TOPDIR_FL  # only the root
