"""``shardstore gc`` cut short: whatever it managed to delete, every step still listed as complete loads."""

from __future__ import annotations

import os

import pytest
import torch

import shardstore
from shardstore.manager import CheckpointManager
from shardstore.steps import list_steps, step_url
from tests.cli.helpers import cli


def _state(step: int) -> dict:
    return {"model": {name: torch.full((64,), float(step)) for name in ("a", "b", "c", "d")}, "step": step}


def _failing_unlink(monkeypatch, allowed: int) -> list[str]:
    """``os.unlink`` (used by every local delete, ``rmtree`` included) fails after ``allowed`` calls."""
    real, done = os.unlink, []

    def unlink(path, *args, **kwargs):
        if len(done) >= allowed:
            raise PermissionError(13, "injected failure", str(path))
        real(path, *args, **kwargs)
        done.append(str(path))

    monkeypatch.setattr(os, "unlink", unlink)
    return done


@pytest.mark.parametrize("allowed", [0, 1, 3, 9])
def test_gc_cut_short_never_leaves_a_complete_step_that_cannot_load(capsys, monkeypatch, tmp_path, allowed):
    root = str(tmp_path / "run")
    for step in (1, 2, 3):
        shardstore.save(_state(step), step_url(root, step), durable=False)
    deleted = _failing_unlink(monkeypatch, allowed)
    code, _, err = cli(capsys, "gc", root, "--keep", "1")
    assert code == 2 and "injected failure" in err, err
    assert len(deleted) == allowed
    monkeypatch.undo()
    listed = [e.step for e in list_steps(root) if e.complete]
    assert 3 in listed  # the newest complete step is never touched
    manager = CheckpointManager(root, async_save=False)
    assert manager.all_steps() == listed
    for step in listed:  # listed as complete: every tensor loads (checksummed), plain values too
        state = _state(0)
        assert manager.restore(state, step) == step
        assert state["step"] == step and all(torch.equal(t, torch.full((64,), float(step))) for t in state["model"].values())
    manager.close()
    assert cli(capsys, "gc", root, "--keep", "1")[0] == 0  # a second run finishes the job
    assert sorted(os.listdir(root)) == ["step-3"]


@pytest.mark.parametrize("where", ["local", "memory"])
def test_gc_keeps_a_step_whose_lock_is_held_and_deletes_the_others(capsys, tmp_path, where):
    """Locally a live process holds the lock; on an object store a killed process left it. Either way gc
    waits for it 1 s (not a commit's 30 s), reports the step as locked, and deletes the rest; once the
    left lock is removed (``unlock``), the next gc deletes the step."""
    from shardstore.storage import Storage
    from tests.cli.helpers import cli_json

    root = str(tmp_path / "run") if where == "local" else f"memory://gc-locked-{tmp_path.name}/run"
    for step in (1, 2, 3):
        shardstore.save(_state(step), step_url(root, step), durable=False)
    lock = Storage(root).lock("step-1.lock", timeout=0)
    try:
        code, out, _ = cli(capsys, "gc", root, "--keep", "1")
        assert code == 0 and f"kept step 1: its commit lock {step_url(root, 1)}.lock is held" in out, out
        assert f"`shardstore unlock {step_url(root, 1)}`" in out and "deleted step 2 (complete)" in out
        assert [e.step for e in list_steps(root)] == [1, 3]
        assert cli_json(capsys, "gc", root, "--keep", "1")[1]["locked"][0]["step"] == 1
        if where == "memory":
            assert cli(capsys, "unlock", step_url(root, 1), "--older-than", "0")[0] == 0
    finally:
        if where == "local":
            lock.release()
    assert cli(capsys, "gc", root, "--keep", "1")[0] == 0
    assert [e.step for e in list_steps(root)] == [3]
    if where == "memory":
        Storage(root).delete_prefix()
