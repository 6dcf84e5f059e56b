"""Cell digests and the digests file of an incremental save (docs/format.md §10).

A cell's digest is BLAKE3 over a header naming its layout — dtype, array shape, chunk and inner chunk
shapes, codec configuration, the cell's coordinates and the version of the encoding — then the cell's
values as C-order little-endian bytes, taken before encoding. Equal digests under one key therefore mean
equal values in an equal layout, so the stored object (a deterministic function of both) is the one the
save would write; the same bytes under another layout never match. crc32c would not do: it is not
collision-resistant. BLAKE3 is (and runs at several GiB/s, releasing the GIL).

``shardstore.digests.json`` at the checkpoint root records, per shard object key, that digest and the
stored object's size. A file of another version (version 1 held SHA-256 digests of the stored bytes)
means "nothing to link", never a wrong link; a file that is not a digests file at all is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator, Mapping

import blake3
import torch

from shardstore.codec import ZSTD_LEVEL, ArrayLayout
from shardstore.errors import CorruptCheckpointError, MissingChunkError
from shardstore.memcopy import as_bytes, copy_bytes
from shardstore.plan import dtype_name
from shardstore.storage import Storage

__all__ = ["DIGESTS", "StoredObject", "CellHasher", "encode_digests", "decode_digests", "read_digests", "write_digests"]

DIGESTS = "shardstore.digests.json"  # at the checkpoint root, beside the root zarr.json
_FORMAT = "shardstore-digests"
_VERSION = 2
_ALGORITHM = "blake3"
_CELL_ENCODING = "shardstore-cell/1"  # bump whenever the bytes ``codec.encode_shard`` makes of a cell change
_PIECE_BYTES = 16 << 20  # a non-contiguous cell is hashed through a reused buffer of about this size
_HASH_THREADS = min(8, os.cpu_count() or 1)  # BLAKE3 splits big inputs over these; more gain little


@dataclass(frozen=True)
class StoredObject:
    """What the digests file records of one shard object."""

    digest: str  # hex BLAKE3 of the cell's layout header and values (``CellHasher.digest``)
    nbytes: int  # the stored object's size


class CellHasher:
    """Digests of cells (CPU tensors), one after another, by one BLAKE3 hasher reset between cells: its
    threads (``_HASH_THREADS``) are started once, not per cell. They are its own, not BLAKE3's global
    pool (``max_threads=AUTO``), which a forked child inherits dead: its first hash would hang. Keeps
    one scratch buffer for cells that are not contiguous in memory (a column slice of a tensor), so none
    is ever copied whole."""

    def __init__(self) -> None:
        self._hasher = blake3.blake3(max_threads=_HASH_THREADS)
        self._scratch = torch.empty(0, dtype=torch.uint8)

    def digest(self, layout: ArrayLayout, coords: tuple[int, ...], values: torch.Tensor) -> str:
        """The digest of cell ``coords`` of ``layout`` holding ``values`` (its clipped box, on the CPU)."""
        self._hasher.reset()
        self._hasher.update(layout_header(layout, coords))
        for piece in self._pieces(values.detach()):
            self._hasher.update(as_bytes(piece).numpy())
        return self._hasher.hexdigest()

    def _pieces(self, values: torch.Tensor) -> Iterator[torch.Tensor]:
        """``values`` in C order as contiguous tensors: itself when contiguous, else blocks of its leading
        dim copied into the scratch buffer."""
        if values.is_contiguous():
            yield values
            return
        row_bytes = values[0].numel() * values.element_size()
        rows = max(1, _PIECE_BYTES // max(1, row_bytes))
        for start in range(0, values.shape[0], rows):
            yield self._contiguous(values[start : start + rows])

    def _contiguous(self, block: torch.Tensor) -> torch.Tensor:
        if block.is_contiguous():
            return block
        nbytes = block.numel() * block.element_size()
        if self._scratch.numel() < nbytes:
            self._scratch = torch.empty(nbytes, dtype=torch.uint8)
        dest = self._scratch[:nbytes].view(block.dtype).view(block.shape)
        if not copy_bytes(dest, block):
            dest.copy_(block)
        return dest


def layout_header(layout: ArrayLayout, coords: tuple[int, ...]) -> bytes:
    """What, besides the values, decides a cell's stored bytes; one line of JSON hashed before them."""
    header = {
        "encoding": _CELL_ENCODING,
        "dtype": dtype_name(layout.dtype),
        "shape": list(layout.shape),
        "chunk_shape": list(layout.chunk_shape),
        "inner_chunk_shape": list(layout.inner_chunk_shape),
        "codec": {"compressor": layout.compressor, "level": ZSTD_LEVEL if layout.compressor else None},
        "cell": list(coords),
    }
    return (json.dumps(header, sort_keys=True) + "\n").encode()


def encode_digests(objects: Mapping[str, StoredObject]) -> bytes:
    """The digests file: every shard object's key, its cell digest and its stored size."""
    table = {key: {"digest": o.digest, "nbytes": o.nbytes} for key, o in sorted(objects.items())}
    return json.dumps({"format": _FORMAT, "version": _VERSION, "algorithm": _ALGORITHM, "objects": table}, indent=1).encode()


def decode_digests(text: bytes | bytearray, where: str) -> dict[str, StoredObject]:
    """The objects a digests file records; empty for a file of another version (nothing to link from);
    ``CorruptCheckpointError`` naming ``where`` for anything that is not a digests file."""
    try:
        record = json.loads(text)
        if record["format"] == _FORMAT and record["version"] != _VERSION:
            return {}
        if record["algorithm"] == _ALGORITHM and record["format"] == _FORMAT:
            return {key: _stored(entry) for key, entry in record["objects"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    raise CorruptCheckpointError(
        f"{where} is not a shardstore digests file (expected JSON with format {_FORMAT!r}, version {_VERSION}, "
        f"algorithm {_ALGORITHM!r} and an objects table of {{digest: 64 hex digits, nbytes}}); an incremental "
        "save cannot link to this checkpoint — save without incremental, or delete the file"
    )


def _stored(entry: dict) -> StoredObject:
    digest, nbytes = entry["digest"], entry["nbytes"]
    if not (isinstance(digest, str) and len(digest) == 64 and isinstance(nbytes, int) and nbytes >= 0):
        raise ValueError(f"not a digests entry: {entry!r}")
    return StoredObject(digest, nbytes)


def read_digests(checkpoint: Storage) -> dict[str, StoredObject]:
    """The objects a complete checkpoint recorded; empty when it was saved without digests."""
    try:
        text = checkpoint.read(DIGESTS)
    except MissingChunkError:
        return {}
    return decode_digests(text, checkpoint.key_url(DIGESTS))


def write_digests(checkpoint: Storage, objects: Mapping[str, StoredObject]) -> None:
    checkpoint.write(DIGESTS, encode_digests(objects))
