"""Checkpoint benchmark against an object store (``tools/bench_checkpoint.py --url s3://bucket/prefix``).

One process, plain tensors (fp32, --gib in all, 8 tensors), no process group: shardstore ``save`` /
``load`` against torch DCP's ``FsspecWriter`` / ``FsspecReader`` (4 threads) on the same URL and server,
each the median of --repeat calls; then a resharded-style partial read (``open().read`` of the second
half of every tensor) whose bytes fetched are compared with the bytes needed; then raw client speed:
s3fs against obstore's fsspec adapter, PUT and GET of the same objects.

The endpoint and keys come from the usual variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``). Against a local moto server:
    moto_server -H 127.0.0.1 -p 5555 &
    AWS_ENDPOINT_URL=http://127.0.0.1:5555 AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x \\
        python tools/bench_checkpoint.py --url s3://bench/run --gib 0.25
"""

from __future__ import annotations

import os
import statistics
import time
import uuid
from typing import Callable

import fsspec
import torch

import shardstore
from shardstore.format import is_object_key

TENSORS = 8
GIB = 1 << 30


def _state(gib: float) -> dict[str, torch.Tensor]:
    rows = max(2, int(gib * GIB / TENSORS / 4 / 1024) // 2 * 2)
    g = torch.Generator().manual_seed(0)
    return {f"w{i}": torch.randn(rows, 1024, generator=g) for i in range(TENSORS)}


def _median_s(call: Callable[[int], None], repeat: int) -> float:
    times = []
    for i in range(repeat):
        start = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _shardstore(url: str, sd: dict, repeat: int) -> tuple[float, float]:
    save = _median_s(lambda i: shardstore.save(sd, f"{url}/shardstore-{i}"), repeat)
    target = {k: torch.empty_like(v) for k, v in sd.items()}
    load = _median_s(lambda i: shardstore.load(target, f"{url}/shardstore-{i}"), repeat)
    assert all(torch.equal(target[k], v) for k, v in sd.items())
    return save, load


def _dcp(url: str, sd: dict, repeat: int) -> tuple[float, float]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    def save(i: int) -> None:
        dcp.save(sd, storage_writer=FsspecWriter(f"{url}/dcp-{i}", thread_count=4))

    target = {k: torch.empty_like(v) for k, v in sd.items()}

    def load(i: int) -> None:
        dcp.load(target, storage_reader=FsspecReader(f"{url}/dcp-{i}"))

    result = _median_s(save, repeat), _median_s(load, repeat)
    assert all(torch.equal(target[k], v) for k, v in sd.items())
    return result


def _partial_read_bytes(url: str, sd: dict) -> tuple[int, int]:
    """(chunk bytes fetched, bytes needed) reading the second half of every tensor through ``open``."""
    from shardstore.storage.remote import FsspecStorage

    fetched, original = 0, FsspecStorage._fetch

    def counting(self, key, start, stop):
        nonlocal fetched
        data = original(self, key, start, stop)
        fetched += len(data) if is_object_key(key) else 0
        return data

    FsspecStorage._fetch = counting
    try:
        ckpt = shardstore.open(f"{url}/shardstore-0")
        for key, value in sd.items():
            ckpt.read(key, (slice(value.shape[0] // 2, value.shape[0]),))
    finally:
        FsspecStorage._fetch = original
    return fetched, sum(v.numel() * v.element_size() // 2 for v in sd.values())


def _clients(url: str, sd: dict) -> dict[str, tuple[float, float]]:
    """Raw PUT and GET seconds of every tensor's bytes, s3fs and obstore's fsspec adapter."""
    from obstore.fsspec import FsspecStore

    bucket, _, prefix = url[len("s3://"):].partition("/")
    blobs = [v.numpy().tobytes() for v in sd.values()]
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    clients = {"s3fs": fsspec.filesystem("s3", skip_instance_cache=True),
               "obstore": FsspecStore("s3", endpoint=endpoint, region="us-east-1", client_options={"allow_http": True})}
    out = {}
    for name, fs in clients.items():
        paths = [f"{bucket}/{prefix}/raw-{name}-{uuid.uuid4().hex[:8]}" for _ in blobs]
        start = time.perf_counter()
        fs.pipe(dict(zip(paths, blobs)))
        put = time.perf_counter() - start
        start = time.perf_counter()
        got = fs.cat(paths)
        get = time.perf_counter() - start
        assert [got[p] for p in paths] == blobs, name
        out[name] = put, get
    return out


def run(url: str, gib: float, repeat: int) -> None:
    url = url.rstrip("/") + f"/bench-{uuid.uuid4().hex[:8]}"
    sd = _state(gib)
    size = sum(v.numel() * v.element_size() for v in sd.values()) / GIB
    print(f"{url}: {TENSORS} fp32 tensors, {size:.3f} GiB, median of {repeat} calls, one process")
    ours, theirs = _shardstore(url, sd, repeat), _dcp(url, sd, repeat)
    for what, a, b in (("save", ours[0], theirs[0]), ("load", ours[1], theirs[1])):
        print(f"  {what}: shardstore {size / a:.3f} GiB/s, DCP Fsspec {size / b:.3f} GiB/s, ratio {b / a:.2f}x")
    fetched, needed = _partial_read_bytes(url, sd)
    print(f"  partial read: fetched {fetched} bytes of chunk data for {needed} needed ({fetched / needed:.3f}x)")
    for name, (put, get) in _clients(url, sd).items():
        print(f"  {name}: PUT {size / put:.3f} GiB/s, GET {size / get:.3f} GiB/s")
    fsspec.filesystem("s3").rm(url[len("s3://"):], recursive=True)
