"""Saves and loads through a proxy that fails requests (tests/buckets/faulty_proxy.py): with faults now and
then they succeed through retries; with faults that never end they fail with ``StorageUnavailableError``
in bounded time, and the bucket keeps exactly what it held (nothing partial ever loads)."""

from __future__ import annotations

import time

import fsspec
import pytest
import s3fs
import torch

import shardstore
from shardstore.errors import CheckpointNotFoundError, StorageUnavailableError
from shardstore.format import is_object_key
from shardstore.storage import retry
from tests.buckets.faulty_proxy import FaultyProxy

# botocore retries on its own; with one try each, this suite sees (and tests) our retries.
@pytest.fixture
def s3(bucket_servers):
    return bucket_servers.get("s3")


@pytest.fixture
def quick_retries(monkeypatch):
    """Many quick tries (the default pauses up to seconds; the bound is what is tested)."""
    monkeypatch.setattr(retry, "DEFAULT", retry.RetryPolicy(attempts=8, base_s=0.01, cap_s=0.05))


def _values(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"w{i}": torch.randn(16, 8, generator=g) for i in range(6)}


def _load(url: str, options: dict) -> int:
    state = {"model": {k: torch.zeros_like(v) for k, v in _values(0).items()}, "step": -1}
    shardstore.load(state, url, storage_options=options)
    assert all(torch.equal(state["model"][k], v) for k, v in _values(state["step"]).items())
    return state["step"]


def _save(url: str, options: dict, seed: int, overwrite: bool = False) -> None:
    shardstore.save({"model": _values(seed), "step": seed}, url, storage_options=options, overwrite=overwrite)


def _snapshot(url: str, options: dict) -> dict[str, bytes]:
    fs, path = fsspec.core.url_to_fs(url, **options)
    fs.invalidate_cache()
    return {p: fs.cat_file(p) for p in fs.find(path)}


def test_saves_and_loads_succeed_through_503s_resets_lost_replies_and_delays(s3, quick_retries):
    url, direct = s3.fresh_url(), s3.storage_options()
    proxy = FaultyProxy(s3.endpoint, error_rate=0.12, reset_rate=0.08, lost_reply_rate=0.05, delay_rate=0.05, seed=3)
    try:
        flaky = s3.storage_options(proxy.url, client_tries=1)
        _save(url, flaky, 1)
        _save(url, flaky, 2, overwrite=True)  # claims, a new version, the lock, the pointer: all retried
        assert _load(url, flaky) == 2
    finally:
        proxy.close()
    assert _load(url, direct) == 2
    assert proxy.injected["error"] and proxy.injected["reset"] and proxy.injected["lost_reply"], proxy.injected


@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "overwrite"])
def test_endless_faults_fail_cleanly_in_bounded_time_and_change_nothing(s3, monkeypatch, overwrite):
    """3 tries of ours, each over 2 of s3fs's own: a bounded wait, then the error."""
    monkeypatch.setattr(retry, "DEFAULT", retry.RetryPolicy(attempts=3, base_s=0.01, cap_s=0.05))
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 2)  # s3fs's own loop (a class attribute, 5 by default)
    url, direct = s3.fresh_url(), s3.storage_options()
    if overwrite:
        _save(url, direct, 1)
    before = _snapshot(url, direct)
    proxy = FaultyProxy(s3.endpoint)
    proxy.endless = True
    start = time.monotonic()
    try:
        with pytest.raises(StorageUnavailableError, match=r"failed with transient errors \(3 tries in \d+ s; .*retry once"):
            _save(url, s3.storage_options(proxy.url, client_tries=1), 2, overwrite=overwrite)
    finally:
        proxy.close()
    assert time.monotonic() - start < 60
    assert _snapshot(url, direct) == before
    if overwrite:
        assert _load(url, direct) == 1
    else:
        with pytest.raises(CheckpointNotFoundError):
            _load(url, direct)


def test_a_partial_read_fetches_only_the_bytes_it_needs(s3):
    """Ranged GETs: an 8 MiB tensor is stored as two 4 MiB inner chunks (1024 rows each) of one object;
    reading the second half fetches that inner chunk and the object's index, not the whole object."""
    url = s3.fresh_url()
    rows, cols = 2048, 1024
    full = torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols)
    shardstore.save({"w": full}, url, storage_options=s3.storage_options())
    proxy = FaultyProxy(s3.endpoint)
    try:
        ckpt = shardstore.open(url, s3.storage_options(proxy.url))
        assert torch.equal(ckpt.read("w", (slice(1024, 2048),)), full[1024:])
    finally:
        proxy.close()
    chunk_bytes = sum(n for path, n in proxy.bytes_sent.items() if is_object_key(path.split("?")[0]))
    needed = 1024 * cols * 4
    assert needed <= chunk_bytes <= 1.05 * needed, (chunk_bytes, needed)
