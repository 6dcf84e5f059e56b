"""CheckpointManager on real ranks: retention and keep_period, restoring an older step, a failed save that
changes nothing, and incremental saves (unchanged objects hard-linked, the newer step self-contained)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

import dtensor
import shardstore
from dtensor import Shard
from shardstore.errors import CheckpointExistsError, CheckpointNotFoundError, CorruptCheckpointError, UnsupportedInputError
from shardstore.format import is_object_key
from shardstore.manager import steps_to_delete
from tests.ranks import mesh, run_ranks


def _state(world: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 6, generator=g)
    return {"model": {"w": dtensor.distribute_tensor(w, mesh((world,)), [Shard(0)], src_data_rank=None)}, "step": seed}


def _zeros(world: int) -> dict:
    return {"model": {"w": dtensor.distribute_tensor(torch.zeros(8, 6), mesh((world,)), [Shard(0)], src_data_rank=None)},
            "step": -1}


def _full(state: dict) -> torch.Tensor:
    return state["model"]["w"].full_tensor()


def _retention_and_restore(root: str, world: int, asynchronous: bool):
    seen = []
    with shardstore.CheckpointManager(root, max_to_keep=2, keep_period=4, async_save=asynchronous) as manager:
        for step in range(10):
            state = _state(world, step)
            assert manager.save(step, state)
            state["model"]["w"].to_local().fill_(-1.0)  # mutated right away: the save holds the staged values
            seen.append(manager.all_steps())
        target = _zeros(world)
        assert manager.restore(target, step=4) == 4 and target["step"] == 4
        older = torch.equal(_full(target), _full(_state(world, 4)))
        assert manager.restore(target) == 9 and target["step"] == 9
        latest = torch.equal(_full(target), _full(_state(world, 9)))
        with pytest.raises(CheckpointNotFoundError) as missing:
            manager.restore(target, step=5)
    return seen, older, latest, str(missing.value), sorted(os.listdir(root))


@pytest.mark.parametrize("world, asynchronous", [(1, False), (2, False), (1, True), (2, True)])
def test_retention_keeps_the_newest_and_every_keep_period_step(tmp_path, world, asynchronous):
    root = str(tmp_path / "run")
    for seen, older, latest, missing, listing in run_ranks(world, _retention_and_restore, root, world, asynchronous):
        # A step goes only once a newer one is complete; an async save is listed once the next call saw it commit.
        assert seen[:4] == ([[], [0], [0, 1], [0, 1, 2]] if asynchronous else [[0], [0, 1], [0, 1, 2], [0, 2, 3]])
        assert seen[-1] == ([0, 4, 7, 8] if asynchronous else [0, 4, 8, 9]) and older and latest
        assert missing == (f"step 5 has no complete checkpoint under {root}; complete steps: [0, 4, 8, 9] — "
                           "restore one of those, or the latest with step=None")
        assert listing == ["step-0", "step-4", "step-8", "step-9"]


def _failed_save_changes_nothing(root: str, world: int):
    manager = shardstore.CheckpointManager(root, max_to_keep=1, async_save=False)
    manager.save(1, _state(world, 1))
    with pytest.raises(UnsupportedInputError):
        manager.save(2, {"bad": torch.zeros(2).to_sparse()})
    after_failure = (manager.all_steps(), sorted(os.listdir(root)))
    with pytest.raises(CheckpointExistsError, match="step 1 already has a complete checkpoint"):
        manager.save(1, _state(world, 1), force=True)
    assert manager.save(2, _state(world, 2))  # the run goes on saving
    manager.close()
    return after_failure, manager.all_steps(), sorted(os.listdir(root))


@pytest.mark.parametrize("world", [1, 2])
def test_a_failed_save_deletes_nothing_and_the_run_saves_again(tmp_path, world):
    root = str(tmp_path / "run")
    for after_failure, steps, listing in run_ranks(world, _failed_save_changes_nothing, root, world):
        assert after_failure == ([1], ["step-1"])  # max_to_keep=1, yet step 1 stays: no newer step is complete
        assert steps == [2] and listing == ["step-2"]


def test_should_save_and_interval(tmp_path):
    manager = shardstore.CheckpointManager(str(tmp_path / "run"), save_interval_steps=3, async_save=False)
    assert [manager.should_save(s) for s in range(7)] == [True, False, False, True, False, False, True]
    assert not manager.save(1, {"x": torch.ones(2)}) and manager.all_steps() == []
    assert manager.save(1, {"x": torch.ones(2)}, force=True) and manager.all_steps() == [1]
    assert not manager.should_save(0) and manager.should_save(3) and manager.latest_step() == 1
    with pytest.raises(CheckpointNotFoundError, match="holds no complete checkpoint"):
        shardstore.CheckpointManager(str(tmp_path / "empty")).restore({"x": torch.ones(2)})
    for bad in ({"max_to_keep": 0}, {"keep_period": -1}, {"save_interval_steps": None}):
        with pytest.raises(ValueError, match="must be an int >= 1"):
            shardstore.CheckpointManager(str(tmp_path / "run"), **bad)
    manager.close()
    with pytest.raises(ValueError, match="is closed"):
        manager.save(6, {"x": torch.ones(2)})


def _prepared_then_used(manager: shardstore.CheckpointManager, state: dict, step: int) -> tuple[int, bool]:
    """Once the manager's background preparation has run: how many staging buffers it made, and whether
    its save at ``step`` copied into exactly those."""
    from shardstore import async_saver, staging

    async_saver._background().submit(lambda: None).result(timeout=60)  # the preparation has run
    prepared = {k: b.data_ptr() for k, b in staging.staging_pool()._buffers.items()}
    assert manager.save(step, state)
    manager.wait_until_finished()
    after = {k: b.data_ptr() for k, b in staging.staging_pool()._buffers.items()}
    return len(prepared), prepared == after


def _first_unsaved_step_prepares_the_staging_memory(root: str, world: int):
    from shardstore import staging

    staging._pool = (os.getpid(), staging.StagingPool())  # workers are reused across tests
    with shardstore.CheckpointManager(root, save_interval_steps=2) as manager:
        state = _state(world, 1)
        assert not manager.save(1, state)
        return _prepared_then_used(manager, state, 2)


def test_the_first_step_not_saved_prepares_the_first_async_save(tmp_path):
    assert run_ranks(2, _first_unsaved_step_prepares_the_staging_memory, str(tmp_path / "run"), 2) == [(1, True)] * 2


def _restore_prepares_the_staging_memory(root: str, world: int):
    from shardstore import staging

    with shardstore.CheckpointManager(root, async_save=False) as manager:
        manager.save(1, _state(world, 1))
    staging._pool = (os.getpid(), staging.StagingPool())  # a fresh process's pool: nothing staged yet
    with shardstore.CheckpointManager(root) as manager:  # save_interval_steps=1: no step goes unsaved
        state = _state(world, 0)
        assert manager.restore(state) == 1
        return _prepared_then_used(manager, state, 2)


def test_a_restore_prepares_the_first_async_save_of_the_resumed_run(tmp_path):
    assert run_ranks(2, _restore_prepares_the_staging_memory, str(tmp_path / "run"), 2) == [(1, True)] * 2


@pytest.mark.parametrize("how", ["flipped", "newer"])
def test_a_newest_step_that_does_not_read_is_never_skipped_silently(tmp_path, how):
    """Restoring the latest step refuses, naming it, where the newest step is there but its root record
    does not read (resuming from an older one would go back in training unnoticed); an explicit older
    step restores; the manager neither replaces nor prunes it."""
    from tests.storage.test_steps import damage_root

    root = str(tmp_path / "run")
    with shardstore.CheckpointManager(root, async_save=False) as manager:
        for step in (1, 2):
            manager.save(step, {"w": torch.full((2,), float(step))})
    damage_root(tmp_path / "run" / "step-2", how)
    with shardstore.CheckpointManager(root, max_to_keep=1, async_save=False) as manager:
        assert manager.all_steps() == [1]
        with pytest.raises(CorruptCheckpointError, match="step 2 .* does not read"):
            manager.latest_step()  # None or 1 would make a resuming script start afresh or go back
        target = {"w": torch.zeros(2)}
        with pytest.raises(CorruptCheckpointError, match="step 2 at .*step-2 is there but cannot be restored: its root record does not read") as info:
            manager.restore(target)
        assert "pass step=1" in str(info.value) and torch.equal(target["w"], torch.zeros(2))
        assert manager.restore(target, step=1) == 1 and torch.equal(target["w"], torch.ones(2))
        with pytest.raises(CheckpointExistsError, match="step 2 .* does not read"):
            manager.save(2, {"w": torch.zeros(2)})
        manager.save(3, {"w": torch.full((2,), 3.0)})
    assert sorted(os.listdir(root)) == ["step-2", "step-3"]  # retention pruned step 1, never step 2
    with shardstore.CheckpointManager(root, async_save=False) as manager:
        assert manager.latest_step() == 3  # a complete step newer than the unreadable one
    damage_root(tmp_path / "run" / "step-3", how)
    with shardstore.CheckpointManager(root, async_save=False) as manager:
        with pytest.raises(CorruptCheckpointError, match="no step before it reads either"):
            manager.restore({"w": torch.zeros(2)})


def test_a_forced_save_of_a_step_older_than_the_newest_is_refused(tmp_path):
    """Retention keeps the newest steps: an older step saved after them would be the first deleted (with
    max_to_keep=1 in the very call that wrote it), so the manager refuses it."""
    root = str(tmp_path / "run")
    with shardstore.CheckpointManager(root, max_to_keep=1, async_save=False) as manager:
        manager.save(20, {"w": torch.ones(2)})
        assert manager.save(15, {"w": torch.ones(2)}) is False  # not due: documented
        with pytest.raises(ValueError, match="step 15 is older than the newest step saved .* \\(20\\)"):
            manager.save(15, {"w": torch.ones(2)}, force=True)
        assert manager.all_steps() == [20] and sorted(os.listdir(root)) == ["step-20"]



def _restore_after_steps_deleted_by_hand(root: str, world: int):
    """Steps 1-3 saved; then steps are deleted by hand (rank 0, as an operator would) behind the
    manager's back: restore() of the latest after step 3 goes, of step 2 by number after it goes."""
    import shutil

    def delete_by_hand(step: int) -> None:
        if torch.distributed.get_rank() == 0:
            shutil.rmtree(os.path.join(root, f"step-{step}"))
        torch.distributed.barrier()

    with shardstore.CheckpointManager(root, async_save=False) as manager:
        for step in (1, 2, 3):
            manager.save(step, _state(world, step))
        delete_by_hand(3)
        stale = manager.latest_step()
        target = _zeros(world)
        restored = manager.restore(target)
        exact = target["step"] == 2 and torch.equal(_full(target), _full(_state(world, 2)))
        latest = manager.latest_step()
        delete_by_hand(2)
        with pytest.raises(CheckpointNotFoundError) as missing:
            manager.restore(target, step=2)  # the manager still lists it
        return stale, restored, exact, latest, manager.all_steps(), str(missing.value)


