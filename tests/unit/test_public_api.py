"""The public surface is locked: what users import, and that it mirrors torch's names."""

import torch.distributed.tensor as torch_dt

import dtensor
import shardstore

DTENSOR_API = {
    "DTensor", "DeviceMesh", "init_device_mesh", "Placement", "Shard", "Replicate", "Partial",
    "distribute_tensor", "distribute_module", "from_torch", "zeros", "ones", "empty", "full", "rand", "randn",
}
SHARDSTORE_API = {
    "save", "load", "open", "Checkpoint", "CheckpointManager", "SaveResult", "LoadResult", "ShardstoreError", "CheckpointExistsError",
    "CheckpointNotFoundError", "IncompleteCheckpointError", "CorruptCheckpointError", "MissingChunkError",
    "StateDictMismatchError", "UnsafeKeyError", "PartialLoadError", "ConcurrentSaveError", "NotACheckpointError",
    "UnsupportedInputError", "CheckpointChangedError", "StorageUnavailableError", "async_save", "AsyncSave",
    "prepare_async_save", "SaveInProgressError", "StagingAbortedError",
}


def test_dtensor_public_api_is_locked():
    assert set(dtensor.__all__) == DTENSOR_API
    assert all(hasattr(dtensor, name) for name in DTENSOR_API)


def test_dtensor_names_mirror_torch():
    shared = DTENSOR_API - {"from_torch"}
    assert shared <= set(dir(torch_dt)) | {"DeviceMesh", "init_device_mesh"}
    for method in ("from_local", "to_local", "full_tensor", "redistribute", "device_mesh", "placements"):
        assert hasattr(dtensor.DTensor, method) and hasattr(torch_dt.DTensor, method)


def test_dtensor_submodules_mirror_torch():
    import torch.distributed.tensor.experimental as torch_experimental

    import dtensor.experimental

    assert set(dtensor.experimental.__all__) <= set(dir(torch_experimental))


def test_shardstore_public_api_is_locked():
    assert set(shardstore.__all__) == SHARDSTORE_API
    assert all(hasattr(shardstore, name) for name in SHARDSTORE_API)
    assert issubclass(shardstore.IncompleteCheckpointError, FileNotFoundError)
    assert issubclass(shardstore.CorruptCheckpointError, ValueError)
    assert issubclass(shardstore.ConcurrentSaveError, shardstore.CheckpointExistsError)
    assert issubclass(shardstore.NotACheckpointError, FileExistsError)
