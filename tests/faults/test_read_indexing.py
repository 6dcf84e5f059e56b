"""``Checkpoint.read`` indexes as torch does: ints (dropping their dim) and step-1 slices, one per leading
dim; more indices than dims, out-of-range ints, lists (torch's advanced indexing) and other index kinds
are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import shardstore

FULL = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(4, 5, 6)
REGIONS = [
    None, (), 2, -1, (1, 3), (-4, -5, -6), (3, slice(1, 4)), (slice(None), 2), (slice(1, 3), -1, slice(2, None)),
    slice(0, 0), (0, 0, 0), (1, slice(2, 4)), np.int64(3), (torch.tensor(2), 1), (slice(-2, None), slice(None, -1)),
]


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("idx") / "ck")
    shardstore.save({"t": FULL, "s": torch.tensor(3.5)}, url)
    return shardstore.open(url)


@pytest.mark.parametrize("region", REGIONS, ids=repr)
def test_read_indexes_as_torch_does(ck, region):
    expected = FULL if region is None else FULL[region]
    got = ck.read("t", region)
    assert got.shape == expected.shape and torch.equal(got, expected) and got.is_contiguous()


def test_zero_dim_tensor(ck):
    assert torch.equal(ck.read("s"), torch.tensor(3.5)) and torch.equal(ck.read("s", ()), torch.tensor(3.5))


@pytest.mark.parametrize("key, region, error, says", [
    ("t", (0, 0, 0, 0), IndexError, "too many indices for a tensor of dimension 3: got 4"),
    ("s", (0,), IndexError, "too many indices for a tensor of dimension 0: got 1"),
    ("t", (4,), IndexError, "index 4 is out of bounds for dimension 0 with size 4"),
    ("t", (0, -6), IndexError, "index -6 is out of bounds for dimension 1 with size 5"),
    ("t", (True,), TypeError, "an index must be a slice (step 1) or an int, got True for dim 0"),
    ("t", (Ellipsis,), TypeError, "got Ellipsis for dim 0"),
    ("t", (None,), TypeError, "got None for dim 0"),
    ("t", (0.5,), TypeError, "got 0.5 for dim 0"),
    ("t", (slice(0, 4, 2),), ValueError, "region slices must have step 1"),
    ("t", [0, 1], TypeError, "a list region [0, 1] would be advanced indexing in torch"),  # torch: rows 0 and 1
    ("t", [1, slice(2, 4)], TypeError, "give a tuple with one slice (step 1) or int per leading dim"),
])
def test_bad_indices_are_refused_like_torch(ck, key, region, error, says):
    with pytest.raises(error) as info:
        ck.read(key, region)
    assert type(info.value) is error and f"read({key!r}): " in str(info.value) and says in str(info.value)
    if error is IndexError and key == "t":
        with pytest.raises(IndexError):
            FULL[region]  # torch refuses it too
