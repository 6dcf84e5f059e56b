"""Reading checkpoints of any supported format as a ``TensorSource``: the state-dict tree (nesting and
plain values, in ``shardstore.flatten``'s skeleton format), names, shapes and dtypes up front, then one
tensor, or one region of it, at a time, so nothing ever holds a whole checkpoint."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Protocol, Sequence

import torch

import shardstore.api as api
from shardstore import format as fmt
from shardstore.dtypes import dtype_info_by_name
from shardstore.errors import CheckpointNotFoundError, UnsupportedInputError
from shardstore.other_contents import has_entry
from shardstore.flatten import KeyPath, display_names, flatten, fqn, node_children, unflatten
from shardstore.storage import Storage
from shardstore.validate import tree_tensor_keys

__all__ = ["FORMATS", "TensorMeta", "TensorSource", "Region", "IndexedSource", "ZarrSource", "detect_format",
           "open_source", "row_blocks", "split_url", "apply_region", "flatten_loaded", "tree_nodes", "plain_values",
           "plain_entries"]

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

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "TensorMeta":
        return cls(tuple(tensor.shape), tensor.dtype)


class TensorSource(Protocol):
    """A checkpoint read tensor by tensor."""

    url: str
    key_paths: dict[str, KeyPath]  # each tensor's key path in ``tree()``, by dotted name
    holds_values: bool  # whether the format holds plain values at all (safetensors does not)

    def tree(self) -> dict:
        """The state-dict skeleton (``shardstore.flatten``): nesting, plain values, tensors by key path."""

    def tensors(self) -> dict[str, TensorMeta]:
        """Every tensor by dotted name, in the checkpoint's order."""

    def read(self, name: str, region: Region | None = None) -> torch.Tensor:
        """Tensor ``name``, or the part ``region`` selects (contiguous, on the CPU)."""


class IndexedSource:
    """What every source shares: its tree, and its tensors named as ``shardstore.open`` names them (dotted
    key paths, node paths where two would read the same), so names agree across formats."""

    holds_values = True

    def __init__(self, url: str, tree: dict, metas: Mapping[KeyPath, TensorMeta]) -> None:
        self.url, self._tree = url, tree
        self.key_paths = display_names(metas)
        self._metas = {name: metas[key] for name, key in self.key_paths.items()}

    def tree(self) -> dict:
        return self._tree

    def tensors(self) -> dict[str, TensorMeta]:
        return dict(self._metas)


def flatten_loaded(value: Any, url: str, what: str) -> tuple[dict[KeyPath, Any], dict]:
    """``flatten`` of a state dict read from another format, errors naming the file it came from."""
    try:
        return flatten(value)
    except TypeError as exc:  # UnsupportedInputError included
        raise UnsupportedInputError(f"{what} {url}: {exc}") from exc


def tree_nodes(tree: dict) -> Iterator[tuple[KeyPath, dict, str | None]]:
    """Every node of ``tree`` with its key path and its parent's kind (None for the root), depth first."""
    stack: list[tuple[KeyPath, dict, str | None]] = [((), tree, None)]
    while stack:
        path, node, parent = stack.pop()
        yield path, node, parent
        kind = next(iter(node))
        stack.extend((path + (key,), child, kind) for key, child in reversed(node_children(node)))


def plain_values(tree: dict) -> list[tuple[str, str]]:
    """(dotted name, repr) of the non-tensor leaves of ``tree``: plain values and empty containers. The
    repr tells ``1`` from ``1.0`` and ``True``, and ``0.0`` from ``-0.0``; NaN equals NaN."""
    return [(fqn(path) or "<root>", repr(unflatten(node, {}))) for path, node, _ in tree_nodes(tree)
            if "tensor" not in node and not node_children(node)]


def plain_entries(tree: dict) -> list[str]:
    """Dotted names of the non-tensor leaves of ``tree`` (what a format holding tensors only leaves out)."""
    return [name for name, _ in plain_values(tree)]


class ZarrSource(IndexedSource):
    """A shardstore checkpoint, through ``shardstore.open`` (every read checksummed, only the inner
    chunks a region needs are fetched)."""

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self._ckpt = api.open(url, storage_options)
        keys = tree_tensor_keys(self._ckpt.tree, self._ckpt.url)
        metas = {}
        for name, key in display_names(keys).items():
            meta = self._ckpt.metadata(name)
            metas[key] = TensorMeta(tuple(meta["shape"]), dtype_info_by_name(meta["dtype"], name).torch_dtype)
        super().__init__(self._ckpt.url, self._ckpt.tree, metas)

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
    here = Storage(url, storage_options).pinned()  # an overwritten checkpoint's current version
    for key, name in ((fmt.ZARR_JSON, "zarr"), (DCP_METADATA, "dcp"), (SAFETENSORS_INDEX, "safetensors"),
                      (SAFETENSORS_FILE, "safetensors")):
        if has_entry(here, key):
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
    fmt_name = fmt_name or detect_format(url, storage_options)
    if fmt_name == "zarr":
        return ZarrSource(url, storage_options)
    # Each other format's module imports this one, and only the one read is imported (DCP's takes ~0.9 s).
    readers = {"safetensors": ("safetensors", "SafetensorsSource"), "dcp": ("dcp", "DcpSource"),
               "torch": ("torchfile", "TorchSource")}
    if fmt_name not in readers:
        raise ValueError(f"unknown checkpoint format {fmt_name!r}; expected one of {FORMATS}")
    module, reader = readers[fmt_name]
    return getattr(importlib.import_module(f"shardstore.convert.{module}"), reader)(url, storage_options)
