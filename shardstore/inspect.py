"""What a checkpoint holds, from its root record alone: keys, shapes, dtypes, chunk layout, save-time
mesh and placements, user metadata. ``shardstore inspect`` prints it; nothing here reads tensor data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from shardstore import format as fmt
from shardstore.dtypes import dtype_info_by_name
from shardstore.flatten import display_names, node_path, unflatten
from shardstore.owners import owner_art, parse_placements
from shardstore.storage import Storage

__all__ = ["TensorInfo", "CheckpointInfo", "describe"]


@dataclass(frozen=True)
class TensorInfo:
    """One saved tensor as its root record entry describes it."""

    name: str  # the dotted name ``open().read`` takes
    path: str  # its Zarr node path
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    chunk_shape: tuple[int, ...]
    inner_chunk_shape: tuple[int, ...]
    compressor: str | None
    mesh_shape: tuple[int, ...]
    placements: tuple[str, ...]

    def owners(self) -> str | None:
        """Text art of which save-time rank held which block, for a non-empty 2-D sharded tensor."""
        if len(self.shape) != 2 or not math.prod(self.shape) or not self.mesh_shape:
            return None
        return owner_art(self.shape, self.mesh_shape, parse_placements(self.placements))

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path, "shape": list(self.shape), "dtype": self.dtype, "nbytes": self.nbytes,
            "chunk_shape": list(self.chunk_shape), "inner_chunk_shape": list(self.inner_chunk_shape),
            "compressor": self.compressor, "mesh_shape": list(self.mesh_shape), "placements": list(self.placements),
        }


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint's table of contents. ``tree`` is the saved state dict with every tensor replaced by
    its ``TensorInfo`` and plain values as saved."""

    url: str
    commit_id: str
    torch_version: str
    shardstore_version: str
    user_metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    tree: Any

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url, "commit_id": self.commit_id, "torch_version": self.torch_version,
            "shardstore_version": self.shardstore_version, "nbytes": self.nbytes, "user_metadata": self.user_metadata,
            "tensors": {name: t.to_json() for name, t in self.tensors.items()}, "tree": _json_tree(self.tree),
        }


def _json_tree(node: Any) -> Any:
    """``tree`` as JSON: each tensor as ``{"tensor": its name}`` (a key of ``tensors``), plain values as
    saved (a non-finite float as its repr, a tuple as a list, dict keys as strings), so a script reads
    the saved step or learning rate as the text output shows them."""
    if isinstance(node, TensorInfo):
        return {"tensor": node.name}
    if isinstance(node, dict):
        return {str(k): _json_tree(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_json_tree(v) for v in node]
    if isinstance(node, float) and not math.isfinite(node):
        return repr(node)
    return node


def describe(url: str, storage_options: dict | None = None) -> CheckpointInfo:
    """Read and validate the root record at ``url`` (one small read) and describe every tensor."""
    root = fmt.read_root(Storage(url, storage_options).pinned())  # an overwritten one's current version
    keys = root.key_paths()
    names = display_names(keys[path] for path in root.tensors)
    by_key = {key: _tensor_info(name, root.tensors[node_path(key)]) for name, key in names.items()}
    return CheckpointInfo(
        url, root.commit_id, root.torch_version, root.shardstore_version, root.user_metadata,
        {t.name: t for t in by_key.values()}, unflatten(root.tree, by_key),
    )


def _tensor_info(name: str, record: fmt.TensorRecord) -> TensorInfo:
    itemsize = dtype_info_by_name(record.dtype, name).itemsize
    return TensorInfo(
        name, record.path, record.shape, record.dtype, math.prod(record.shape) * itemsize, record.chunk_shape,
        record.inner_chunk_shape, record.compressor, record.mesh_shape, record.placements,
    )
