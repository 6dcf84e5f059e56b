"""``shardstore unlock``: a commit lock a killed process left on an object store is removed once it is old
enough, and only then; a local lock held by a live process is never removed."""

from __future__ import annotations

import time
import uuid

import pytest
import torch

import shardstore
from shardstore import commit_lock
from shardstore.errors import ConcurrentSaveError
from shardstore.storage import Storage
from tests.cli.helpers import cli, cli_json


def _left_lock(url: str) -> None:
    """The lock object a process killed while committing to (or deleting) ``url`` leaves: taken, never
    released."""
    target = Storage(url)
    target.parent().lock(f"{target.name}.lock", timeout=0)


@pytest.fixture
def bucket_url():
    url = f"memory://unlock-{uuid.uuid4().hex[:8]}/step-1"
    yield url
    Storage(url).parent().delete_prefix()


def test_a_lock_left_on_an_object_store_blocks_overwrites_until_unlock_removes_it(capsys, monkeypatch, bucket_url):
    shardstore.save({"w": torch.zeros(4)}, bucket_url)
    _left_lock(bucket_url)
    monkeypatch.setattr(commit_lock, "LOCK_WAIT_S", 0.2)
    with pytest.raises(ConcurrentSaveError, match=rf"created \d+ s ago.*`shardstore unlock {bucket_url}` removes it"):
        shardstore.save({"w": torch.ones(4)}, bucket_url, overwrite=True)

    code, _, err = cli(capsys, "unlock", bucket_url)  # just made: younger than the default 600 s
    assert code == 2 and f"{bucket_url}.lock was created 0 s ago, under the 600 s asked for" in err
    assert commit_lock.lock_age(Storage(bucket_url)) is not None

    code, out, _ = cli(capsys, "unlock", bucket_url, "--older-than", "0")
    assert code == 0 and out.startswith(f"removed {bucket_url}.lock, created 0 s ago")
    assert commit_lock.lock_age(Storage(bucket_url)) is None
    shardstore.save({"w": torch.ones(4)}, bucket_url, overwrite=True)
    assert torch.equal(shardstore.open(bucket_url).read("w"), torch.ones(4))

    assert cli_json(capsys, "unlock", bucket_url) == (0, {"url": bucket_url, "lock": f"{bucket_url}.lock",
                                                         "removed": False, "age_s": None})


def test_the_age_is_the_store_clock_against_this_hosts(capsys, monkeypatch, bucket_url):
    """A lock taken 1000 s ago (this host's clock moved on) is past the default and removed, its age told."""
    _left_lock(bucket_url)
    now = time.time()
    monkeypatch.setattr(commit_lock.time, "time", lambda: now + 1000)
    code, result = cli_json(capsys, "unlock", bucket_url)
    assert code == 0 and result["removed"] and 999 <= result["age_s"] <= 1010


def test_a_local_lock_held_by_a_live_process_is_never_removed(capsys, tmp_path):
    url = str(tmp_path / "step-1")
    shardstore.save({"w": torch.zeros(4)}, url)
    held = Storage(url).parent().lock("step-1.lock", timeout=0)
    code, _, err = cli(capsys, "unlock", url, "--older-than", "0")
    assert code == 2 and "held by a running process" in err and held.held()
    held.release()
    (tmp_path / "step-1.lock").write_bytes(b"")  # what a killed holder leaves: a file no process locks
    code, out, _ = cli(capsys, "unlock", url)
    assert code == 0 and "no lock held" in out and not (tmp_path / "step-1.lock").exists()


def test_unlock_of_a_url_with_nothing_beside_it_creates_nothing(capsys, tmp_path):
    code, out, _ = cli(capsys, "unlock", str(tmp_path / "run" / "step-1"))
    assert code == 0 and "no lock held" in out and not (tmp_path / "run").exists()


def test_a_lock_released_and_taken_again_while_looked_at_is_not_removed(monkeypatch, bucket_url):
    target = Storage(bucket_url)
    _left_lock(bucket_url)
    real = commit_lock.lock_age

    def retaken(t):  # between unlock's first look and its removal, the holder finishes and another takes it
        target.parent().delete("step-1.lock")
        _left_lock(bucket_url)
        return real(t)

    monkeypatch.setattr(commit_lock, "lock_age", retaken)
    with pytest.raises(ConcurrentSaveError, match="released and taken again"):
        commit_lock.unlock(target, older_than=0)
    assert real(target) is not None  # the new holder keeps its lock
