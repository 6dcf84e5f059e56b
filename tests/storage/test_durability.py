"""A returned save is durable: every object and every directory whose entries changed is fsync'd, in an
order that makes the root marker durable only after everything it names, and the commit (the rename
into the URL) durable before ``save`` returns. Checked by recording the sync calls of the local backend,
not by timing or power cuts."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest
import torch

import shardstore
from shardstore.storage import local, posix


@pytest.fixture()
def syncs(monkeypatch) -> list[tuple[str, str]]:
    """Every sync the local backend makes, in order: ("file", path), ("dir", path) or ("fs", path) (a syncfs)."""
    events: list[tuple[str, str]] = []
    file_sync, dir_sync, fs_sync = posix.fsync_file, posix.fsync_dir, posix.syncfs
    monkeypatch.setattr(posix, "fsync_file", lambda fd, path: (events.append(("file", path)), file_sync(fd, path)))
    monkeypatch.setattr(posix, "fsync_dir", lambda path: (events.append(("dir", path)), dir_sync(path)))
    monkeypatch.setattr(posix, "syncfs", lambda path: (events.append(("fs", path)), fs_sync(path))[1])
    return events


def _state() -> dict:
    return {"model": {"layers": [{"w": torch.randn(16, 8)}, {"w": torch.randn(16, 8)}], "b": torch.zeros(3)}, "step": 4}


def _relative(path: str, roots: list[str]) -> str | None:
    """``path`` relative to whichever save tree it lies in (staging or final), temporaries folded."""
    for root in roots:
        if path == root:
            return "."
        if path.startswith(root + "/"):
            rel = path[len(root) + 1 :]
            return rel.split(".tmp-")[0]
    return None


@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "overwrite"])
def test_every_file_and_directory_is_synced_marker_after_contents_commit_last(tmp_path, syncs, overwrite):
    url = tmp_path / "ck"
    if overwrite:
        shardstore.save(_state(), str(url))
        syncs.clear()
    shardstore.save(_state(), str(url), overwrite=overwrite)
    stagings = sorted({p.split(".staging-")[0] + ".staging-" + p.split(".staging-")[1].split("/")[0]
                       for _, p in syncs if ".staging-" in p})
    assert len(stagings) == 1, syncs
    roots = stagings + [str(url)]
    files = [_relative(p, roots) for kind, p in syncs if kind == "file"]
    dirs = [_relative(p, roots) for kind, p in syncs if kind == "dir"]
    tree_files = {str(p.relative_to(url)) for p in url.rglob("*") if p.is_file()}
    tree_dirs = {str(p.relative_to(url)) for p in url.rglob("*") if p.is_dir()} | {"."}
    assert tree_files <= set(files), tree_files - set(files)
    assert tree_dirs <= set(dirs), tree_dirs - set(dirs)
    marker = max(i for i, (kind, p) in enumerate(syncs) if kind == "file" and _relative(p, roots) == "zarr.json")
    contents = [i for i, (kind, p) in enumerate(syncs) if _relative(p, roots) not in ("zarr.json", ".", None)]
    assert max(contents) < marker, "a file or directory was synced after the root marker"
    assert syncs[-1] == ("dir", str(tmp_path)), "the rename into the URL is not the last thing made durable"
    assert ("dir", os.path.join(stagings[0])) in syncs[marker:], "the marker's name was not made durable"


def test_many_small_objects_are_made_durable_by_one_syncfs_before_the_marker(tmp_path, monkeypatch):
    """A save of many small tensors makes thousands of files and directories durable with one syncfs
    each time it syncs (not an fsync each), and every object it placed is covered by a sync that comes
    before the root marker's own sync."""
    events: list[tuple[str, str]] = []
    file_sync, dir_sync, fs_sync, place = posix.fsync_file, posix.fsync_dir, posix.syncfs, local.LocalStorage._replace
    monkeypatch.setattr(posix, "fsync_file", lambda fd, path: (events.append(("file", path)), file_sync(fd, path)))
    monkeypatch.setattr(posix, "fsync_dir", lambda path: (events.append(("dir", path)), dir_sync(path)))
    monkeypatch.setattr(posix, "syncfs", lambda path: (events.append(("fs", path)), fs_sync(path))[1])
    monkeypatch.setattr(local.LocalStorage, "_replace",
                        lambda self, tmp, path, **kw: (place(self, tmp, path, **kw), events.append(("placed", path))))
    url = tmp_path / "ck"
    shardstore.save({f"layer{i}": {"w": torch.randn(4, 8), "b": torch.zeros(8)} for i in range(40)}, str(url))
    assert [kind for kind, _ in events].count("fs") >= 1
    assert sum(kind in ("file", "dir") for kind, _ in events) < 10, "many small objects were fsync'd one by one"
    placed = [(i, p) for i, (kind, p) in enumerate(events) if kind == "placed"]
    marker = next(i for i, p in placed if ".staging-" in p and p.rsplit("/", 2)[-2].startswith("ck.staging-")
                  and p.endswith("/zarr.json"))
    for i, path in placed:
        if i < marker:
            assert any(k in ("fs", "file") for k, _ in events[i + 1 : marker]), f"{path} not synced before the marker"
    tree_files = [p for p in url.rglob("*") if p.is_file()]
    assert len(tree_files) >= 160


