"""The one exception tree of shardstore.

Every error shardstore raises on purpose is a ``ShardstoreError`` and also the stdlib error that fits,
so callers can catch either::

    ShardstoreError(Exception)
    ├── CheckpointNotFoundError(FileNotFoundError)    nothing at all at the checkpoint URL
    ├── IncompleteCheckpointError(FileNotFoundError)  objects but no root zarr.json: a save was
    │                                                 interrupted or is still running
    ├── CheckpointExistsError(FileExistsError)        a save would replace data without overwrite=True
    │   └── ConcurrentSaveError                       another save to the same URL committed first, or
    │                                                 is committing, or took this save's claim
    ├── NotACheckpointError(FileExistsError)          the URL holds files that are not a checkpoint:
    │                                                 never replaced, even with overwrite=True
    ├── CorruptCheckpointError(ValueError)            checksum mismatch, truncated object,
    │   │                                             malformed metadata
    │   └── MissingChunkError(FileNotFoundError)      an object that should exist does not
    ├── PartialLoadError(RuntimeError)                a load failed (for the cause named in it, and
    │                                                 chained) after bytes landed in tensors
    ├── CheckpointChangedError(RuntimeError)          the checkpoint behind an ``open()`` handle was
    │                                                 replaced or deleted: re-open it
    ├── StorageUnavailableError(ConnectionError)      an object store kept failing with transient errors
    │                                                 (5xx, throttling, resets, timeouts) after retries
    ├── SaveInProgressError(RuntimeError)             an async save is still in flight and the new one
    │                                                 was told not to wait for it
    ├── StagingAbortedError(RuntimeError)             copying tensors for an async save failed; its
    │                                                 background writer stops (on every rank)
    ├── UnsafeKeyError(ValueError)                    a key that would escape the checkpoint root
    ├── UnsupportedInputError(TypeError)              a state dict entry or user_metadata a checkpoint
    │                                                 cannot hold, or a tensor a load cannot fill
    └── StateDictMismatchError(ValueError)            missing/extra keys, dtype or shape mismatch

Messages say what went wrong, where (key, object URL), what was expected, what arrived, and the fix.
"""

from __future__ import annotations

__all__ = [
    "ShardstoreError",
    "CheckpointNotFoundError",
    "IncompleteCheckpointError",
    "CheckpointExistsError",
    "ConcurrentSaveError",
    "NotACheckpointError",
    "CorruptCheckpointError",
    "MissingChunkError",
    "UnsafeKeyError",
    "UnsupportedInputError",
    "StateDictMismatchError",
    "PartialLoadError",
    "CheckpointChangedError",
    "StorageUnavailableError",
    "SaveInProgressError",
    "StagingAbortedError",
]


class ShardstoreError(Exception):
    """Base of every error shardstore raises on purpose."""


class CheckpointNotFoundError(ShardstoreError, FileNotFoundError):
    """Nothing at all exists at the checkpoint URL."""


class IncompleteCheckpointError(ShardstoreError, FileNotFoundError):
    """Objects exist but the root ``zarr.json`` (the commit marker) does not: the save never finished."""


class CheckpointExistsError(ShardstoreError, FileExistsError):
    """A save targets a URL that already holds data and was not told to overwrite it."""


class ConcurrentSaveError(CheckpointExistsError):
    """Another save to the same URL won: it committed while this one was writing, holds the commit
    lock too long, or removed this save's claim. This save committed nothing."""


class NotACheckpointError(ShardstoreError, FileExistsError):
    """The URL holds files that are not part of a shardstore checkpoint; a save never deletes them."""


class CorruptCheckpointError(ShardstoreError, ValueError):
    """Stored bytes or metadata are not what the format promises (checksum, length, JSON fields)."""


class MissingChunkError(CorruptCheckpointError, FileNotFoundError):
    """An object the checkpoint refers to (a shard object, a ``zarr.json``) does not exist.

    Raised by ``Storage`` for any missing key; a ``FileNotFoundError`` too, so generic code that
    probes for files keeps working.
    """


class UnsafeKeyError(ShardstoreError, ValueError):
    """A storage key that is empty, absolute, or has ``.``/``..``/empty components, ``\\`` or NUL."""


class UnsupportedInputError(ShardstoreError, TypeError):
    """What a caller handed to save or load cannot be stored or filled: a dtype with no Zarr type, a sparse,
    nested, quantized or meta tensor, an overlapping target, non-JSON ``user_metadata``. Raised while
    planning, before any byte is written or any tensor changes, naming the key."""


class StateDictMismatchError(ShardstoreError, ValueError):
    """The state dict to load into does not match the checkpoint (keys, dtypes, shapes)."""


class PartialLoadError(ShardstoreError, RuntimeError):
    """A load failed, for the cause its message gives (also its ``__cause__``), after bytes had landed in
    this rank's tensors: its state dict is partly loaded, and the message names the tensors written.
    Only damaged bytes fail that late (targets and indices are checked first); pass
    ``all_or_nothing=True`` to verify every chunk before any tensor changes."""


class CheckpointChangedError(ShardstoreError, RuntimeError):
    """The checkpoint at an ``open()`` handle's URL was replaced (another commit id) or deleted since the
    handle read its root record: decoding the new bytes with the old metadata could return wrong values,
    so the handle refuses; ``shardstore.open(url)`` again reads the new checkpoint."""


class StorageUnavailableError(ShardstoreError, ConnectionError):
    """An object-store request kept failing with transient errors (5xx, throttling, connection resets,
    timeouts) through every retry. A save that gets it commits nothing: the previous checkpoint stays."""


class SaveInProgressError(ShardstoreError, RuntimeError):
    """``async_save(..., wait_for_previous=False)`` found an earlier async save still in flight on some
    rank; raised on every rank, before anything of the new save happens."""


class StagingAbortedError(ShardstoreError, RuntimeError):
    """Copying this rank's tensors for an async save failed (the cause is chained); the background writer
    stops with it, so every rank's ``result()`` raises and nothing is committed."""