@pytest.mark.parametrize("world", [1, 2])
def test_restore_lists_the_run_again_so_a_step_deleted_by_hand_is_never_chosen(tmp_path, world):
    """The manager keeps the agreed list of steps (``latest_step()`` answers from it, no I/O); restore()
    has rank 0 list the run again and every rank takes that list, so a step deleted since (by an
    operator, another tool) is not restored: the latest one still there is, and asking for the deleted
    one by number says what happened to it."""
    root = str(tmp_path / "run")
    for stale, restored, exact, latest, steps, missing in run_ranks(world, _restore_after_steps_deleted_by_hand, root, world):
        assert stale == 3 and restored == 2 and exact and latest == 2 and steps == [1]
        assert missing == (f"step 2 at {root}/step-2 is no longer a complete checkpoint (it was when this manager "
                           f"last listed {root}: deleted or moved since?); complete steps now: [1] — restore one "
                           "of those, or the latest with step=None")


def test_retention_counts_only_the_steps_still_there(tmp_path):
    """A kept step deleted by hand is no longer one of the ``max_to_keep`` kept: retention does not delete
    an older step in its place (that left fewer steps than asked for), nor the one already gone."""
    import shutil

    root = tmp_path / "run"
    with shardstore.CheckpointManager(str(root), max_to_keep=2, async_save=False) as manager:
        for step in (1, 2):
            manager.save(step, {"w": torch.full((2,), float(step))})
        shutil.rmtree(root / "step-2")
        manager.save(3, {"w": torch.full((2,), 3.0)})
        assert manager.all_steps() == [1, 3] and sorted(os.listdir(root)) == ["step-1", "step-3"]
        manager.save(4, {"w": torch.full((2,), 4.0)})
        assert manager.all_steps() == [3, 4] and sorted(os.listdir(root)) == ["step-3", "step-4"]


