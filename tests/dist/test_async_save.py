"""async_save on real ranks: the saved values are those of the moment of the call even when every tensor
is mutated right after it returns; background errors are raised by every rank's result(); a second save
waits for (or refuses to overlap) the first; staging memory is reused across saves."""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import dtensor
import shardstore
from shardstore import staging
from shardstore.staging import StagingPool, staging_pool
from shardstore.storage import Storage
from tests.ranks import mesh, run_ranks


def _state(world: int, fill: float | None = None) -> dict:
    """A DTensor sharded over the world's mesh, a replicated plain tensor and a plain value."""
    full = torch.arange(24 * 16, dtype=torch.float32).reshape(24, 16) if fill is None else torch.full((24, 16), fill)
    m, placements = (mesh((2, 2)), [dtensor.Shard(0), dtensor.Shard(1)]) if world == 4 else (mesh((world,)), [dtensor.Shard(0)])
    bias = torch.linspace(-1, 1, 40, dtype=torch.bfloat16) if fill is None else torch.full((40,), fill, dtype=torch.bfloat16)
    return {
        "model": {"w": dtensor.distribute_tensor(full, m, placements, src_data_rank=None), "b": bias},
        "step": 3 if fill is None else -1,
    }


def _mutate(state: dict) -> None:
    state["model"]["w"].to_local().add_(1000)
    state["model"]["b"].mul_(-3)
    state["step"] = 99


def _saved_values_are_those_of_the_call(url: str, budget: int | None) -> bool:
    world = dist.get_world_size()
    state = _state(world)
    handle = shardstore.async_save(state, url, max_staging_bytes=budget)
    _mutate(state)
    handle.result(timeout=60)
    target = _state(world, fill=0.0)
    shardstore.load(target, url)
    expected = _state(world)
    return (
        torch.equal(target["model"]["w"].to_local(), expected["model"]["w"].to_local())
        and torch.equal(target["model"]["b"], expected["model"]["b"])
        and target["step"] == 3 and handle.done()
    )


@pytest.mark.parametrize("world, budget", [(1, None), (2, None), (2, 512), (4, None), (4, 256)])
def test_mutating_right_after_the_call_changes_nothing_saved(tmp_path: Path, world: int, budget: int | None):
    # budget 512 / 256: several waves of staging, the caller waiting for the writer between them
    assert run_ranks(world, _saved_values_are_those_of_the_call, str(tmp_path / "ckpt"), budget) == [True] * world


def _error_from_result(url: str, overwrite: bool) -> tuple[str, str]:
    handle = shardstore.async_save(_state(dist.get_world_size()), url, overwrite=overwrite)
    try:
        handle.result(timeout=60)
    except Exception as exc:  # noqa: BLE001 - the test compares types and messages
        return type(exc).__name__, str(exc)
    return "no error", ""


def test_user_metadata_changed_right_after_the_call_is_saved_as_it_was(tmp_path: Path):
    """What is saved is the state at the moment of the call, user_metadata included: a change to it (or
    a value no JSON holds, added after the up-front check) never reaches the checkpoint."""
    meta = {"step": 1, "tags": ["a"], "nested": {"lr": 0.1}}
    handle = shardstore.async_save({"w": torch.ones(4)}, str(tmp_path / "ck"), user_metadata=meta)
    meta["step"], meta["nested"]["lr"] = 2, object()
    meta["tags"].append("b")
    handle.result()
    assert shardstore.open(str(tmp_path / "ck")).user_metadata == {"step": 1, "tags": ["a"], "nested": {"lr": 0.1}}


