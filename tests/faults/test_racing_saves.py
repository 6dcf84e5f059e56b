"""Exclusive commits: real processes racing to save to one URL, many trials.

Four spawned processes (no process group: each is its own single-rank save) meet at a barrier, then all
save to the same URL at once, each a state dict whose every tensor and value says who wrote it. For
every trial: exactly one save succeeds, every other raises ``ConcurrentSaveError`` (or, for a fresh URL,
``CheckpointExistsError`` when it started after the winner committed), and what loads is entirely the
winner's. Nothing is left beside the URL. Once fresh, once with ``overwrite=True`` over a checkpoint.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
import torch

import shardstore

WRITERS = 4
TRIALS = 12
TENSORS = 6


def _state(writer: int) -> dict:
    return {"model": {f"w{i}": torch.full((64, 32), float(writer)) for i in range(TENSORS)}, "step": writer}


def _racer(writer: int, root: str, overwrite: bool, barrier, results) -> None:
    torch.set_num_threads(1)
    for trial in range(TRIALS):
        barrier.wait()
        try:
            shardstore.save(_state(writer), f"{root}/t{trial}", overwrite=overwrite)
            outcome = "ok"
        except shardstore.CheckpointExistsError as exc:
            outcome = type(exc).__name__
        except Exception as exc:  # noqa: BLE001 - reported to the test as a failure
            outcome = f"unexpected {type(exc).__name__}: {exc}"
        results.put((trial, writer, outcome))


def _race(root: Path, overwrite: bool) -> dict[int, dict[int, str]]:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(WRITERS), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(w, str(root), overwrite, barrier, results)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    outcomes: dict[int, dict[int, str]] = {}
    for _ in range(WRITERS * TRIALS):
        trial, writer, outcome = results.get(timeout=240)
        outcomes.setdefault(trial, {})[writer] = outcome
    for p in procs:
        p.join(30)
    return outcomes


@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "overwrite"])
def test_racing_saves_one_wins_and_the_checkpoint_is_all_its_own(tmp_path, overwrite):
    if overwrite:
        for trial in range(TRIALS):
            shardstore.save(_state(99), str(tmp_path / f"t{trial}"))
    outcomes = _race(tmp_path, overwrite)
    for trial, by_writer in sorted(outcomes.items()):
        winners = [w for w, outcome in by_writer.items() if outcome == "ok"]
        losers = {outcome for outcome in by_writer.values() if outcome != "ok"}
        assert len(winners) == 1, f"trial {trial}: {by_writer}"
        assert losers <= {"ConcurrentSaveError", "CheckpointExistsError"}, f"trial {trial}: {by_writer}"
        loaded = {"model": {f"w{i}": torch.zeros(64, 32) for i in range(TENSORS)}, "step": -1}
        shardstore.load(loaded, str(tmp_path / f"t{trial}"))
        assert loaded["step"] == winners[0], f"trial {trial}"
        for name, t in loaded["model"].items():
            assert torch.all(t == winners[0]), f"trial {trial}: {name} mixes writers"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"t{t}" for t in range(TRIALS))