def test_a_step_whose_lock_is_held_is_kept_by_retention_and_the_save_still_succeeds(tmp_path, monkeypatch):
    """A lock left on an old step (a process killed while deleting it; on object stores it never
    expires) made every later save commit, then raise ConcurrentSaveError ("re-run the save") from
    retention, after waiting 30 s each: the save is a success, retention waits for the lock no longer
    than a second, the step is kept with a warning naming the lock, and deleted by the first retention
    after the lock is gone."""
    from shardstore import commit_lock
    from shardstore.storage import Storage

    monkeypatch.setattr(commit_lock, "LOCK_WAIT_S", 60.0)  # a commit waits it; retention must not
    root = tmp_path / "run"
    with shardstore.CheckpointManager(str(root), max_to_keep=1, async_save=False) as manager:
        manager.save(1, {"w": torch.full((2,), 1.0)})
        held = Storage(str(root / "step-1"))
        lock = held.parent().lock(f"{held.name}.lock", timeout=5)
        start = time.monotonic()
        with pytest.warns(RuntimeWarning, match=f"retention kept step 1: its lock {root / 'step-1'}.lock stayed held for 1 s"):
            manager.save(2, {"w": torch.full((2,), 2.0)})
        assert time.monotonic() - start < 30  # not the commit's 60 s
        assert manager.all_steps() == [1, 2] and manager.latest_step() == 2
        lock.release()
        manager.save(3, {"w": torch.full((2,), 3.0)})
        assert manager.all_steps() == [3] and sorted(p for p in os.listdir(root) if p.startswith("step-")) == ["step-3"]


