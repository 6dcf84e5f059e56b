"""Incremental saves: a shard object whose bytes equal the previous checkpoint's is linked, not rewritten.

Fine-tuning keeps most weights frozen, so most shard objects of step N are byte for byte those of step
N-1. A save asked to be incremental records the SHA-256 of every shard object it stores in
``shardstore.digests.json`` at the checkpoint root (written by rank 0 before the root marker, so a
complete checkpoint has its digests). The next incremental save hashes each object it encodes and, where
the previous checkpoint recorded the same digest for the same key (and holds an object of that size),
stores it with ``Storage.link_from`` (a hard link locally, a server-side copy on object stores) instead
of writing it. The digest covers the whole stored object (data, crc32c values, shard index), so equal
digests mean the linked object is exactly the one this save would have written, layout included; crc32c
alone would not do (it is not collision-resistant). Every checkpoint stays self-contained: a hard link is
a second name of the same file, and objects are never modified in place after commit.

Hashing costs about 1 s per GiB on one core, so only a save that asks for it hashes (docs/format.md §10).
"""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Mapping

from shardstore.errors import CorruptCheckpointError, MissingChunkError
from shardstore.storage import Storage

__all__ = ["DIGESTS", "ObjectWriter", "check_incremental", "read_digests", "write_digests"]

DIGESTS = "shardstore.digests.json"  # at the checkpoint root, beside the root zarr.json
_FORMAT = "shardstore-digests"
_ALGORITHM = "sha256"


def encode_digests(digests: Mapping[str, str]) -> bytes:
    """The digests file: every shard object's key and the SHA-256 (hex) of its stored bytes."""
    record = {"format": _FORMAT, "version": 1, "algorithm": _ALGORITHM, "objects": dict(sorted(digests.items()))}
    return json.dumps(record, indent=1).encode()


def decode_digests(text: bytes | bytearray, where: str) -> dict[str, str]:
    """The objects table of a digests file; ``CorruptCheckpointError`` naming ``where`` if it is not one."""
    try:
        record = json.loads(text)
        ok = record["format"] == _FORMAT and record["version"] == 1 and record["algorithm"] == _ALGORITHM
        objects = record["objects"]
        ok = ok and isinstance(objects, dict) and all(isinstance(v, str) and len(v) == 64 for v in objects.values())
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise CorruptCheckpointError(
            f"{where} is not a shardstore digests file (expected JSON with format {_FORMAT!r}, version 1, "
            f"algorithm {_ALGORITHM!r} and an objects table of hex SHA-256 digests); an incremental save "
            "cannot link to this checkpoint — save without incremental, or delete the file"
        )
    return objects


def check_incremental(incremental: object) -> None:
    """``incremental`` is False (no hashing), True (record digests) or the URL of an earlier checkpoint."""
    if not isinstance(incremental, (bool, str)):
        raise TypeError(f"incremental must be False, True or the URL of an earlier checkpoint, got {incremental!r}")


def read_digests(checkpoint: Storage) -> dict[str, str]:
    """The digests a complete checkpoint recorded; empty when it was saved without them."""
    try:
        text = checkpoint.read(DIGESTS)
    except MissingChunkError:
        return {}
    return decode_digests(text, checkpoint.key_url(DIGESTS))


def write_digests(checkpoint: Storage, digests: Mapping[str, str]) -> None:
    checkpoint.write(DIGESTS, encode_digests(digests))


class ObjectWriter:
    """Stores one rank's shard objects for an incremental save: hashes each, links it from ``previous``
    when that checkpoint recorded the same digest under the same key, writes it otherwise.

    Called from several writer threads at once (``hashlib`` releases the GIL on large buffers, so hashing
    overlaps); ``digests`` and the counters are updated under a lock.
    """

    def __init__(self, previous: Storage | None = None, previous_digests: Mapping[str, str] | None = None) -> None:
        self.previous = previous
        self.previous_digests = dict(previous_digests or {})
        self.digests: dict[str, str] = {}
        self.linked = 0
        self.linked_bytes = 0
        self._lock = threading.Lock()

    @classmethod
    def for_save(cls, incremental: bool | str, storage_options: dict | None) -> "ObjectWriter | None":
        """What stores a save's objects: None (plain writes) unless it is incremental; a writer linking
        from the checkpoint at ``incremental`` when that is a URL."""
        if incremental is False:
            return None
        if incremental is True:
            return cls()
        previous = Storage(incremental, storage_options)
        return cls(previous, read_digests(previous))

    def put(self, dest: Storage, key: str, blob: memoryview) -> None:
        digest = hashlib.sha256(blob).hexdigest()
        linked = self._unchanged(key, digest, len(blob))
        if linked:
            dest.link_from(self.previous, key)
        else:
            dest.write(key, blob)
        with self._lock:
            self.digests[key] = digest
            self.linked += linked
            self.linked_bytes += len(blob) if linked else 0

    def _unchanged(self, key: str, digest: str, nbytes: int) -> bool:
        """Whether the previous checkpoint holds this very object (its digest recorded, its size matching)."""
        if self.previous is None or self.previous_digests.get(key) != digest:
            return False
        try:
            return self.previous.size(key) == nbytes
        except MissingChunkError:
            return False
