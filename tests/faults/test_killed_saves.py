"""Crash acceptance: a save killed at any stage never damages the checkpoint that was there before, and
its litter never blocks a later save.

Real processes, not the shared rank pool. The 2-rank tests spawn a gloo job that first saves a small
checkpoint A completely, then saves a 64 MiB state dict with chunk writes slowed a little (so the kill
surely lands while chunks are being written). The test process watches the directory, SIGKILLs one rank
as soon as chunk objects appear, gives the other rank a moment to fail on its own, kills it too, and then
checks from a process with no process group:

* a fresh URL B holds nothing (``CheckpointNotFoundError``): saves write into a staging sibling;
* with ``overwrite=True`` over A, A still loads with its old values; the leftover staging sibling reads
  as incomplete and never as A, and a later save sweeps it.

The single-process tests kill the saving process at each stage of the commit (after its chunks, after
its root marker, inside the commit lock before the swap, right after the swap): A or the new checkpoint
loads at the URL every time, and the next save leaves no sibling behind.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

import shardstore
from shardstore.format import is_object_key
from shardstore.errors import CheckpointExistsError, CheckpointNotFoundError, IncompleteCheckpointError

WORLD = 2
BIG_TENSORS = 16  # 16 x 4 MiB float32 = 64 MiB
SMALL_TENSORS = 3
CHUNK_DELAY_S = 0.1  # per chunk object (written one at a time) during the save that gets killed
DEADLINE_S = 150.0  # from spawn until chunk objects of the doomed save show up (slow on a loaded machine)
GRACE_S = 3.0  # for the surviving rank to fail on its own before it is killed too


# -- the spawned job ------------------------------------------------------------------------------------


def seeded_values(seed: int, count: int, rows: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"w{i}": torch.randn(rows, 1024, generator=g) for i in range(count)}


def slow_chunk_writes(delay: float) -> None:
    """Write chunk objects one at a time, each ``delay`` longer (only inside the spawned job).

    A rank's 16 objects then take >= 16 * delay, a window the kill lands in even on a loaded machine;
    it costs the test no time, since the job is killed right after the first objects appear.
    """
    from shardstore.storage.local import LocalStorage

    write, one_at_a_time = LocalStorage.write, threading.Lock()

    def slow(self, key, data):
        if not is_object_key(key):
            return write(self, key, data)
        with one_at_a_time:
            write(self, key, data)
            time.sleep(delay)

    LocalStorage.write = slow


def join_group(rank: int, port: int):
    """Join the spawned job's gloo group; its 1-D mesh over every rank."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=20))
    return DeviceMesh("cpu", list(range(WORLD)))


def sharded_values(mesh, seed: int, count: int, rows: int) -> dict:
    import dtensor

    return {k: dtensor.distribute_tensor(v, mesh, [dtensor.Shard(0)], src_data_rank=None)
            for k, v in seeded_values(seed, count, rows).items()}


def _job(rank: int, port: int, steps: list[tuple[str, int, int, bool, bool]]) -> None:
    """One rank: for each step (url, seed, count, overwrite, slow) save a DTensor state dict."""
    import torch.distributed as dist

    mesh = join_group(rank, port)
    for url, seed, count, overwrite, slow in steps:
        if slow:
            slow_chunk_writes(CHUNK_DELAY_S)
        model = sharded_values(mesh, seed, count, 1024 if slow else 64)
        shardstore.save({"model": model, "step": seed}, url, overwrite=overwrite)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chunk_objects(root: Path) -> list[Path]:
    """Chunk objects under ``root`` (temporary ``.tmp-`` files excluded; in a staging tree an object may
    still be being written under its own name)."""
    return [p for p in root.rglob("*") if p.is_file() and is_object_key(str(p.relative_to(root))) and ".tmp-" not in p.name]


