"""Local reads of 1 MiB or more whose bytes are not in the page cache go around it (``O_DIRECT`` through a
bounce buffer); cached bytes are copied from the cache. Either way a read returns exactly the file's
bytes, whatever the offsets, lengths and scatter buffers, and a filesystem that refuses ``O_DIRECT``
gets buffered reads."""

from __future__ import annotations

import errno
import os
import random

import pytest

from shardstore.storage import Storage, direct_io, posix
from tools.bench_common import evict  # sync, then drop from the page cache

_SIZE = (9 << 20) + 12345  # not a whole number of blocks, nor of bounce buffers


@pytest.fixture
def obj(tmp_path):
    data = random.Random(7).randbytes(_SIZE)
    storage = Storage(str(tmp_path / "ckpt"))
    storage.write("w/c.0", data)
    storage.sync()
    return storage, str(tmp_path / "ckpt" / "w" / "c.0"), data


def _resident(path: str, start: int, length: int) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return posix.resident(fd, start, length)
    finally:
        os.close(fd)


@pytest.fixture
def direct_reads(monkeypatch):
    calls = []
    real = posix.pread_direct
    monkeypatch.setattr(posix, "pread_direct", lambda fd, offset, views, bounce: calls.append(offset) or real(fd, offset, views, bounce))
    return calls


def test_resident_tells_cached_from_evicted_bytes(obj):
    _, path, data = obj
    with open(path, "rb") as f:
        assert f.read() == data
    assert _resident(path, 0, _SIZE) and _resident(path, 5000, 1 << 20)
    evict(path)
    assert not _resident(path, 0, _SIZE)
    assert not _resident(path, _SIZE + 4096, 10)  # past the end: nothing to tell


def test_cold_reads_go_direct_and_return_exact_bytes(obj, direct_reads):
    storage, path, data = obj
    rng = random.Random(3)
    for _ in range(12):
        start = rng.randrange(0, _SIZE - (1 << 20))
        stop = rng.randrange(start + (1 << 20), _SIZE + 1)
        evict(path)
        assert bytes(storage.read_range("w/c.0", start, stop)) == data[start:stop]
        evict(path)
        cuts = sorted(rng.sample(range(1, stop - start), 3))
        parts = [bytearray(b - a) for a, b in zip([0] + cuts, cuts + [stop - start])]
        storage.read_range_scattered("w/c.0", start, [memoryview(p) for p in parts])
        assert b"".join(parts) == data[start:stop]
    assert len(direct_reads) == 24


def test_a_direct_read_past_the_end_is_truncation(obj, direct_reads):
    from shardstore.errors import CorruptCheckpointError

    storage, path, _ = obj
    evict(path)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        storage.read_range_into("w/c.0", _SIZE - (1 << 20), bytearray((1 << 20) + 10))
    assert direct_reads


def test_cached_and_small_reads_stay_buffered(obj, direct_reads):
    storage, path, data = obj
    evict(path)
    assert bytes(storage.read_range("w/c.0", 100, 100 + (1 << 19))) == data[100 : 100 + (1 << 19)]
    with open(path, "rb") as f:
        f.read()
    assert bytes(storage.read("w/c.0")) == data
    assert direct_reads == []


def test_a_filesystem_refusing_o_direct_gets_buffered_reads(obj, monkeypatch):
    storage, path, data = obj

    def refuse(fd, offset, views, bounce):
        raise OSError(errno.EINVAL, "O_DIRECT refused")

    monkeypatch.setattr(posix, "pread_direct", refuse)
    evict(path)
    assert bytes(storage.read("w/c.0")) == data
    assert storage._direct.ok is False


def test_bounce_buffers_are_aligned_and_per_thread():
    import threading

    buffers = []
    thread = threading.Thread(target=lambda: buffers.append(direct_io.bounce_buffer()))
    thread.start()
    thread.join()
    mine = direct_io.bounce_buffer()
    assert mine is direct_io.bounce_buffer() and buffers[0] is not mine
    assert posix.address(mine) % posix.DIRECT_ALIGN == 0 and len(mine) >= (4 << 20) + posix.DIRECT_ALIGN


def test_a_buffered_read_fetches_no_neighbouring_bytes(obj):
    """A read under 1 MiB at the start of an object (where the kernel's readahead opens its window) brings
    only its own pages into the cache: readahead would fetch the column bands other ranks read."""
    storage, path, data = obj
    evict(path)
    start = 0
    assert bytes(storage.read_range("w/c.0", start, start + (256 << 10))) == data[start : start + (256 << 10)]
    assert _resident(path, start, 256 << 10)
    assert not _resident(path, start + (256 << 10), 4096)


def _room(nbytes: int) -> memoryview:
    from shardstore.buffers import HUGE_PAGE, staging_buffer
    from shardstore.storage import ROOM_SLACK

    return memoryview(staging_buffer(max(nbytes + ROOM_SLACK, HUGE_PAGE)))[: nbytes + ROOM_SLACK]  # a mapping: aligned


def test_a_cold_placed_read_lands_in_place_with_exact_bytes(obj, monkeypatch):
    """``read_range_placed``: a cold read fills the room with one O_DIRECT read (no bounce buffer), the
    bytes at their offset within a block; a short object is truncation."""
    from shardstore.errors import CorruptCheckpointError

    storage, path, data = obj
    monkeypatch.setattr(posix, "pread_direct", lambda *a: pytest.fail("a placed read went through the bounce buffer"))
    rng = random.Random(5)
    for _ in range(8):
        start = rng.randrange(0, _SIZE - (1 << 20))
        stop = rng.randrange(start + (1 << 20), _SIZE + 1)
        room = _room(stop - start)
        evict(path)
        view = storage.read_range_placed("w/c.0", start, stop, room)
        assert bytes(view) == data[start:stop]
        assert posix.address(view) - posix.address(room) == start % posix.DIRECT_ALIGN
    evict(path)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        storage.read_range_placed("w/c.0", _SIZE - (1 << 20), _SIZE + 10, _room((1 << 20) + 10))


def test_cached_or_refused_placed_reads_land_at_the_start_of_the_room(obj, monkeypatch):
    storage, path, data = obj
    start, stop = 12345, 12345 + (2 << 20)
    with open(path, "rb") as f:
        f.read()
    room = _room(stop - start)
    view = storage.read_range_placed("w/c.0", start, stop, room)
    assert bytes(view) == data[start:stop] and posix.address(view) == posix.address(room)

    def refuse(*args):
        raise OSError(errno.EINVAL, "O_DIRECT refused")

    monkeypatch.setattr(posix, "pread_direct_placed", refuse)
    evict(path)
    view = storage.read_range_placed("w/c.0", start, stop, room)
    assert bytes(view) == data[start:stop] and storage._direct.ok is False


def test_a_placed_read_into_unaligned_room_goes_through_the_bounce_buffer(obj, direct_reads):
    storage, path, data = obj
    evict(path)
    room = _room(2 << 20)
    view = storage.read_range_placed("w/c.0", 100, 100 + (2 << 20), room[1:])
    assert bytes(view) == data[100 : 100 + (2 << 20)] and posix.address(view) == posix.address(room) + 1
    assert direct_reads == [100]
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ValueError, match="room"):
            posix.pread_direct_placed(fd, 100, 2 << 20, room[: (2 << 20) + 10])
    finally:
        os.close(fd)
