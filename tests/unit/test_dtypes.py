"""torch dtype <-> Zarr data_type table."""

from __future__ import annotations

import pytest
import torch

from shardstore.dtypes import DTYPES, dtype_info, dtype_info_by_name
from shardstore.errors import CorruptCheckpointError


@pytest.mark.parametrize("info", DTYPES, ids=lambda i: i.zarr_name)
def test_table_is_consistent(info):
    assert dtype_info(info.torch_dtype) is info and dtype_info_by_name(info.zarr_name) is info
    assert info.itemsize == torch.empty((), dtype=info.torch_dtype).element_size()


def test_names_are_tensorstores():
    names = {i.zarr_name for i in DTYPES}
    assert {"bool", "int8", "uint64", "float16", "complex128", "bfloat16", "float8_e4m3fn", "float8_e5m2"} <= names


def test_unknown_types_are_clear_errors():
    with pytest.raises(TypeError, match="cannot be stored"):
        dtype_info(torch.qint8)
    with pytest.raises(CorruptCheckpointError, match="model/w/zarr.json: unknown data_type 'float7'"):
        dtype_info_by_name("float7", "model/w/zarr.json")
