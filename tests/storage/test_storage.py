"""One conformance suite for ``Storage``, run against every backend.

The ``storage`` fixture (conftest.py) is parametrized over backends; add a backend there and every
test below runs against it (S3, GCS and Azure servers included).
"""

from __future__ import annotations

import pytest

from shardstore.errors import CorruptCheckpointError, MissingChunkError, UnsafeKeyError


def test_write_then_read_round_trips_bytes_and_memoryview(storage):
    storage.write("a/b/c", b"hello")
    storage.write("m", memoryview(bytearray(b"xyz")))
    assert storage.read("a/b/c") == b"hello"
    assert storage.read("m") == b"xyz"
    assert isinstance(storage.read("m"), bytearray)  # writable: a tensor can view it without a copy


def test_overwrite_replaces_the_object(storage):
    storage.write("k", b"old-old-old")
    storage.write("k", b"new")
    assert storage.read("k") == b"new"
    assert storage.list() == ["k"]  # no temporary objects left behind


def test_read_range_forms(storage):
    storage.write("r", bytes(range(10)))
    assert storage.read_range("r", 2, 5) == bytes([2, 3, 4])
    assert storage.read_range("r", -3, None) == bytes([7, 8, 9])
    assert storage.read_range("r", 4, None) == bytes(range(4, 10))
    assert storage.read_range("r", 3, 3) == b""


def test_read_range_past_the_end_is_a_truncation_error(storage):
    storage.write("r", bytes(10))
    with pytest.raises(CorruptCheckpointError, match=r"truncated.*expected 5 bytes.*got 2"):
        storage.read_range("r", 8, 13)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        storage.read_range("r", -20, None)


def test_read_ranges_keeps_request_order(storage):
    for i in range(5):
        storage.write(f"x/{i}", bytes([i]) * 8)
    requests = [(f"x/{i % 5}", i % 3, i % 3 + 2) for i in range(20)]
    assert storage.read_ranges(requests) == [bytes([i % 5]) * 2 for i in range(20)]
    assert storage.read_ranges([]) == []


def test_exists_size_list_delete(storage):
    assert not storage.exists("a/x")
    storage.write("a/x", b"12345")
    storage.write("a/y/z", b"1")
    storage.write("b", b"")
    assert storage.exists("a/x") and not storage.exists("a")  # a "directory" is not an object
    assert storage.size("a/x") == 5 and storage.size("b") == 0
    assert storage.list() == ["a/x", "a/y/z", "b"]
    assert storage.list("a") == ["a/x", "a/y/z"]
    assert storage.list("nothing") == []
    storage.delete("a/x")
    storage.delete("a/x")  # idempotent
    assert storage.list() == ["a/y/z", "b"]
    storage.delete_prefix("a")
    assert storage.list() == ["b"]
    storage.delete_prefix()
    assert storage.list() == [] and storage.is_empty()


def test_writes_go_on_after_a_subtree_is_deleted_through_another_view(storage):
    """A writer that created ``a/b`` once must not trust that it still exists: a child view of the same
    tree (a sweep, a retention pass) may have removed it since."""
    storage.write("a/b/x", b"1")
    storage.child("a").delete_prefix()
    storage.write("a/b/y", b"2")
    assert storage.list() == ["a/b/y"] and storage.read("a/b/y") == b"2"


def test_fingerprint_changes_when_an_object_is_replaced(storage):
    storage.write("k", b"abc")
    first = storage.fingerprint("k")
    assert storage.fingerprint("k") == first  # stable while nothing changes
    storage.write("k", b"abd")
    assert storage.fingerprint("k") != first
    second = storage.fingerprint("k")
    storage.write("k", b"abd")  # same bytes, but replaced: S3 reports the bytes' MD5 and whole seconds only
    assert storage.fingerprint("k") != second or storage.url.startswith("s3://")
    storage.delete("k")
    with pytest.raises(MissingChunkError, match="does not exist"):
        storage.fingerprint("k")


