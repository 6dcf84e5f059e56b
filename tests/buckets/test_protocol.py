"""The object-store commit protocol (docs/format.md §5) on real servers, where a save meets another save,
a damaged pointer, or a URL it cannot commit at."""

from __future__ import annotations

import pytest
import torch

import shardstore
from shardstore.errors import UnsafeKeyError
from shardstore.storage import Storage

PROTOCOLS = ["s3", "gs", "az"]


@pytest.fixture(params=PROTOCOLS)
def server(request, bucket_servers):
    return bucket_servers.get(request.param)


def test_a_bucket_root_is_refused_before_anything_is_written(server):
    """Its commit lock ``<url>.lock`` would be another bucket: an overwrite there failed with the client's
    own traceback (an empty object key) after writing a whole new version."""
    url, options = f"{server.protocol}://{server.new_bucket()}", server.storage_options()
    with pytest.raises(UnsafeKeyError, match="bucket root: a checkpoint needs a prefix of its own"):
        shardstore.save({"w": torch.ones(3)}, url, storage_options=options)
    assert Storage(url, options).is_empty()
