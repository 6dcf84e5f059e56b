"""zarr-python data types for bfloat16 and float8, backed by ``ml_dtypes``.

zarr-python 3.1 knows no bfloat16 or float8; tensorstore writes them as ``"bfloat16"``,
``"float8_e4m3fn"``... and so do we. These ``ZDType`` classes, registered through the
``zarr.data_type`` entry points in ``pyproject.toml``, let ``zarr.open_group(url)["w"][...]`` read
(and write) such arrays with no shardstore import. They mirror zarr's own ``Float16``: the float
scalar and JSON handling of ``BaseFloat`` is reused as is; only the numpy dtype differs, and it has
one byte order (little-endian on every platform ml_dtypes supports), so ``endianness`` is ignored.

zarr-python 3.1.6 collects the ``zarr.data_type`` entry points but never loads them (its
``DataTypeRegistry._lazy_load`` has no caller), so this module also registers its types itself when
imported, and ``pyproject.toml`` makes zarr import it early through a second entry point in the
``zarr.buffer`` group: zarr loads that group before it reads any ``zarr.json``. That entry names
zarr's own default CPU ``Buffer`` (re-exported here as ``Buffer``), so it registers nothing new.
Keep the ``zarr.data_type`` entries: they are the documented way, and newer zarr versions use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import ml_dtypes
import numpy as np
from zarr.core.buffer.cpu import Buffer
from zarr.core.dtype.npy.float import BaseFloat
from zarr.dtype import data_type_registry

__all__ = ["Buffer", "BFloat16", "Float8E4M3FN", "Float8E5M2", "Float8E4M3FNUZ", "Float8E5M2FNUZ", "Float8E8M0FNU"]


@dataclass(frozen=True, kw_only=True)
class _MLDtypesFloat(BaseFloat[Any, Any]):
    """A float type whose numpy dtype class (``dtype_cls``) comes from ml_dtypes."""

    _zarr_v2_names: ClassVar[tuple[str, ...]] = ()  # Zarr v2 has no name for these types

    def to_native_dtype(self) -> np.dtype:
        return self.dtype_cls()

    @property
    def item_size(self) -> int:
        return self.dtype_cls().itemsize


@dataclass(frozen=True, kw_only=True)
class BFloat16(_MLDtypesFloat):
    """bfloat16: float32's 8-bit exponent, 7-bit mantissa."""

    dtype_cls = type(np.dtype(ml_dtypes.bfloat16))
    _zarr_v3_name = "bfloat16"


@dataclass(frozen=True, kw_only=True)
class Float8E4M3FN(_MLDtypesFloat):
    """float8 e4m3, finite only (NaN is 0x7f/0xff)."""

    dtype_cls = type(np.dtype(ml_dtypes.float8_e4m3fn))
    _zarr_v3_name = "float8_e4m3fn"


@dataclass(frozen=True, kw_only=True)
class Float8E5M2(_MLDtypesFloat):
    """float8 e5m2, IEEE-like with inf and NaN."""

    dtype_cls = type(np.dtype(ml_dtypes.float8_e5m2))
    _zarr_v3_name = "float8_e5m2"


@dataclass(frozen=True, kw_only=True)
class Float8E4M3FNUZ(_MLDtypesFloat):
    """float8 e4m3, finite, no negative zero (NaN is 0x80)."""

    dtype_cls = type(np.dtype(ml_dtypes.float8_e4m3fnuz))
    _zarr_v3_name = "float8_e4m3fnuz"


@dataclass(frozen=True, kw_only=True)
class Float8E5M2FNUZ(_MLDtypesFloat):
    """float8 e5m2, no inf, no negative zero (NaN is 0x80)."""

    dtype_cls = type(np.dtype(ml_dtypes.float8_e5m2fnuz))
    _zarr_v3_name = "float8_e5m2fnuz"


@dataclass(frozen=True, kw_only=True)
class Float8E8M0FNU(_MLDtypesFloat):
    """float8 e8m0, unsigned powers of two only (the MX block scale; NaN is 0xff, no zero)."""

    dtype_cls = type(np.dtype(ml_dtypes.float8_e8m0fnu))
    _zarr_v3_name = "float8_e8m0fnu"


for _cls in (BFloat16, Float8E4M3FN, Float8E5M2, Float8E4M3FNUZ, Float8E5M2FNUZ, Float8E8M0FNU):
    data_type_registry.register(_cls._zarr_v3_name, _cls)
