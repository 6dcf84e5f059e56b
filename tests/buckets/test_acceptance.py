"""Checkpoints in S3, GCS and Azure buckets on real servers (tests/buckets/servers.py): saved from 4 ranks,
loaded resharded on 3 ranks and read through ``open()`` by one process; two writers racing for one URL
never both commit; a writer killed mid-save leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import threading
import time

import pytest
import torch

import dtensor
import shardstore
from dtensor import Shard
from shardstore.errors import CheckpointExistsError, ConcurrentSaveError, IncompleteCheckpointError
from tests.buckets.servers import start_s3
from tests.ranks import mesh, run_ranks

PROTOCOLS = ["s3", "gs", "az"]
ROWS, COLS = 24, 20


@pytest.fixture(params=PROTOCOLS)
def bucket(request, bucket_servers):
    """(a fresh URL in the session's bucket, the storage options that reach its server)."""
    server = bucket_servers.get(request.param)
    return server.fresh_url(), server.storage_options()


def _values(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(ROWS, COLS, generator=g), "b": torch.arange(ROWS * 3, dtype=torch.int64).reshape(ROWS, 3) + seed}


def _state(world: int, dim: int, values: dict[str, torch.Tensor]) -> dict:
    m = mesh((world,))
    model = {k: dtensor.distribute_tensor(v, m, [Shard(dim)], src_data_rank=None) for k, v in values.items()}
    return {"model": model, "step": 0}


def _save_ranks(url: str, options: dict, seed: int) -> int:
    state = _state(4, 0, _values(seed))
    state["step"] = seed
    return shardstore.save(state, url, storage_options=options).bytes_written


def _load_ranks(url: str, options: dict, seed: int) -> bool:
    state = _state(3, 1, {k: torch.zeros_like(v) for k, v in _values(seed).items()})
    shardstore.load(state, url, storage_options=options)
    for name, expected in _values(seed).items():
        local = state["model"][name]
        box = local.__create_chunk_list__()[0]
        want = expected[tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))]
        assert torch.equal(local.to_local(), want), name
    return state["step"] == seed


def test_saved_on_4_ranks_loads_resharded_on_3_and_opens_in_one_process(bucket):
    url, options = bucket
    assert sum(run_ranks(4, _save_ranks, url, options, 7)) > 0
    assert all(run_ranks(3, _load_ranks, url, options, 7))
    ckpt = shardstore.open(url, options)
    assert sorted(ckpt.keys()) == ["model.b", "model.w"]
    assert torch.equal(ckpt.read("model.w", (slice(5, 9),)), _values(7)["w"][5:9])


def _plain_save(url: str, options: dict, seed: int, overwrite: bool) -> None:
    shardstore.save({"model": _values(seed), "step": seed}, url, storage_options=options, overwrite=overwrite)


def _loaded_seed(url: str, options: dict) -> int:
    """The seed of the checkpoint at ``url``, after checking every value is that save's (never a mix)."""
    state = {"model": {k: torch.zeros_like(v) for k, v in _values(0).items()}, "step": -1}
    shardstore.load(state, url, storage_options=options)
    seed = state["step"]
    assert all(torch.equal(state["model"][k], v) for k, v in _values(seed).items())
    return seed


@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "overwrite"])
def test_two_concurrent_writers_never_both_commit(bucket, overwrite):
    url, options = bucket
    if overwrite:
        _plain_save(url, options, 1, False)
    outcomes: dict[int, BaseException | None] = {}

    def writer(seed: int) -> None:
        try:
            _plain_save(url, options, seed, overwrite)
            outcomes[seed] = None
        except BaseException as exc:  # noqa: BLE001 - recorded and checked below
            outcomes[seed] = exc

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in (2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if any(t.is_alive() for t in threads):
        faulthandler.dump_traceback()  # where a writer is stuck, for the report
        pytest.fail(f"a writer to {url} did not finish within 120 s (the server stopped answering?)")
    winners = [seed for seed, exc in outcomes.items() if exc is None]
    losers = [exc for exc in outcomes.values() if exc is not None]
    assert len(outcomes) == 2 and len(winners) <= 1, outcomes
    # A loser that came after the winner's commit is told the URL holds a checkpoint (the parent class)
    expected = ConcurrentSaveError if overwrite else CheckpointExistsError
    assert all(isinstance(exc, expected) for exc in losers), losers
    assert _loaded_seed(url, options) == (winners[0] if winners else 1)


# -- a writer killed mid-save -------------------------------------------------------------------------------

KILL_TENSORS = 12
CHUNK_DELAY_S = 0.2


def _doomed_save(url: str, options: dict, overwrite: bool, writing) -> None:
    """Save 12 tensors, each object's write slowed down; ``writing`` is set once chunk objects are being
    written, so that the parent's kill lands mid-save."""
    from shardstore.format import is_object_key
    from shardstore.storage.remote import FsspecStorage

    write = FsspecStorage.write

    def slow_write(self, key, data):
        time.sleep(CHUNK_DELAY_S)
        write(self, key, data)
        if is_object_key(key):
            writing.set()

    FsspecStorage.write = slow_write
    state = {"model": {f"t{i}": torch.full((64, 64), float(i)) for i in range(KILL_TENSORS)}, "step": 99}
    shardstore.save(state, url, storage_options=options, overwrite=overwrite)


@pytest.fixture(scope="module")
def own_s3():
    """A moto server of their own for the kills: a client killed mid-request can leave moto unanswering
    for a while, which must not stall the other tests' server."""
    server = start_s3()
    yield server
    server.stop()


@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "overwrite"])
def test_a_writer_killed_mid_save_leaves_the_previous_checkpoint_loadable(own_s3, overwrite):
    """Each kill spawns a process that imports torch (tens of seconds on a loaded machine), so kills run
    on S3 only; what differs between backends (the conditional creates) is raced on all three above."""
    url, options = own_s3.fresh_url(), own_s3.storage_options()
    if overwrite:
        _plain_save(url, options, 5, False)
    ctx = mp.get_context("spawn")
    writing = ctx.Event()
    process = ctx.Process(target=_doomed_save, args=(url, options, overwrite, writing))
    process.start()
    try:
        assert writing.wait(120), "the doomed save wrote no chunk object in time"
    finally:
        process.kill()
        process.join()
    if overwrite:
        assert _loaded_seed(url, options) == 5
        _plain_save(url, options, 6, True)  # the killed save's litter does not block the next one
        assert _loaded_seed(url, options) == 6
    else:
        with pytest.raises(IncompleteCheckpointError, match="no root zarr.json"):
            _loaded_seed(url, options)
