"""The object-store commit protocol (docs/format.md §5) on real servers, where a save meets another save,
a damaged pointer, or a URL it cannot commit at."""

from __future__ import annotations

import threading

import pytest
import torch

import shardstore
from shardstore import commit, commit_lock, runs
from shardstore import format as fmt
from shardstore.errors import ConcurrentSaveError, UnsafeKeyError
from shardstore.manager import CheckpointManager
from shardstore.steps import list_steps
from shardstore.storage import CURRENT, Storage
from shardstore.storage.remote import FsspecStorage

PROTOCOLS = ["s3", "gs", "az"]
WAIT_S = 30.0


@pytest.fixture(params=PROTOCOLS)
def server(request, bucket_servers):
    return bucket_servers.get(request.param)


def test_a_bucket_root_is_refused_before_anything_is_written(server):
    """Its commit lock ``<url>.lock`` would be another bucket: an overwrite there failed with the client's
    own traceback (an empty object key) after writing a whole new version."""
    url, options = f"{server.protocol}://{server.new_bucket()}", server.storage_options()
    with pytest.raises(UnsafeKeyError, match="bucket root: a checkpoint needs a prefix of its own"):
        shardstore.save({"w": torch.ones(3)}, url, storage_options=options)
    assert Storage(url, options).is_empty()


