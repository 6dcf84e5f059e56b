"""Checkpoints of sharded training state as Zarr v3 arrays through fsspec, resharded on load.

``save(state_dict, url)`` writes, every rank its own chunks (``async_save`` returns once the tensors are
copied and writes in the background); ``load(state_dict, url)`` fills a state
dict in place on any mesh; ``open(url)`` reads tensors or slices without a process group;
``CheckpointManager(root_url)`` saves a run's steps, prunes old ones and restores the latest.
"""

from shardstore.api import Checkpoint, LoadResult, SaveResult, load, open, save
from shardstore.async_saver import AsyncSave, async_save, prepare_async_save
from shardstore.errors import (
    CheckpointChangedError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConcurrentSaveError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    MissingChunkError,
    NotACheckpointError,
    PartialLoadError,
    SaveInProgressError,
    ShardstoreError,
    StagingAbortedError,
    StateDictMismatchError,
    StorageUnavailableError,
    UnsafeKeyError,
    UnsupportedInputError,
)
from shardstore.manager import CheckpointManager

__all__ = [
    "save",
    "async_save",
    "prepare_async_save",
    "AsyncSave",
    "load",
    "open",
    "Checkpoint",
    "CheckpointManager",
    "SaveResult",
    "LoadResult",
    "ShardstoreError",
    "CheckpointChangedError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "ConcurrentSaveError",
    "NotACheckpointError",
    "IncompleteCheckpointError",
    "CorruptCheckpointError",
    "MissingChunkError",
    "PartialLoadError",
    "StateDictMismatchError",
    "StorageUnavailableError",
    "UnsafeKeyError",
    "UnsupportedInputError",
    "SaveInProgressError",
    "StagingAbortedError",
]
