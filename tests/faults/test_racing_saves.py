"""Exclusive commits: real processes racing to save to one URL, many trials.

Four spawned processes (no process group: each is its own single-rank save) meet at a barrier, then all
save to the same URL at once, each a state dict whose every tensor and value says who wrote it. Each
racer records when its save claimed the URL and when it committed (``CLOCK_MONOTONIC``, shared by the
processes). For every trial: the saves that succeeded never overlapped (each began after the previous
one committed: a later ``overwrite=True`` save legitimately replaces an earlier one), so at most one of
the truly concurrent ones won; every other raises ``ConcurrentSaveError`` (or, for a fresh URL,
``CheckpointExistsError`` when it began after the winner committed); and what loads is entirely the
last winner's. Nothing is left beside the URL. Once fresh, once with ``overwrite=True``.
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
import time
from pathlib import Path

import pytest
import torch

import shardstore

WRITERS = 4
TRIALS = 12
TENSORS = 6


def _state(writer: int) -> dict:
    return {"model": {f"w{i}": torch.full((64, 32), float(writer)) for i in range(TENSORS)}, "step": writer}


def _timed(times: dict, name: str, fn):
    """``fn`` recording when it returned (the moment a claim or a commit took effect) in ``times``."""

    def wrapper(*args, **kwargs):
        result = fn(*args, **kwargs)
        times[name] = time.monotonic()
        return result

    return wrapper


def _racer(writer: int, root: str, overwrite: bool, barrier, results) -> None:
    from shardstore import commit

    torch.set_num_threads(1)
    shardstore.save(_state(writer), f"{root}/warm-up-{writer}")  # first-call costs out of the race
    times: dict[str, float] = {}
    commit.begin = _timed(times, "claimed", commit.begin)
    commit.finish = _timed(times, "committed", commit.finish)
    for trial in range(TRIALS):
        times.clear()
        barrier.wait()
        try:
            shardstore.save(_state(writer), f"{root}/t{trial}", overwrite=overwrite)
            outcome = "ok"
        except shardstore.CheckpointExistsError as exc:
            outcome = type(exc).__name__
        except Exception as exc:  # noqa: BLE001 - reported to the test as a failure
            outcome = f"unexpected {type(exc).__name__}: {exc}"
        results.put((trial, writer, outcome, dict(times)))


def _race(root: Path, overwrite: bool) -> dict[int, dict[int, tuple[str, dict]]]:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(WRITERS), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(w, str(root), overwrite, barrier, results)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    outcomes: dict[int, dict[int, tuple[str, dict]]] = {}
    for _ in range(WRITERS * TRIALS):
        trial, writer, outcome, times = results.get(timeout=240)
        outcomes.setdefault(trial, {})[writer] = (outcome, times)
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
        winners = sorted((times["committed"], w, times["claimed"]) for w, (outcome, times) in by_writer.items() if outcome == "ok")
        losers = {outcome for outcome, _ in by_writer.values() if outcome != "ok"}
        assert winners, f"trial {trial}: nobody committed: {by_writer}"
        assert losers <= {"ConcurrentSaveError", "CheckpointExistsError"}, f"trial {trial}: {by_writer}"
        for (committed, _, _), (_, writer, claimed) in zip(winners, winners[1:]):
            assert claimed > committed, f"trial {trial}: writer {writer} committed over a save it raced: {by_writer}"
        last = winners[-1][1]
        loaded = {"model": {f"w{i}": torch.zeros(64, 32) for i in range(TENSORS)}, "step": -1}
        shardstore.load(loaded, str(tmp_path / f"t{trial}"))
        assert loaded["step"] == last, f"trial {trial}"
        for name, t in loaded["model"].items():
            assert torch.all(t == last), f"trial {trial}: {name} mixes writers"
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("warm-up-"))
    assert names == sorted(f"t{t}" for t in range(TRIALS))


def test_a_staging_tree_removed_while_a_sweep_looks_at_it_is_skipped(tmp_path, monkeypatch):
    """A failed save deletes its own staging tree without the commit lock (``commit.abandon``), so a
    sweep can find a tree gone between listing and moving it; the sweep goes on. (A loser of the
    overwrite race above once raised that FileNotFoundError instead of ConcurrentSaveError.)"""
    from shardstore import commit
    from shardstore.storage import Storage

    url = str(tmp_path / "ck")
    shardstore.save(_state(1), url)
    doomed = tmp_path / "ck.staging-0123456789abcdef"
    doomed.mkdir()
    (doomed / "zarr.json").write_text("{}")  # complete and ownerless: dead litter
    is_dead = commit._is_dead

    def removed_by_its_owner_meanwhile(staging):
        dead = is_dead(staging)
        shutil.rmtree(doomed)
        return dead

    monkeypatch.setattr(commit, "_is_dead", removed_by_its_owner_meanwhile)
    commit.sweep(Storage(url, None))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def _replacer(url: str, ready, go, results) -> None:
    """A save of ``url`` over the interrupted save there (``overwrite=True``), as a manager restarted on
    another node does, started on ``go``; reports ``ok`` or the error's type."""
    torch.set_num_threads(1)
    shardstore.save(_state(0), f"{url}-warm-up")  # first-call costs out of the race
    ready.set()
    go.wait(60)
    try:
        shardstore.save(_state(7), url, overwrite=True)
        results.put("ok")
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put(type(exc).__name__)


def test_clearing_an_interrupted_step_never_deletes_a_save_committed_meanwhile(tmp_path, monkeypatch):
    """``clear_incomplete`` judges a step directory (objects, no root marker, only files of ours), then
    deletes it. A save of the same step in another process that commits between the two must keep its
    checkpoint: the judgement and the deletion are one step against commits. The racer is let go right
    after the judgement and given a few seconds: it either commits before the deletion could run, or
    waits for it and then finds the URL changed (``ConcurrentSaveError``, nothing committed)."""
    import queue

    from shardstore import commit
    from shardstore.steps import clear_incomplete

    url = tmp_path / "run" / "step-3"
    (url / "w" / "c").mkdir(parents=True)  # a save killed on an object store, copied here: objects, no marker
    (url / "w" / "c" / "0").write_bytes(b"x")
    ctx = mp.get_context("spawn")
    ready, go, results = ctx.Event(), ctx.Event(), ctx.Queue()
    racer = ctx.Process(target=_replacer, args=(str(url), ready, go, results))
    racer.start()
    assert ready.wait(120)
    judged, outcome = commit.foreign_files, []

    def judged_then_raced(target):
        found = judged(target)
        if target.url == str(url) and not go.is_set():
            go.set()
            try:
                outcome.append(results.get(timeout=3))
            except queue.Empty:
                pass  # the racer waits on the step's commit lock
        return found

    monkeypatch.setattr(commit, "foreign_files", judged_then_raced)
    clear_incomplete(str(url), None)
    racer.join(60)
    outcome = outcome or [results.get(timeout=10)]
    assert outcome[0] in ("ok", "ConcurrentSaveError"), outcome
    if outcome[0] == "ok":
        loaded = {"model": {f"w{i}": torch.zeros(64, 32) for i in range(TENSORS)}, "step": -1}
        shardstore.load(loaded, str(url))  # a save that returned is the checkpoint at its URL
        assert loaded["step"] == 7
    else:
        assert not url.exists() or not any(url.iterdir())