def test_durable_false_syncs_nothing(tmp_path, syncs):
    shardstore.save(_state(), str(tmp_path / "ck"), durable=False)
    assert syncs == []
    target = {"model": {"layers": [{"w": torch.zeros(16, 8)}, {"w": torch.zeros(16, 8)}], "b": torch.ones(3)}, "step": 0}
    shardstore.load(target, str(tmp_path / "ck"))
    assert target["step"] == 4 and not target["model"]["b"].any()


def test_objects_linked_from_a_base_saved_without_durable_are_synced(tmp_path, syncs):
    """A hard link shares the base's bytes, which ``durable=False`` never synced: the durable save does."""
    state = _state()
    shardstore.save(state, str(tmp_path / "base"), durable=False, incremental=True)
    assert syncs == []
    result = shardstore.save(state, str(tmp_path / "ck"), incremental=str(tmp_path / "base"))
    assert result.chunks_linked == 3
    linked = {str(p.relative_to(tmp_path / "ck")) for p in (tmp_path / "ck").rglob("c.*")}
    synced = {p.split(".staging-", 1)[1].split("/", 1)[-1].split(".tmp-")[0] for kind, p in syncs
              if kind == "file" and ".staging-" in p}
    assert any(kind == "fs" for kind, _ in syncs) or linked <= synced, linked - synced


