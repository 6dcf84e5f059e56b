"""The backends every storage test runs against: one fixture, one param per backend (the bucket ones
on real servers on 127.0.0.1, see tests/buckets/servers.py)."""

from __future__ import annotations

import uuid

import fsspec
import pytest

from shardstore.storage import Storage


@pytest.fixture(params=["local", "memory", "s3", "gs", "az"])
def storage(request, tmp_path):
    if request.param == "local":
        yield Storage(str(tmp_path / "ckpt"))
        return
    if request.param != "memory":
        server = request.getfixturevalue("bucket_servers").get(request.param)
        yield Storage(server.fresh_url(), server.storage_options())
        return
    name = f"shardstore-test-{uuid.uuid4().hex}"
    yield Storage(f"memory://{name}")
    fs = fsspec.filesystem("memory")
    for path in fs.glob(f"/{name}*"):  # the root and its .staging-/.old- siblings
        fs.rm(path, recursive=True)