def _save_with_per_rank_state(root: str) -> None:
    with shardstore.CheckpointManager(root, async_save=False) as manager:
        manager.save(1, {**_state(2, 1), f"rng.rank{torch.distributed.get_rank()}": torch.full((3,), 7.0)})


def test_a_run_with_per_rank_state_resumes_on_fewer_ranks_with_strict_false(tmp_path):
    root = str(tmp_path / "run")
    run_ranks(2, _save_with_per_rank_state, root)
    manager = shardstore.CheckpointManager(root)
    target = {"model": {"w": torch.zeros(8, 6)}, "step": -1, "rng.rank0": torch.zeros(3)}
    with pytest.raises(shardstore.StateDictMismatchError, match="rng.rank1"):
        manager.restore(target)  # rank 1's state has no rank to go to
    assert manager.restore(target, strict=False) == 1 and target["step"] == 1
    saved = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))  # _state(world, 1)'s values
    assert torch.equal(target["model"]["w"], saved) and target["rng.rank0"].tolist() == [7.0] * 3


def test_steps_to_delete_is_pure_retention():
    assert steps_to_delete([1, 2, 3], None, None) == []
    assert steps_to_delete([3, 1, 2], 1, None) == [1, 2]
    assert steps_to_delete([0, 5, 10, 15, 20], 1, 10) == [5, 15]
    assert steps_to_delete([7], 1, None) == []


# -- incremental saves --------------------------------------------------------------------------------


def _finetune_values(step: int) -> dict[str, torch.Tensor]:
    """Step ``step``'s values: ``frozen`` never changes, ``lora`` always does, and ``touched`` differs from
    step 1 in one element of its first row (an ulp: nothing but a digest of every byte sees it)."""
    frozen = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    touched = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    if step != 1:
        touched[0, 5] = torch.nextafter(touched[0, 5], torch.tensor(float("inf")))
    return {"frozen": frozen, "touched": touched,
            "lora": torch.randn(8, 32, generator=torch.Generator().manual_seed(step))}


def _finetune_state(world: int, step: int, zero: bool = False) -> dict:
    m = mesh((world,))
    state = {k: dtensor.distribute_tensor(torch.zeros_like(v) if zero else v, m, [Shard(0)], src_data_rank=None)
             for k, v in _finetune_values(step).items()}
    return state | {"step": step}


def _exact(state: dict, step: int, values_step: int | None = None) -> bool:
    """Whether ``state`` holds ``step`` and, bit for bit, the values of ``values_step`` (default: ``step``)."""
    expected = _finetune_state(state["frozen"].device_mesh.size(), step if values_step is None else values_step)
    return state["step"] == step and all(
        torch.equal(state[k].full_tensor().view(torch.uint8), expected[k].full_tensor().view(torch.uint8))
        for k in ("frozen", "touched", "lora"))


