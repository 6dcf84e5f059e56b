"""copy_bytes moves exactly the bytes torch's copy_ would, for every storable dtype and any strides."""

from __future__ import annotations

import pytest
import torch

from shardstore.dtypes import DTYPES
from shardstore.memcopy import as_bytes, copy_bytes


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    raw = torch.randint(0, 256, shape + (torch.empty((), dtype=dtype).element_size(),), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(seed))
    return raw.view(dtype).squeeze(-1)  # any bit pattern, NaNs included: compared as bytes below


@pytest.mark.parametrize("dtype", [info.torch_dtype for info in DTYPES], ids=str)
def test_copy_bytes_matches_copy_for_every_dtype_and_layout(dtype):
    dest = _random((12, 20), dtype, 0)
    expected = as_bytes(dest).clone().view(dtype).squeeze(-1)  # cloned as bytes: a bool clone would normalise them
    cases = [
        (dest[2:7, 4:12], _random((5, 8), dtype, 1)),  # a column band of a row-major tensor
        (dest[:, 19], _random((12,), dtype, 2)),  # one column: every element strided
        (dest[8:10], _random((10, 20), dtype, 3)[::5]),  # a strided source
    ]
    for target, src in cases:
        assert copy_bytes(target, src)
    for target, src in cases:  # the same copies, done by torch, into a clone
        view = expected.as_strided(target.shape, target.stride(), target.storage_offset())
        as_bytes(view).copy_(as_bytes(src))
    assert torch.equal(as_bytes(dest), as_bytes(expected))


def test_copy_bytes_declines_what_it_cannot_copy():
    assert not copy_bytes(torch.zeros(3), torch.zeros(3, dtype=torch.float64))
    assert not copy_bytes(torch.zeros(3), torch.zeros(4))
    assert not copy_bytes(torch.zeros(3, dtype=torch.complex64), torch.zeros(3, dtype=torch.complex64).conj())