def test_is_empty(storage):
    assert storage.is_empty()
    storage.write("deep/down/k", b"1")
    assert not storage.is_empty()


@pytest.mark.parametrize("op", ["read", "size", "read_range"])
def test_missing_key_names_the_full_url(storage, op):
    args = {"read": ("nope/k",), "size": ("nope/k",), "read_range": ("nope/k", 0, 1)}[op]
    with pytest.raises(MissingChunkError) as info:
        getattr(storage, op)(*args)
    assert storage.url + "/nope/k" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/./b", "../x", "a/..", "a\\b", "a\0b", "a/"])
def test_unsafe_keys_are_rejected_naming_key_and_root(storage, key):
    for call in (lambda: storage.write(key, b"x"), lambda: storage.read(key), lambda: storage.exists(key)):
        with pytest.raises(UnsafeKeyError) as info:
            call()
        assert repr(key) in str(info.value) and storage.url in str(info.value)


def test_child_is_rooted_under_the_prefix(storage):
    child = storage.child("model/w")
    child.write("c/0", b"abc")
    assert storage.read("model/w/c/0") == b"abc"
    assert child.list() == ["c/0"]
    assert child.url == storage.url + "/model/w"
    with pytest.raises(UnsafeKeyError):
        storage.child("../escape")


def test_parent_and_copy(storage):
    storage.write("k", b"v")
    sib = storage.parent().child(storage.name + ".staging-1")
    assert sib.url == storage.url + ".staging-1"
    storage.copy_to("k", sib)
    assert sib.read("k") == b"v" and storage.list() == ["k"]
    assert storage.parent().list_names(storage.name) == [storage.name, storage.name + ".staging-1"]


def test_create_exclusive_has_one_winner(storage):
    storage.create_exclusive("claim", b"first")
    with pytest.raises(FileExistsError):
        storage.create_exclusive("claim", b"second")
    assert storage.read("claim") == b"first" and storage.list() == ["claim"]


def test_lock_excludes_and_is_removed_on_release(storage):
    held = storage.lock("x.lock", timeout=0)
    with pytest.raises(TimeoutError, match="x.lock"):
        storage.lock("x.lock", timeout=0.05)
    assert held.held()
    held.release()
    assert not storage.exists("x.lock")
    with storage.lock("x.lock", timeout=0) as again:
        assert again.held()


def test_a_local_lock_whose_file_cannot_be_removed_is_still_released(tmp_path, monkeypatch):
    """Releasing removes the lock file, then unlocks it. Where the removal fails (a failing disk), the
    lock is unlocked all the same: held on, every later taker in this process would time out."""
    from shardstore.storage import Storage, posix

    storage = Storage(str(tmp_path))
    held = storage.lock("x.lock", timeout=0)
    monkeypatch.setattr(posix, "unlink", lambda path: (_ for _ in ()).throw(PermissionError(13, "injected", path)))
    with pytest.raises(PermissionError, match="injected"):
        held.release()
    monkeypatch.undo()
    with storage.lock("x.lock", timeout=0) as again:
        assert again.held()


def test_read_ranges_into_one_reused_buffer(storage):
    storage.write("a", bytes(range(10)))
    storage.write("b", bytes(range(100, 110)))
    out = bytearray(16)
    views = storage.read_ranges_into([("a", 2, 5), ("b", 0, 4), ("a", 8, 10)], out)
    assert [bytes(v) for v in views] == [bytes([2, 3, 4]), bytes(range(100, 104)), bytes([8, 9])]
    assert out[:9] == bytes([2, 3, 4, 100, 101, 102, 103, 8, 9])  # packed in request order
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        storage.read_range_into("a", 8, bytearray(4))
    with pytest.raises(ValueError, match="buffer holds 16"):
        storage.read_ranges_into([("a", 0, 10), ("b", 0, 10)], out)
