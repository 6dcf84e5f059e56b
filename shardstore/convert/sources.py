"""Reading checkpoints of any supported format as a ``TensorSource``: names, shapes and dtypes up front,
then one tensor, or one region of it, at a time, so nothing ever holds a whole checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

import shardstore.api as api
from shardstore import format as fmt
from shardstore.dtypes import dtype_info_by_name
from shardstore.errors import CheckpointNotFoundError
from shardstore.storage import Storage

__all__ = ["FORMATS", "TensorMeta", "TensorSource", "Region", "ZarrSource", "detect_format", "open_source",
           "row_blocks", "split_url", "apply_region"]

FORMATS = ("zarr", "safetensors", "dcp", "torch")
Region = Sequence[slice]  # step-1 slices of the leading dims; None everywhere means the whole tensor
DCP_METADATA = ".metadata"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"


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

    def read(self, name: str, region: Region | None = None) -> torch.Tensor:
        """Tensor ``name``, or the part ``region`` selects (contiguous, on the CPU)."""


class ZarrSource:
    """A shardstore checkpoint, through ``shardstore.open`` (every read checksummed, only the inner
    chunks a region needs are fetched)."""

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self._ckpt = api.open(url, storage_options)
        self.url = self._ckpt.url

    def tensors(self) -> dict[str, TensorMeta]:
        out = {}
        for name in self._ckpt.keys():
            meta = self._ckpt.metadata(name)
            out[name] = TensorMeta(tuple(meta["shape"]), dtype_info_by_name(meta["dtype"], name).torch_dtype)
        return out

    def read(self, name: str, region: Region | None = None) -> torch.Tensor:
        return self._ckpt.read(name, None if region is None else tuple(region))


def apply_region(tensor: torch.Tensor, region: Region | None) -> torch.Tensor:
    return tensor if region is None else tensor[tuple(region)].contiguous()


def row_blocks(meta: TensorMeta, block_bytes: int) -> list[slice | None]:
    """Row ranges of about ``block_bytes`` covering the tensor (``[None]``: read it whole, a 0-d or
    empty tensor)."""
    if not meta.shape or meta.shape[0] == 0:
        return [None]
    row_bytes = max(1, meta.nbytes // meta.shape[0])
    step = max(1, block_bytes // row_bytes)
    return [slice(i, min(i + step, meta.shape[0])) for i in range(0, meta.shape[0], step)]


def split_url(url: str) -> tuple[str, str]:
    """(the directory URL, the file name) of a file URL."""
    parent, sep, name = url.rstrip("/").rpartition("/")
    return (parent if sep else "."), name


def detect_format(url: str, storage_options: dict | None = None) -> str:
    """The format of the checkpoint at ``url``, from its names: a ``*.safetensors`` file or a directory
    with a safetensors index or file; a directory with DCP's ``.metadata``; a directory with a root
    ``zarr.json``; any other file is taken for a ``torch.save`` file."""
    if url.rstrip("/").endswith(".safetensors"):
        return "safetensors"
    here = Storage(url, storage_options)
    for key, name in ((fmt.ZARR_JSON, "zarr"), (DCP_METADATA, "dcp"), (SAFETENSORS_INDEX, "safetensors"),
                      (SAFETENSORS_FILE, "safetensors")):
        if here.exists(key):
            return name
    parent, name = split_url(url)
    if Storage(parent, storage_options).exists(name):
        return "torch"
    raise CheckpointNotFoundError(
        f"no checkpoint at {url}: expected a shardstore checkpoint (zarr.json), a torch DCP directory "
        f"(.metadata), a safetensors file or directory ({SAFETENSORS_FILE} or {SAFETENSORS_INDEX}), or a "
        "torch.save file; check the URL, or name the format with --from"
    )


def open_source(url: str, storage_options: dict | None = None, fmt_name: str | None = None) -> TensorSource:
    """The checkpoint at ``url`` as a ``TensorSource``; its format is detected unless ``fmt_name`` names it."""
    from shardstore.convert import dcp, safetensors, torchfile  # noqa: PLC0415 - each format's module imports this one

    fmt_name = fmt_name or detect_format(url, storage_options)
    readers = {"zarr": ZarrSource, "safetensors": safetensors.SafetensorsSource, "dcp": dcp.DcpSource,
               "torch": torchfile.TorchSource}
    if fmt_name not in readers:
        raise ValueError(f"unknown checkpoint format {fmt_name!r}; expected one of {FORMATS}")
    return readers[fmt_name](url, storage_options)
