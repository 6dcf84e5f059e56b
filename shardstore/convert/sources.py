"""Reading checkpoints of any supported format as a ``TensorSource``: names, shapes and dtypes up front,
then one tensor (or a range of its rows) at a time, so nothing ever holds a whole checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

import shardstore.api as api
from shardstore.dtypes import dtype_info_by_name

__all__ = ["FORMATS", "TensorMeta", "TensorSource", "ZarrSource", "detect_format", "open_source"]

FORMATS = ("zarr",)


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


class TensorSource(Protocol):
    """A checkpoint read tensor by tensor."""

    url: str

    def tensors(self) -> dict[str, TensorMeta]:
        """Every tensor by dotted name, in the checkpoint's order."""

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """Tensor ``name``, or rows ``rows`` (a step-1 slice of dim 0) of it."""


class ZarrSource:
    """A shardstore checkpoint, through ``shardstore.open`` (every read checksummed)."""

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self._ckpt = api.open(url, storage_options)
        self.url = self._ckpt.url

    def tensors(self) -> dict[str, TensorMeta]:
        out = {}
        for name in self._ckpt.keys():
            meta = self._ckpt.metadata(name)
            out[name] = TensorMeta(tuple(meta["shape"]), dtype_info_by_name(meta["dtype"], name).torch_dtype)
        return out

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        return self._ckpt.read(name, None if rows is None else (rows,))


def detect_format(url: str, storage_options: dict | None = None) -> str:
    """The format of the checkpoint at ``url``."""
    return "zarr"


def open_source(url: str, storage_options: dict | None = None, fmt: str | None = None) -> TensorSource:
    """The checkpoint at ``url`` as a ``TensorSource``; its format is detected unless ``fmt`` names it."""
    fmt = fmt or detect_format(url, storage_options)
    return ZarrSource(url, storage_options)