def test_a_fresh_save_and_an_overwrite_racing_never_both_return(server, monkeypatch):
    """A fresh save claims the URL and writes in place; an overwrite started meanwhile (it finds an
    interrupted save) writes a version and moves the pointer. The overwrite checks the URL just before
    the fresh save writes its root marker, and the fresh save checks its claim just before the overwrite
    deletes it: both returned, and the fresh save's checkpoint was hidden behind the pointer, then
    deleted."""
    url, options = server.fresh_url(), server.storage_options()
    fresh_claimed, checked, pointer_moved, fresh_done = (threading.Event() for _ in range(4))
    claim_fresh, check_unchanged, delete_old, write_root = (
        commit._claim_fresh, commit._check_unchanged, commit._delete_old_version, fmt.write_root)

    def claimed(target, nonce):
        claim_fresh(target, nonce)
        fresh_claimed.set()

    def check(target, claim):
        check_unchanged(target, claim)
        checked.set()

    def root(dest, record):
        if threading.current_thread().name == "fresh":
            checked.wait(WAIT_S)
        write_root(dest, record)

    def delete_replaced(target, expected, keep):
        pointer_moved.set()
        fresh_done.wait(WAIT_S)
        delete_old(target, expected, keep)

    monkeypatch.setattr(commit, "_claim_fresh", claimed)
    monkeypatch.setattr(commit, "_check_unchanged", check)
    monkeypatch.setattr(commit, "_delete_old_version", delete_replaced)
    monkeypatch.setattr(fmt, "write_root", root)
    outcomes: dict[str, BaseException | None] = {}

    def fresh() -> None:
        try:
            shardstore.save({"w": torch.full((4,), 1.0)}, url, storage_options=options)
            outcomes["fresh"] = None
        except Exception as exc:  # noqa: BLE001 - recorded and checked below
            outcomes["fresh"] = exc
        finally:
            fresh_done.set()

    def overwrite() -> None:
        fresh_claimed.wait(WAIT_S)
        try:
            shardstore.save({"w": torch.full((4,), 2.0)}, url, storage_options=options, overwrite=True)
            outcomes["overwrite"] = None
        except Exception as exc:  # noqa: BLE001
            outcomes["overwrite"] = exc
        finally:
            checked.set()
            pointer_moved.set()

    threads = [threading.Thread(target=f, name=f.__name__) for f in (fresh, overwrite)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    winners = [name for name, exc in outcomes.items() if exc is None]
    assert len(outcomes) == 2 and len(winners) == 1, outcomes
    assert all(isinstance(exc, ConcurrentSaveError) for exc in outcomes.values() if exc is not None), outcomes
    state = {"w": torch.zeros(4)}
    shardstore.load(state, url, storage_options=options)
    assert torch.equal(state["w"], torch.full((4,), 1.0 if winners == ["fresh"] else 2.0))


def test_a_prune_cut_short_never_leaves_an_overwritten_step_listed_with_objects_missing(server, monkeypatch):
    """An overwritten step's root marker is in the version its pointer names; deleting the step went for
    the marker at the top (there is none) and then the rest in any order, so a store failing midway left
    the step listed complete with a shard object gone."""
    base, options = server.fresh_url(), server.storage_options()
    shardstore.save({"w": torch.ones(4)}, f"{base}/step-1", storage_options=options)
    shardstore.save({"w": torch.ones(4) * 2}, f"{base}/step-1", storage_options=options, overwrite=True)
    shardstore.save({"w": torch.ones(4) * 3}, f"{base}/step-2", storage_options=options)

    def fail_midway(self, prefix=""):
        self.delete(next(key for key in self.list(prefix) if fmt.is_object_key(key)))
        raise OSError(f"the store refused to delete the rest of {self.url}")

    monkeypatch.setattr(FsspecStorage, "delete_prefix", fail_midway)
    with pytest.raises(OSError, match="refused"):
        runs.collect(base, keep=1, storage_options=options)
    assert [(e.step, e.complete) for e in list_steps(base, options)] == [(1, False), (2, True)]


@pytest.mark.parametrize("pointer", [b".v-x/../..", b".v-a\\b", b".v-\0"])
def test_an_overwrite_of_a_damaged_pointer_returns_once_committed(server, pointer):
    """``overwrite=True`` replaces a damaged checkpoint. After moving the pointer, the save deleted the
    version the damaged pointer named, taken as a key: it raised ``UnsafeKeyError`` although it had
    committed."""
    url, options = server.fresh_url(), server.storage_options()
    shardstore.save({"w": torch.ones(4)}, url, storage_options=options)
    shardstore.save({"w": torch.ones(4) * 2}, url, storage_options=options, overwrite=True)
    Storage(url, options).write(CURRENT, pointer)
    shardstore.save({"w": torch.ones(4) * 3}, url, storage_options=options, overwrite=True)
    state = {"w": torch.zeros(4)}
    shardstore.load(state, url, storage_options=options)
    assert torch.equal(state["w"], torch.ones(4) * 3)


def test_a_manager_links_unchanged_objects_with_an_uncached_client(server):
    """The manager's saves are incremental: an unchanged object is a server-side copy from the previous
    step. With ``skip_instance_cache=True`` (the options these tests use) each ``Storage`` has a client
    of its own, and the copy was refused as crossing filesystems: every save after the first raised
    ``NotImplementedError``."""
    base, options = server.fresh_url(), server.storage_options()
    assert options["skip_instance_cache"]
    with CheckpointManager(base, max_to_keep=2, async_save=False, storage_options=options) as manager:
        for step in range(3):
            manager.save(step, {"w": torch.ones(64), "step": step})
        assert manager.all_steps() == [1, 2]
        state = {"w": torch.zeros(64), "step": -1}
        assert manager.restore(state) == 2
    assert torch.equal(state["w"], torch.ones(64)) and state["step"] == 2


def test_a_lock_left_by_a_killed_deleter_is_told_and_removed_by_unlock(server, monkeypatch):
    """A lock object outlives its holder: the overwrite that meets it names its age (the store's
    timestamp, read correctly whatever its format and time zone) and the way out; ``unlock`` removes it."""
    url, options = server.fresh_url(), server.storage_options()
    shardstore.save({"w": torch.zeros(4)}, url, storage_options=options)
    target = Storage(url, options)
    target.parent().lock(f"{target.name}.lock", timeout=0)  # never released: its holder was killed
    assert 0 <= commit_lock.lock_age(target) < 120
    monkeypatch.setattr(commit_lock, "LOCK_WAIT_S", 0.5)
    with pytest.raises(ConcurrentSaveError, match=rf"created \d+ s ago.*shardstore unlock {url}"):
        shardstore.save({"w": torch.ones(4)}, url, storage_options=options, overwrite=True)
    with pytest.raises(ConcurrentSaveError, match="not removed"):
        commit_lock.unlock(target, older_than=3600)
    assert 0 <= commit_lock.unlock(target, older_than=0) < 120
    assert commit_lock.lock_age(target) is None and commit_lock.unlock(target, older_than=0) is None
    shardstore.save({"w": torch.ones(4)}, url, storage_options=options, overwrite=True)
    assert torch.equal(shardstore.open(url, storage_options=options).read("w"), torch.ones(4))