def _incremental(root: str, world: int, asynchronous: bool):
    with shardstore.CheckpointManager(root, max_to_keep=1, async_save=asynchronous) as manager:
        manager.save(1, _finetune_state(world, 1))
        manager.wait_until_finished()
        inodes = _inodes(Path(root) / "step-1") if torch.distributed.get_rank() == 0 else {}
        manager.save(2, _finetune_state(world, 2))  # lora and one element of touched changed; step 1 then goes
        manager.wait_until_finished()
        steps = manager.all_steps()
        target = _finetune_state(world, -1, zero=True)
        manager.restore(target)
    return steps, _exact(target, 2), inodes


def _inodes(checkpoint: Path) -> dict[str, int]:
    objects = [p.relative_to(checkpoint) for p in checkpoint.rglob("*") if p.is_file()]
    return {str(p): (checkpoint / p).stat().st_ino for p in objects if is_object_key(str(p))}


def _check_zarr_reads(checkpoint: Path, step: int) -> None:
    import zarr

    group = zarr.open_group(str(checkpoint), mode="r")  # any Zarr reader opens a linked checkpoint
    values = _finetune_values(step)
    assert (group["lora"][...] == values["lora"].numpy()).all() and (group["touched"][...] == values["touched"].numpy()).all()
    assert (group["frozen"][...].view("uint16") == values["frozen"].view(torch.int16).numpy().view("uint16")).all()


@pytest.mark.parametrize("world, asynchronous", [(1, False), (2, False), (2, True)])
def test_incremental_save_links_unchanged_objects_and_stands_alone(tmp_path, world, asynchronous):
    root = tmp_path / "run"
    results = run_ranks(world, _incremental, str(root), world, asynchronous)
    old = results[0][2]
    for steps, exact, _ in results:
        assert steps == [2] and exact
    assert sorted(os.listdir(root)) == ["step-2"]  # step 1 is deleted, step 2 loads bit-exact without it
    new = _inodes(root / "step-2")
    assert set(new) == set(old) and len(new) >= 3 * world
    linked = {k for k in new if new[k] == old[k]}
    # frozen: every object a hard link; lora: all rewritten; touched: only the object holding row 0
    assert linked == {k for k in new if k.startswith("frozen/") or (k.startswith("touched/") and k != "touched/c.0.0")}
    _check_zarr_reads(root / "step-2", 2)


def _save_step(root: str, world: int, step: int):
    with shardstore.CheckpointManager(root, async_save=False) as manager:
        manager.save(step, _finetune_state(world, 1) | {"step": step})
        target = _finetune_state(world, -1, zero=True)
        manager.restore(target)
    return _exact(target, step, values_step=1)


def test_a_save_on_another_world_size_links_nothing(tmp_path):
    """Same values, another chunk grid: the object at c.0.0 holds other rows, so a link would be wrong."""
    root = tmp_path / "run"
    assert run_ranks(2, _save_step, str(root), 2, 1) == [True, True]
    before = _inodes(root / "step-1")
    assert run_ranks(1, _save_step, str(root), 1, 2) == [True]
    after = _inodes(root / "step-2")
    assert "frozen/c.0.0" in after and not {k for k in after if before.get(k) == after[k]}
    _check_zarr_reads(root / "step-2", 1)


def test_manager_on_an_object_store_links_by_server_side_copy(monkeypatch):
    import uuid

    import fsspec

    from shardstore.storage.remote import FsspecStorage

    root = f"memory://manager-{uuid.uuid4().hex}/run"
    written: list[str] = []
    write = FsspecStorage.write
    monkeypatch.setattr(FsspecStorage, "write", lambda self, key, data: (written.append(key), write(self, key, data))[1])
    state = {"frozen": torch.randn(64, 32), "lora": torch.randn(8, 32), "step": 1}
    try:
        with shardstore.CheckpointManager(root, max_to_keep=1, async_save=False) as manager:
            manager.save(1, state)
            written.clear()
            state["lora"].add_(1)
            manager.save(2, state)
            assert manager.all_steps() == [2]
            target = {"frozen": torch.zeros(64, 32), "lora": torch.zeros(8, 32), "step": -1}
            assert manager.restore(target) == 2
        assert not [k for k in written if k.startswith("frozen/c")], written  # copied server-side, not written
        assert [k for k in written if k.startswith("lora/c")]
        assert all(torch.equal(target[k], state[k]) for k in ("frozen", "lora")) and target["step"] == 1
    finally:
        fsspec.filesystem("memory").rm(root.split("://")[1].split("/")[0], recursive=True)
