"""The checkpoint hooks torch DCP (and shardstore) call to learn what this rank holds.

They only describe: the region of the global tensor this rank has and the tensor to read from or load
into. Conventions that DCP relies on: an empty shard's offset equals the dim size (so dedup and bounds
checks hold), the load target is the local tensor itself (loads copy into it), and a rank outside the
DTensor's mesh contributes nothing.

DCP's types are imported when a hook first runs, not with this module: importing
``torch.distributed.checkpoint`` (and the ``torch.distributed.tensor`` it pulls in) took ~0.9 s of
every fresh process's start here, paid by scripts and command-line tools that never checkpoint a DTensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import WriteItem

__all__ = ["create_write_items", "create_chunk_list", "get_tensor_shard", "local_region"]


def local_region(dt):
    """The region of the global tensor this rank holds (a ``Box``; None outside the DTensor's mesh),
    without DCP's types: shardstore asks this directly, so its first save or load of our DTensor does
    not import DCP."""
    if dt._spec.has_partial:
        raise ValueError(
            f"cannot checkpoint a DTensor with placements {list(dt._spec.placements)}: a Partial value is a pending "
            "reduction, not data. Reduce it first, e.g. t.redistribute(placements=[Replicate()] * mesh.ndim)"
        )
    return dt._spec.local_box()


def create_write_items(dt, fqn: str) -> list[WriteItem]:
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    chunks = create_chunk_list(dt)
    if not chunks:
        return []
    chunk = chunks[0]
    return [
        WriteItem(
            index=MetadataIndex(fqn, chunk.offsets),
            type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(
                chunk=chunk, properties=TensorProperties.create_from_tensor(dt._local_tensor), size=dt._spec.shape
            ),
        )
    ]


def create_chunk_list(dt) -> list[ChunkStorageMetadata]:
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    box = local_region(dt)
    if box is None:
        return []
    return [ChunkStorageMetadata(offsets=torch.Size(box.offsets), sizes=torch.Size(box.sizes))]


def get_tensor_shard(dt, index) -> torch.Tensor:
    return dt._local_tensor