def test_an_unwritable_url_raises_from_result_on_every_rank(tmp_path: Path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the checkpoint's parent directory should be")
    results = run_ranks(2, _error_from_result, str(blocker / "ckpt"), False)
    assert results[0][0] == "NotADirectoryError"
    assert results[1][0] == "RemoteRankError" and "claiming the checkpoint URL failed on rank 0" in results[1][1]
    assert sorted(os.listdir(tmp_path)) == ["not-a-dir"] and blocker.read_text().startswith("a file")


def _checkpoint_values(url: str) -> list[float]:
    return shardstore.open(url).read("model.w")[0, :3].tolist()


def test_a_url_another_save_took_raises_from_result_on_every_rank(tmp_path: Path):
    url = str(tmp_path / "ckpt")
    run_ranks(2, _saved_values_are_those_of_the_call, url, None)  # the other save took the URL
    listing = sorted(os.listdir(tmp_path))
    results = run_ranks(2, _error_from_result, url, False)
    assert results[0][0] == "CheckpointExistsError" and "pass overwrite=True" in results[0][1]
    assert results[1][0] == "RemoteRankError" and "CheckpointExistsError" in results[1][1]
    assert sorted(os.listdir(tmp_path)) == listing and _checkpoint_values(url) == [0.0, 1.0, 2.0]


def _hold_commit_lock(url: str):
    """Rank 0 holds the URL's commit lock, so a save there stays in flight until it is released."""
    return Storage(url).parent().lock(f"{Storage(url).name}.lock", timeout=5) if dist.get_rank() == 0 else None


def _second_save_refused_while_first_in_flight(url: str) -> tuple[str, bool]:
    lock = _hold_commit_lock(url + "-1")
    first = shardstore.async_save(_state(2), url + "-1")
    try:
        shardstore.async_save(_state(2), url + "-2", wait_for_previous=False)
        outcome = "no error"
    except shardstore.SaveInProgressError as exc:
        outcome = f"SaveInProgressError: {exc}"
    if lock is not None:
        lock.release()
    first.result(timeout=60)
    return outcome, os.path.exists(url + "-2")


def test_a_second_save_that_must_not_wait_raises_on_every_rank(tmp_path: Path):
    url = str(tmp_path / "ckpt")
    results = run_ranks(2, _second_save_refused_while_first_in_flight, url)
    for outcome, second_exists in results:
        assert outcome.startswith("SaveInProgressError: an async save (to") and "rank(s) [0" in outcome
        assert not second_exists
    assert _checkpoint_values(url + "-1") == [0.0, 1.0, 2.0]


def _second_save_waits_for_the_first(url: str) -> tuple[bool, bool]:
    lock = _hold_commit_lock(url + "-1")
    first = shardstore.async_save(_state(2), url + "-1")
    if lock is not None:
        threading.Timer(2.0, lock.release).start()  # long enough to be seen in flight
    was_in_flight = not first.done()
    second = shardstore.async_save(_state(2), url + "-2")  # returns only after the first ended
    finished_first = first.done()
    second.result(timeout=60)
    return was_in_flight, finished_first


def test_a_second_save_waits_for_the_first(tmp_path: Path):
    url = str(tmp_path / "ckpt")
    assert run_ranks(2, _second_save_waits_for_the_first, url) == [(True, True)] * 2
    assert _checkpoint_values(url + "-1") == _checkpoint_values(url + "-2") == [0.0, 1.0, 2.0]


def _pool_sizes_over_saves(url: str, saves: int) -> list[tuple[int, int]]:
    sizes = []
    state = _state(2)
    for i in range(saves):
        shardstore.async_save(state, f"{url}-{i}").result(timeout=60)
        _mutate(state)
        sizes.append((staging_pool().nbytes(), staging_pool().buffer(0, 1, False).data_ptr()))
    return sizes


def test_staging_memory_is_reused_across_saves(tmp_path: Path):
    for sizes in run_ranks(2, _pool_sizes_over_saves, str(tmp_path / "ckpt"), 3):
        assert sizes[0][0] > 0 and len(set(sizes)) == 1  # same bytes, same buffer, every save


def _fresh_pool() -> StagingPool:
    """Give this worker process an empty staging pool (workers are reused across tests)."""
    staging._pool = (os.getpid(), StagingPool())
    return staging._pool[1]


def _prepared_memory_is_what_the_save_copies_into(url: str, budget: int | None):
    pool = _fresh_pool()
    state = _state(dist.get_world_size())
    shardstore.prepare_async_save(state, max_staging_bytes=budget).result(timeout=60)
    prepared = dict(pool._buffers)
    saved = _saved_values_are_those_of_the_call(url, budget)
    return len(prepared), saved, {k: b.data_ptr() for k, b in prepared.items()} == {k: b.data_ptr() for k, b in pool._buffers.items()}


@pytest.mark.parametrize("budget, slots", [(None, 1), (512, 2)])
def test_a_prepared_first_save_copies_into_memory_already_faulted_in(tmp_path: Path, budget: int | None, slots: int):
    # with 512 bytes: a rank whose cells take several waves alternates two buffers, both prepared
    result = run_ranks(2, _prepared_memory_is_what_the_save_copies_into, str(tmp_path / "ckpt"), budget)
    assert [r[1:] for r in result] == [(True, True)] * 2 and max(r[0] for r in result) == slots


def _odd_tensors() -> dict:
    """Tensors whose staged copy is easy to get wrong: strided views, lazy conjugates, 0-d, bool, empty."""
    base = torch.arange(60, dtype=torch.float64).reshape(6, 10)
    return {
        "transposed": base.t()[2:7],
        "conj": torch.complex(base[:2], -base[:2]).conj(),
        "scalar": torch.tensor(2.5),
        "mask": base[0] > 4,
        "empty": torch.zeros(0, 3),
        "bf16": torch.linspace(0, 1, 7, dtype=torch.bfloat16),
    }


def test_without_a_process_group_odd_tensors_are_staged_exactly(tmp_path: Path):
    state = _odd_tensors()
    handle = shardstore.async_save(state, str(tmp_path / "ckpt"), max_staging_bytes=128)
    for value in state.values():
        (value.conj() if value.is_conj() else value).zero_()  # the conjugate's own memory too
    result = handle.result(timeout=60)
    target = {k: torch.ones_like(v.resolve_conj()) for k, v in _odd_tensors().items()}
    shardstore.load(target, str(tmp_path / "ckpt"))
    for key, value in _odd_tensors().items():
        assert torch.equal(target[key], value.resolve_conj()), key
    assert result.url == str(tmp_path / "ckpt") and result.chunks_written == 5 and handle.done()


@pytest.mark.parametrize("ending", ["", "raise SystemExit(3)"])
def test_a_script_that_ends_without_waiting_still_commits_its_last_save(tmp_path: Path, ending: str):
    import subprocess
    import sys

    url = str(tmp_path / "ckpt")
    code = f"import torch, shardstore\nshardstore.async_save({{'w': torch.arange(float(1 << 20))}}, {url!r})\n{ending}\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == (3 if ending else 0) and "failed" not in done.stderr, done.stderr
    target = {"w": torch.zeros(1 << 20)}
    shardstore.load(target, url)
    assert torch.equal(target["w"], torch.arange(float(1 << 20)))


@pytest.mark.parametrize("ending", ["", "import time\ntime.sleep(3)"])  # still running at exit, or failed before
def test_a_save_that_failed_unseen_by_the_scripts_end_says_so(tmp_path: Path, ending: str):
    import subprocess
    import sys

    url = str(tmp_path / "ckpt")
    shardstore.save({"w": torch.zeros(4)}, url)
    code = f"import torch, shardstore\nshardstore.async_save({{'w': torch.ones(4)}}, {url!r})\n{ending}\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert f"the async save to {url} failed, its result() never asked for: CheckpointExistsError" in done.stderr


def _async_save_in_a_child(url: str) -> None:
    shardstore.async_save({"w": torch.ones(4)}, url).result(timeout=30)


def test_a_child_forked_while_a_save_is_in_flight_saves_without_waiting_for_it(tmp_path: Path):
    """The parent's writer thread is not in the child, so its save never ends there: not waited for."""
    import multiprocessing

    held = Storage(str(tmp_path / "parent"))
    lock = held.parent().lock(f"{held.name}.lock", timeout=5)  # the parent's save stays in flight until released
    parent = shardstore.async_save({"w": torch.zeros(4)}, str(tmp_path / "parent"))
    child = multiprocessing.get_context("fork").Process(target=_async_save_in_a_child, args=(str(tmp_path / "child"),))
    child.start()
    child.join(30)
    if child.is_alive():
        child.kill()
    lock.release()
    parent.result(timeout=60)
    assert child.exitcode == 0, "the forked child waited for its parent's save"
    assert parent.done() and shardstore.open(str(tmp_path / "child")).read("w").tolist() == [1.0] * 4


def test_a_failed_save_nobody_asked_about_is_reported_by_the_next_one(tmp_path: Path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the checkpoint's parent directory should be")
    state = {"w": torch.arange(6.0)}
    shardstore.async_save(state, str(blocker / "ckpt"))  # fails in the background; result() never asked
    with pytest.warns(RuntimeWarning, match=f"async save, to {blocker / 'ckpt'}, failed .* NotADirectoryError"):
        second = shardstore.async_save(state, str(tmp_path / "ok"))
    second.result(timeout=60)
    failed = shardstore.async_save(state, str(blocker / "again"))
    with pytest.raises(NotADirectoryError):
        failed.result(timeout=60)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failure the caller has seen is not reported again
        shardstore.async_save(state, str(tmp_path / "ok2")).result(timeout=60)


def test_a_poll_that_timed_out_does_not_count_as_seeing_the_failure(tmp_path: Path, monkeypatch):
    """``result(timeout=...)`` raising TimeoutError saw nothing: the save failing afterwards is still
    reported by the next save (it was taken as seen, so the checkpoint went missing silently)."""
    from shardstore import async_saver

    go = threading.Event()
    real = async_saver.write_and_commit

    def failing_later(*args, **kwargs):
        if not go.wait(60):
            raise AssertionError("never released")
        raise OSError("disk gone")

    monkeypatch.setattr(async_saver, "write_and_commit", failing_later)
    url, state = str(tmp_path / "ck"), {"w": torch.arange(6.0)}
    pending = shardstore.async_save(state, url)
    with pytest.raises(TimeoutError):
        pending.result(timeout=0.2)
    go.set()
    with pytest.raises(OSError, match="disk gone"):
        pending._future.result(timeout=60)  # ended, unseen by the caller
    monkeypatch.setattr(async_saver, "write_and_commit", real)
    with pytest.warns(RuntimeWarning, match=f"async save, to {url}, failed .* disk gone"):
        shardstore.async_save(state, str(tmp_path / "ok")).result(timeout=60)
