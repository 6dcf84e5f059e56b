"""The backends every storage test runs against: one fixture, one param per backend."""

from __future__ import annotations

import uuid

import fsspec
import pytest

from shardstore.storage import Storage


@pytest.fixture(params=["local", "memory"])
def storage(request, tmp_path):
    if request.param == "local":
        yield Storage(str(tmp_path / "ckpt"))
        return
    name = f"shardstore-test-{uuid.uuid4().hex}"
    yield Storage(f"memory://{name}")
    fs = fsspec.filesystem("memory")
    for path in fs.glob(f"/{name}*"):  # the root and its .staging-/.old- siblings
        fs.rm(path, recursive=True)
