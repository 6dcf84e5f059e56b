"""copy_bytes moves exactly the bytes torch's copy_ would, for every storable dtype and any strides;
copy_side_by_side places chunks read back to back as copying each into its band would."""

from __future__ import annotations

import pytest
import torch

from shardstore.dtypes import DTYPES
from shardstore.memcopy import as_bytes, copy_bytes, copy_side_by_side


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


def _back_to_back(blocks: list[torch.Tensor], gap: int) -> list[memoryview]:
    """The blocks' bytes one after another in one buffer, ``gap`` bytes apart (a chunk's crc32c)."""
    raw = [as_bytes(b).contiguous().numpy().tobytes() for b in blocks]
    buffer = memoryview(bytearray(b"".join(r + bytes([0xEE]) * gap for r in raw)))
    step = len(raw[0]) + gap
    return [buffer[j * step : j * step + len(raw[0])] for j in range(len(raw))]


@pytest.mark.parametrize("dtype", [info.torch_dtype for info in DTYPES], ids=str)
@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 5), (5,)], ids=str)
def test_copy_side_by_side_places_each_block_in_its_band(dtype, shape):
    blocks = [_random(shape, dtype, seed) for seed in range(3)]
    parts = _back_to_back(blocks, gap=4)
    dest = _random((7, 6, 15), dtype, 9)
    region = {2: dest[1, 1:5], 3: dest[3:5, 1:4], 1: dest[2, 3]}[len(shape)]  # three blocks wide, strided
    expected = as_bytes(dest).clone()
    for j, block in enumerate(blocks):
        band = region[..., j * shape[-1] : (j + 1) * shape[-1]]
        as_bytes(expected.view(dtype).squeeze(-1).as_strided(band.shape, band.stride(), band.storage_offset())).copy_(as_bytes(block))
    assert copy_side_by_side(region, parts, dtype)
    assert torch.equal(as_bytes(dest), expected)


def test_copy_side_by_side_declines_what_it_cannot_copy_in_one_pass():
    blocks = [torch.randn(4, 5) for _ in range(3)]
    dest, parts = torch.zeros(4, 15), _back_to_back(blocks, gap=4)
    before = dest.clone()
    assert not copy_side_by_side(dest, parts, torch.float64)  # values of another dtype
    assert not copy_side_by_side(dest[:, :14], parts, torch.float32)  # not three bands wide
    assert not copy_side_by_side(dest[:, :5], parts[:1], torch.float32)  # one block: a plain copy
    assert not copy_side_by_side(dest, [parts[0], parts[2], parts[1]], torch.float32)  # not equally spaced, in order
    assert not copy_side_by_side(torch.zeros(15, 4).t(), parts, torch.float32)  # rows not contiguous
    assert torch.equal(dest, before)
