"""The public surface is locked: what users import, and that it mirrors torch's names."""

import torch
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
    import torch.distributed.tensor.debug as torch_debug
    import torch.distributed.tensor.experimental as torch_experimental

    import dtensor.debug
    import dtensor.experimental

    assert set(dtensor.experimental.__all__) == set(torch_experimental.__all__) - {"context_parallel"}
    assert set(dtensor.debug.__all__) == set(torch_debug.__all__)


def test_dtensor_parallel_exports_torchs_names():
    import torch.distributed.tensor.parallel as torch_parallel

    import dtensor.parallel

    assert set(dtensor.parallel.__all__) == set(torch_parallel.__all__)
    assert all(hasattr(dtensor.parallel, name) for name in torch_parallel.__all__)


def test_shardstore_public_api_is_locked():
    assert set(shardstore.__all__) == SHARDSTORE_API
    assert all(hasattr(shardstore, name) for name in SHARDSTORE_API)
    assert issubclass(shardstore.IncompleteCheckpointError, FileNotFoundError)
    assert issubclass(shardstore.CorruptCheckpointError, ValueError)
    assert issubclass(shardstore.ConcurrentSaveError, shardstore.CheckpointExistsError)
    assert issubclass(shardstore.NotACheckpointError, FileExistsError)


def test_importing_the_packages_and_the_tool_leaves_heavy_modules_unloaded(tmp_path):
    """A fresh process that imports shardstore, dtensor and the command-line tool, saves plain tensors
    and converts them to safetensors pays for neither torch DCP and torch's DTensor (~0.9 s together)
    nor ml_dtypes (~0.7 s): they load when a DCP conversion or torch's DTensor needs them."""
    import subprocess
    import sys

    heavy = ("torch.distributed.checkpoint", "torch.distributed.tensor", "ml_dtypes", "zarr")
    ck, st = str(tmp_path / "ck"), str(tmp_path / "model.safetensors")
    code = (
        "import sys, torch, shardstore, dtensor, shardstore.cli; from shardstore.convert.sinks import convert; "
        f"shardstore.save({{'w': torch.ones(3)}}, {ck!r}); convert({ck!r}, {st!r}, 'safetensors'); "
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""


def test_stateful_is_dcps_protocol():
    """Our ``Stateful`` (no DCP import to check for one) passes exactly the values DCP's passes."""
    from torch.distributed.checkpoint.stateful import Stateful as DcpStateful

    from shardstore.stateful import Stateful, is_stateful

    class Both:
        def state_dict(self):
            return {}

        def load_state_dict(self, state_dict):
            pass

    class SaveOnly:
        def state_dict(self):
            return {}

    class NoneMethod(Both):
        load_state_dict = None

    values = (Both(), SaveOnly(), NoneMethod(), {}, torch.nn.Linear(1, 1), torch.optim.SGD([torch.zeros(1)], lr=0.1), 3,
              torch.zeros(2), Both)
    for value in values:
        assert isinstance(value, Stateful) == isinstance(value, DcpStateful) == is_stateful(value), value


def test_saving_and_loading_our_dtensor_leaves_torch_dcp_unloaded(tmp_path):
    """shardstore asks our DTensor for its region directly: its checkpoint hooks answer in DCP's types,
    whose import (~0.9 s) would otherwise land in a fresh process's first save or load."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = f"""
import os, sys, torch, torch.distributed as dist, dtensor, shardstore
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}", RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo")
mesh = dtensor.init_device_mesh("cpu", (1,))
w = torch.randn(6, 4)
shardstore.save({{"w": dtensor.distribute_tensor(w, mesh, [dtensor.Shard(0)])}}, {str(tmp_path / "ck")!r})
target = {{"w": dtensor.distribute_tensor(torch.zeros(6, 4), mesh, [dtensor.Shard(1)])}}
shardstore.load(target, {str(tmp_path / "ck")!r})
assert torch.equal(target["w"].full_tensor(), w)
dist.destroy_process_group()
print(",".join(m for m in ("torch.distributed.checkpoint", "torch.distributed.tensor") if m in sys.modules))
"""
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""