def test_the_commit_lock_and_claim_files_are_not_left_behind(tmp_path: Path):
    shardstore.save(_state(), str(tmp_path / "ck"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert not list((tmp_path / "ck").rglob(".shardstore-*"))


@pytest.mark.parametrize("refused", [False, True], ids=["o_direct", "o_direct-refused"])
def test_large_aligned_writes_go_around_the_page_cache_and_round_trip(tmp_path, monkeypatch, refused):
    """The block-aligned head of a large object is written with O_DIRECT, the tail through the page
    cache; where the filesystem refuses O_DIRECT (EINVAL) everything goes through the page cache."""
    opened = []
    real_open = os.open

    def spy(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            opened.append(path)
            if refused:
                raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(local.os, "open", spy)
    buffer = mmap.mmap(-1, 3 << 20)  # page-aligned, as the save's encode ring is
    data = os.urandom((3 << 20) - 5)
    buffer[: len(data)] = data
    storage = local.LocalStorage(str(tmp_path / "s"))
    storage.write("big", memoryview(buffer)[: len(data)])
    storage.write("big2", memoryview(buffer)[: len(data)])
    storage.write("small", data[:1000])
    assert bytes(storage.read("big")) == data == bytes(storage.read("big2"))
    assert bytes(storage.read("small")) == data[:1000]
    assert len(opened) == (1 if refused else 2)  # once refused, not tried again


@pytest.mark.skipif(not hasattr(os, "O_DSYNC"), reason="no O_DSYNC on this system")
def test_big_heads_are_durable_as_they_are_written_smaller_ones_wait_for_sync(tmp_path, monkeypatch, syncs):
    """A head of 8 MiB or more is written O_DSYNC (persisted while the next objects are encoded); a
    smaller O_DIRECT head is not, and every object still waits for ``sync()`` (its tail and inode)."""
    flags_of = {}
    real_open = os.open

    def spy(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            flags_of[os.path.basename(path).split(".tmp-")[0]] = flags  # written as a temporary, then renamed
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(local.os, "open", spy)
    buffer = mmap.mmap(-1, 9 << 20)
    data = os.urandom(len(buffer) - 5)
    buffer[: len(data)] = data
    storage = local.LocalStorage(str(tmp_path / "s"))
    storage.write("big", memoryview(buffer)[: len(data)])
    storage.write("medium", memoryview(buffer)[: 2 << 20])
    assert flags_of["big"] & os.O_DSYNC and not flags_of["medium"] & os.O_DSYNC
    storage.sync()
    assert {os.path.basename(path) for kind, path in syncs if kind == "file"} == {"big", "medium"}  # tails, inodes
    assert bytes(storage.read("big")) == data and bytes(storage.read("medium")) == data[: 2 << 20]


def test_deferred_objects_of_64_kib_or_more_start_their_write_back_when_written(tmp_path, monkeypatch):
    """Objects left to the final sync start their write-back as soon as they are written (no wait), so the
    flush at the end finds less left; smaller ones, and saves that need not be durable, do not."""
    started = []
    real = posix.start_writeback
    monkeypatch.setattr(posix, "start_writeback", lambda fd: (started.append(os.fstat(fd).st_size), real(fd)))
    state = {"big": torch.randn(64 << 8), "small": torch.randn(1000)}  # 64 KiB (plus its index), 4 KB
    shardstore.save(state, str(tmp_path / "ck"))
    assert len(started) == 1 and started[0] >= 64 << 10
    started.clear()
    shardstore.save(state, str(tmp_path / "scratch"), durable=False)
    assert started == []


def test_a_full_disk_names_the_object_and_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    """ENOSPC (or EIO) from a write carries no file name; the error says which object, the temporary is
    gone and the checkpoint saved before is untouched."""
    import errno

    url = str(tmp_path / "ck")
    shardstore.save({"w": torch.ones(64, 64)}, url)

    def full(fd, views, skip=0):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(posix, "write_all", full)
    _overwrite_fails_keeping_the_old(tmp_path, monkeypatch, r"No space left on device: '.*ck\.staging-[0-9a-f]+/w/", errno.ENOSPC)


@pytest.mark.parametrize("failing", ["file", "directory"])
def test_a_failed_fsync_names_what_did_not_reach_the_disk_and_leaves_the_old_checkpoint(tmp_path, monkeypatch, failing):
    """``os.fsync``'s EIO (write-back failed) carries no file name; the error says which file or
    directory, and the checkpoint saved before is untouched."""
    import errno
    import stat

    url = str(tmp_path / "ck")
    shardstore.save({"w": torch.ones(64, 64)}, url)
    fsync = os.fsync

    def failing_fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode) == (failing == "directory"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    _overwrite_fails_keeping_the_old(tmp_path, monkeypatch, r"Input/output error: '.*ck\.staging-[0-9a-f]{16}", errno.EIO)


def _overwrite_fails_keeping_the_old(tmp_path, monkeypatch, match: str, code: int) -> None:
    """An overwrite of ``tmp_path/ck`` (ones) fails with OSError ``code`` matching ``match``; once the
    fault is gone, the ones still load and nothing is left beside the checkpoint."""
    url = str(tmp_path / "ck")
    with pytest.raises(OSError, match=match) as info:
        shardstore.save({"w": torch.zeros(64, 64)}, url, overwrite=True)
    assert info.value.errno == code
    monkeypatch.undo()
    assert torch.equal(shardstore.open(url).read("w"), torch.ones(64, 64))
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_directories_a_save_creates_on_the_way_to_its_url_are_synced(tmp_path, syncs):
    """The first save into a new run directory creates it (and its missing parents) with the commit
    lock; the commit fsyncs only the directory it renames into, so their entries are synced too."""
    shardstore.save(_state(), str(tmp_path / "new" / "run" / "ck"))
    dirs = [path for kind, path in syncs if kind == "dir"]
    assert str(tmp_path) in dirs and str(tmp_path / "new") in dirs and str(tmp_path / "new" / "run") in dirs
    syncs.clear()
    shardstore.save(_state(), str(tmp_path / "new" / "run" / "ck2"))  # the run directory exists: nothing more
    dirs = [path for kind, path in syncs if kind == "dir"]
    assert str(tmp_path) not in dirs and str(tmp_path / "new") not in dirs


@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "overwrite"])
def test_a_failed_sync_after_the_rename_says_the_checkpoint_is_in_place_but_may_not_be_durable(tmp_path, monkeypatch, overwrite):
    """The rename (or exchange) that publishes a save is made durable by an fsync of the parent
    directory. Where that fsync fails (EIO), the new checkpoint is already the one at the URL: the
    error says so, and that a crash could bring back what was there before (which is kept until the
    next save sweeps it), rather than that the save failed and nothing changed."""
    import errno

    url = tmp_path / "ck"
    if overwrite:
        shardstore.save({"w": torch.ones(4)}, str(url))
    before = (url / "zarr.json").read_bytes() if overwrite else None
    dir_sync = posix.fsync_dir

    def fails_once_published(path):
        published = (url / "zarr.json").exists() and (url / "zarr.json").read_bytes() != before
        if path == str(tmp_path) and published:
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)
        return dir_sync(path)

    monkeypatch.setattr(posix, "fsync_dir", fails_once_published)
    with pytest.raises(OSError) as info:
        shardstore.save({"w": torch.zeros(4)}, str(url), overwrite=overwrite)
    message = str(info.value)
    assert info.value.errno == errno.EIO and "nothing was committed" not in message
    assert f"the save committed: the checkpoint at {url} is the new one" in message
    assert "may not be durable" in message and str(tmp_path) in message
    assert ("the checkpoint it replaced" if overwrite else "nothing") in message
    assert "re-run the save with overwrite=True" in message
    monkeypatch.undo()
    assert torch.equal(shardstore.open(str(url)).read("w"), torch.zeros(4))
    shardstore.save({"w": torch.full((4,), 2.0)}, str(url), overwrite=True)  # sweeps what the failed sync left
    assert sorted(os.listdir(tmp_path)) == ["ck"]
