"""Bytes by key under one root URL: the storage seam (``base``) and its backends (``local``: ``os``
calls on a local filesystem, ``posix`` and ``direct_io`` below it; ``remote``: everything fsspec
reaches, the only fsspec user)."""

from shardstore.storage.base import (
    CURRENT, ROOM_ALIGN, ROOM_SLACK, VERSION_PREFIX, Blob, HeldLock, Storage, blob_nbytes, check_key, io_map, refuse_nested,
)

__all__ = ["Storage", "Blob", "blob_nbytes", "HeldLock", "check_key", "CURRENT", "VERSION_PREFIX", "ROOM_ALIGN", "ROOM_SLACK", "io_map", "refuse_nested"]
