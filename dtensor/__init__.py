"""A distributed tensor whose public API mirrors ``torch.distributed.tensor`` name for name.

Switching is one import: ``from dtensor import DTensor, Shard, Replicate, distribute_tensor, ...``.
The mesh is torch's own ``DeviceMesh``, so meshes are shared with FSDP2 and tensor parallel.
"""

import torch

from .api import DTensor, _rebuild, distribute_tensor
from .collectives import DeviceMesh, init_device_mesh
from .convert import from_torch
from .factories import empty, full, ones, rand, randn, zeros
from .module import distribute_module
from .placements import Partial, Placement, Replicate, Shard
from .spec import DTensorSpec

__all__ = [
    "DTensor",
    "DeviceMesh",
    "init_device_mesh",
    "Placement",
    "Shard",
    "Replicate",
    "Partial",
    "distribute_tensor",
    "distribute_module",
    "from_torch",
    "zeros",
    "ones",
    "empty",
    "full",
    "rand",
    "randn",
]

# torch.load(weights_only=True) rebuilds a DTensor only from allow-listed classes.
torch.serialization.add_safe_globals([DTensor, _rebuild, DTensorSpec, Shard, Replicate, Partial, DeviceMesh])
