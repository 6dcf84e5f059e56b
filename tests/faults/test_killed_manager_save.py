"""A CheckpointManager's save killed midway (SIGKILL, 2 spawned ranks) is invisible: no step lists it,
restore goes to the step before, the next manager on the root sweeps its litter, and the run saves the
same step again."""

from __future__ import annotations

import torch

import shardstore
from shardstore.steps import list_steps
from tests.faults.test_killed_saves import (
    BIG_TENSORS, CHUNK_DELAY_S, SMALL_TENSORS, join_group, chunks_in_staging, run_and_kill, seeded_values,
    sharded_values, slow_chunk_writes,
)


def _manager_job(rank: int, port: int, root: str) -> None:
    """Save step 1 (small) completely, then step 2 (64 MiB, slowed) — which the test kills."""
    mesh = join_group(rank, port)
    with shardstore.CheckpointManager(root, max_to_keep=1, async_save=False) as manager:
        manager.save(1, {"model": sharded_values(mesh, 1, SMALL_TENSORS, 64), "step": 1})
        slow_chunk_writes(CHUNK_DELAY_S)
        manager.save(2, {"model": sharded_values(mesh, 2, BIG_TENSORS, 1024), "step": 2})


def _target() -> dict:
    return {"model": {k: torch.zeros_like(v) for k, v in seeded_values(0, SMALL_TENSORS, 64).items()}, "step": -1}


def test_killed_manager_save_is_ignored_swept_and_saved_again(tmp_path):
    root = tmp_path / "run"
    run_and_kill(str(root), chunks_in_staging(root, "step-2"), victim=0, job=_manager_job)
    assert [(e.step, e.complete) for e in list_steps(str(root))] == [(1, True)]  # never listed, even before a sweep
    assert any(p.name.startswith("step-2.") for p in root.iterdir())  # the killed save's litter is there

    manager = shardstore.CheckpointManager(str(root), max_to_keep=1, async_save=False)
    assert manager.all_steps() == [1]
    assert sorted(p.name for p in root.iterdir()) == ["step-1"]  # swept on start
    target = _target()
    assert manager.restore(target) == 1 and target["step"] == 1
    assert all(torch.equal(target["model"][k], v) for k, v in seeded_values(1, SMALL_TENSORS, 64).items())

    assert manager.save(2, {"model": seeded_values(3, SMALL_TENSORS, 64), "step": 3})  # the run goes on
    manager.close()
    assert manager.all_steps() == [2] and sorted(p.name for p in root.iterdir()) == ["step-2"]
    shardstore.load(target, str(root / "step-2"))
    assert target["step"] == 3 and all(torch.equal(target["model"][k], v) for k, v in seeded_values(3, SMALL_TENSORS, 64).items())
