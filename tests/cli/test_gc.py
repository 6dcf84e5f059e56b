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
