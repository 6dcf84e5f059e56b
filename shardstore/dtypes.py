"""torch dtype <-> Zarr v3 ``data_type`` name and item size.

Core Zarr v3 names for the standard types; tensorstore's names (``bfloat16``, ``float8_e4m3fn``...) for
the extension types, because tensorstore is the other reader of record and rejects the
zarr-extensions registry's float8 spellings. Bytes are always little-endian; exotic floats move as raw
bytes (``tensor.view(torch.uint8)``), never through a float conversion, so nothing here needs numpy's
or ml_dtypes' spelling of a type (``zarr_dtypes`` gives zarr-python those): importing ml_dtypes took
0.7-0.9 s of every fresh process's start here, for a table of names and sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardstore.errors import CorruptCheckpointError

__all__ = ["DTypeInfo", "DTYPES", "dtype_info", "dtype_info_by_name"]


@dataclass(frozen=True)
class DTypeInfo:
    """One supported element type, as torch and Zarr v3 spell it."""

    torch_dtype: torch.dtype
    zarr_name: str

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def fill_value(self) -> bool | int | float | list[float]:
        """The JSON ``fill_value`` for ``zarr.json``: zero of the right JSON kind (spec requires it)."""
        if self.torch_dtype == torch.bool:
            return False
        if self.torch_dtype.is_complex:
            return [0.0, 0.0]
        return 0.0 if self.torch_dtype.is_floating_point else 0


_NAMES = [  # torch's name for each dtype is also its Zarr data_type name
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64",
    "complex64", "complex128", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
    "float8_e8m0fnu",
]


def _info(name: str) -> DTypeInfo | None:
    """An entry where this torch build has the dtype (float8 variants come and go across versions)."""
    torch_dtype = getattr(torch, name, None)
    return DTypeInfo(torch_dtype, name) if isinstance(torch_dtype, torch.dtype) else None


DTYPES: tuple[DTypeInfo, ...] = tuple(i for i in (_info(name) for name in _NAMES) if i is not None)
_BY_TORCH = {i.torch_dtype: i for i in DTYPES}
_BY_NAME = {i.zarr_name: i for i in DTYPES}


def dtype_info(dtype: torch.dtype) -> DTypeInfo:
    """The entry for a torch dtype; ``TypeError`` for one a checkpoint cannot hold."""
    try:
        return _BY_TORCH[dtype]
    except KeyError:
        raise TypeError(
            f"torch dtype {dtype} cannot be stored: shardstore supports {sorted(_BY_NAME)}; "
            "convert the tensor (e.g. .to(torch.float32)) before saving"
        ) from None


def dtype_info_by_name(name: str, where: str = "") -> DTypeInfo:
    """The entry for a Zarr ``data_type`` name read from ``where``; unknown names mean bad metadata."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise CorruptCheckpointError(
            f"{where or 'metadata'}: unknown data_type {name!r}; expected one of {sorted(_BY_NAME)}. "
            "The array was written by another tool or a newer shardstore; upgrade shardstore"
        ) from None