def run_and_kill(steps, watch, victim: int, job=_job) -> None:
    """Spawn ``job(rank, port, steps)`` on every rank, wait until ``watch()`` finds chunk objects, SIGKILL
    rank ``victim``, then the rest."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=job, args=(rank, port, steps), daemon=True) for rank in range(WORLD)]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not watch():
            dead = [(r, p.exitcode) for r, p in enumerate(procs) if not p.is_alive()]
            assert not dead, f"a rank ended before the save could be killed (rank, exit code): {dead}"
            assert time.monotonic() < deadline, f"no chunk objects appeared within {DEADLINE_S} s"
            time.sleep(0.005)
        os.kill(procs[victim].pid, signal.SIGKILL)
        procs[victim].join(5)
        for p in procs:
            p.join(GRACE_S)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
    assert procs[victim].exitcode == -signal.SIGKILL


# -- checks from a process with no process group --------------------------------------------------------


def _assert_loads(url: str, seed: int, count: int, rows: int) -> None:
    expected = seeded_values(seed, count, rows)
    sd = {"model": {k: torch.zeros_like(v) for k, v in expected.items()}, "step": -1}
    shardstore.load(sd, url)
    assert sd["step"] == seed
    ck = shardstore.open(url)
    for k, v in expected.items():
        assert torch.equal(sd["model"][k].view(torch.int32), v.view(torch.int32)), f"{url}: {k} differs"
        assert torch.equal(ck.read(f"model.{k}").view(torch.int32), v.view(torch.int32)), f"{url}: {k} differs"


def _assert_incomplete(url: str) -> None:
    sd = {"model": {f"w{i}": torch.zeros(1024, 1024) for i in range(BIG_TENSORS)}}
    with pytest.raises(IncompleteCheckpointError, match="no root zarr.json: it is incomplete"):
        shardstore.load(sd, url)
    with pytest.raises(IncompleteCheckpointError, match=f"checkpoint {url} has no root zarr.json"):
        shardstore.open(url)


def chunks_in_staging(tmp_path: Path, name: str):
    return lambda: any(_chunk_objects(s) for s in tmp_path.glob(f"{name}.staging-*"))


def _siblings(tmp_path: Path, name: str) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f"{name}."))


def test_killed_save_to_a_fresh_url_leaves_nothing_there_and_blocks_nothing(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    steps = [(a, 1, SMALL_TENSORS, False, False), (b, 2, BIG_TENSORS, False, True)]
    run_and_kill(steps, chunks_in_staging(tmp_path, "b"), victim=1)
    assert not (tmp_path / "b").exists()
    with pytest.raises(CheckpointNotFoundError, match=f"no checkpoint at {b}"):
        shardstore.open(b)
    _assert_loads(a, 1, SMALL_TENSORS, 64)
    assert len(_siblings(tmp_path, "b")) <= 1  # rank 0 survived the kill of rank 1 and may have cleaned up
    shardstore.save({"model": seeded_values(3, SMALL_TENSORS, 64), "step": 3}, b)  # no overwrite needed
    _assert_loads(b, 3, SMALL_TENSORS, 64)
    assert _siblings(tmp_path, "b") == []  # the dead save's staging tree was swept


def test_killed_overwrite_keeps_the_old_checkpoint(tmp_path):
    a = str(tmp_path / "a")
    steps = [(a, 1, SMALL_TENSORS, False, False), (a, 2, BIG_TENSORS, True, True)]
    committed, staging_has_chunks = (tmp_path / "a" / "zarr.json").exists, chunks_in_staging(tmp_path, "a")
    run_and_kill(steps, lambda: committed() and staging_has_chunks(), victim=0)
    _assert_loads(a, 1, SMALL_TENSORS, 64)
    leftovers = _siblings(tmp_path, "a")
    assert len(leftovers) == 1 and leftovers[0].startswith("a.staging-"), leftovers
    _assert_incomplete(str(tmp_path / leftovers[0]))
    # The leftover staging directory blocks nothing: a later save over A replaces A and sweeps it.
    new = {k: v + 1 for k, v in seeded_values(1, SMALL_TENSORS, 64).items()}
    with pytest.raises(CheckpointExistsError):
        shardstore.save({"model": new, "step": 5}, a)
    shardstore.save({"model": new, "step": 5}, a, overwrite=True)
    sd = {"model": {k: torch.zeros_like(v) for k, v in new.items()}, "step": -1}
    shardstore.load(sd, a)
    assert sd["step"] == 5 and all(torch.equal(sd["model"][k], new[k]) for k in new)
    assert _siblings(tmp_path, "a") == []


# -- one process killed at each stage of the commit -----------------------------------------------------

# Where the saving process kills itself: (function patched, kill before or after calling it).
STAGES = {
    "chunks written": ("shardstore.saving", "commit_metadata", "before"),
    "root marker written": ("shardstore.commit", "finish", "before"),
    "inside the commit lock": ("shardstore.commit", "_swap_in", "before"),
    "swapped, old tree not deleted": ("shardstore.storage.local.LocalStorage", "rename_tree", "after"),
}


def _killed_at(stage: str, url: str, seed: int, overwrite: bool) -> None:
    """Save in this (spawned) process, SIGKILLing itself at ``stage``."""
    import importlib

    module_name, name, when = STAGES[stage]
    owner_path, _, cls = module_name.rpartition(".") if module_name.endswith("Storage") else (module_name, "", "")
    owner = getattr(importlib.import_module(owner_path), cls) if cls else importlib.import_module(module_name)
    original = getattr(owner, name)

    def die(*args, **kwargs):
        if when == "after":
            original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(owner, name, die)
    shardstore.save({"model": seeded_values(seed, SMALL_TENSORS, 64), "step": seed}, url, overwrite=overwrite)


@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "overwrite"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_a_save_killed_at_any_stage_leaves_old_or_new(tmp_path, stage, overwrite):
    url = str(tmp_path / "ck")
    if overwrite:
        shardstore.save({"model": seeded_values(1, SMALL_TENSORS, 64), "step": 1}, url)
    proc = mp.get_context("spawn").Process(target=_killed_at, args=(stage, url, 2, overwrite))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL, f"the save did not reach stage {stage!r} (exit {proc.exitcode})"
    swapped = stage.startswith("swapped")
    if swapped:
        _assert_loads(url, 2, SMALL_TENSORS, 64)
    elif overwrite:
        _assert_loads(url, 1, SMALL_TENSORS, 64)
    else:
        with pytest.raises(CheckpointNotFoundError):
            shardstore.open(url)
    # The next save goes through (overwrite only where a checkpoint is there) and sweeps every sibling.
    shardstore.save({"model": seeded_values(3, SMALL_TENSORS, 64), "step": 3}, url, overwrite=swapped or overwrite)
    _assert_loads(url, 3, SMALL_TENSORS, 64)
    assert _siblings(tmp_path, "ck") == []
