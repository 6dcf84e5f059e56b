"""Readers of record: arrays written by shardstore's format/codec/storage, read by zarr-python and
tensorstore (bfloat16 and float8 through the ``zarr.data_type`` entry points of this package)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

from shardstore import format as fmt
from shardstore.codec import ArrayLayout, encode_shard, inner_chunk_ranges
from shardstore.dtypes import dtype_info
from shardstore.storage import Storage
from tests.unit.codec_helpers import DTYPES, bits, random_tensor, whole

ARRAYS = {  # name: shape, chunk_shape, inner_chunk_shape — edge chunks, 0-d, 3-d, missing inner chunks
    "m": ((5, 7), (4, 4), (2, 2)),
    "s": ((), (), ()),
    "v": ((13,), (6,), (3,)),
    "t": ((3, 5, 4), (2, 4, 4), (1, 2, 4)),
}


def _write_array(storage: Storage, path: str, layout: ArrayLayout, x: torch.Tensor) -> None:
    fmt.write_array(storage, path, layout)
    for coords in layout.chunk_coords():
        data = x[layout.outer_chunk_box(coords).relative_to(whole(layout))]
        storage.write(f"{path}/{fmt.chunk_key(coords)}", encode_shard(layout, coords, data))


def _write_checkpoint(root: str, dtype: torch.dtype, compressor: str | None = None) -> dict[str, torch.Tensor]:
    storage = Storage(root)
    expected = {}
    for i, (name, (shape, chunks, inner)) in enumerate(ARRAYS.items()):
        path = f"model/{name}"
        expected[path] = random_tensor(shape, dtype, seed=i)
        _write_array(storage, path, ArrayLayout(shape, dtype, chunks, inner, compressor), expected[path])
    fmt.write_group(storage, "model", {"note": "nested group"})
    fmt.write_group(storage, "")
    return expected


def _zarr_bytes(a) -> bytes:
    return np.ascontiguousarray(a[...]).tobytes()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zarr_python_reads_every_value(tmp_path, dtype):
    expected = _write_checkpoint(str(tmp_path), dtype)
    group = zarr.open_group(str(tmp_path), mode="r")
    assert group["model"].attrs["note"] == "nested group"
    for path, x in expected.items():
        array = group[path]
        assert array.shape == tuple(x.shape)
        assert _zarr_bytes(array) == bits(x).numpy().tobytes()


def test_zarr_python_reads_zstd(tmp_path):
    expected = _write_checkpoint(str(tmp_path), torch.bfloat16, compressor="zstd")
    group = zarr.open_group(str(tmp_path), mode="r")
    for path, x in expected.items():
        assert _zarr_bytes(group[path]) == bits(x).numpy().tobytes()


def test_zarr_python_raises_on_a_flipped_data_byte(tmp_path):
    _write_checkpoint(str(tmp_path), torch.float32)
    shape, chunks, inner = ARRAYS["m"]
    layout = ArrayLayout(shape, torch.float32, chunks, inner)
    shard = tmp_path / "model/m/c.0.0"
    raw = bytearray(shard.read_bytes())
    raw[inner_chunk_ranges(layout, (0, 0))[1].offset + 2] ^= 0x10
    shard.write_bytes(bytes(raw))
    with pytest.raises(Exception, match="checksum"):
        zarr.open_group(str(tmp_path), mode="r")["model/m"][...]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensorstore_reads_every_value(tmp_path, dtype):
    ts = pytest.importorskip("tensorstore")
    expected = _write_checkpoint(str(tmp_path), dtype)
    for path, x in expected.items():
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / path)}}
        array = ts.open(spec, read=True).result()
        assert array.dtype.name == dtype_info(dtype).zarr_name
        assert np.ascontiguousarray(array.read().result()).tobytes() == bits(x).numpy().tobytes()


def test_zarr_python_reads_bfloat16_without_importing_shardstore(tmp_path):
    """Only the installed entry points make zarr import our data types (zarr 3.1.6 workaround)."""
    _write_checkpoint(str(tmp_path), torch.bfloat16)
    code = (
        "import sys, zarr\n"
        f"a = zarr.open_group({str(tmp_path)!r}, mode='r')['model/v']\n"
        "print(a.dtype, a[...].astype('float32').sum())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("bfloat16 ")


def test_tensorstore_raises_on_a_flipped_data_byte(tmp_path):
    ts = pytest.importorskip("tensorstore")
    _write_checkpoint(str(tmp_path), torch.float32)
    shard = tmp_path / "model/v/c.0"
    raw = bytearray(shard.read_bytes())
    raw[1] ^= 0x10
    shard.write_bytes(bytes(raw))
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "model/v")}}
    with pytest.raises(Exception, match="Digest mismatch"):
        ts.open(spec, read=True).result().read().result()
