"""Zero-copy conversion between our DTensor and ``torch.distributed.tensor.DTensor``.

Both wrap the same local tensor with the same mesh; only the placement classes differ. torch's
``torch.distributed.tensor`` is imported by a conversion, not with this module (``import dtensor``
would take ~0.6 s longer for it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from . import placements as ours
from .api import DTensor
from .spec import DTensorSpec

if TYPE_CHECKING:
    import torch.distributed.tensor as torch_dt

__all__ = ["from_torch", "to_torch"]


def _torch_dt():
    return importlib.import_module("torch.distributed.tensor")


def _placement_to_torch(p: ours.Placement) -> torch_dt.Placement:
    torch_dt = _torch_dt()
    if isinstance(p, ours.Shard):
        return torch_dt.Shard(p.dim)
    if isinstance(p, ours.Partial):
        return torch_dt.Partial(p.reduce_op)
    return torch_dt.Replicate()


def _placement_from_torch(p: torch_dt.Placement) -> ours.Placement:
    if p.is_shard():
        if type(p) is not _torch_dt().Shard:
            raise ValueError(f"cannot convert torch placement {p!r}: only plain Shard/Replicate/Partial are supported")
        return ours.Shard(p.dim)
    if p.is_partial():
        if type(p) is not _torch_dt().Partial:
            # torch's Partial subclasses reduce otherwise than their reduce_op says (the 2-norm's partial
            # norms, the masked vocab-parallel lookup): read as a plain Partial the value would be wrong
            raise ValueError(
                f"cannot convert torch placement {p!r}: only plain Shard/Replicate/Partial are supported; "
                "redistribute torch's DTensor to Replicate (or Shard) first"
            )
        return ours.Partial(p.reduce_op)
    return ours.Replicate()


def from_torch(t: torch_dt.DTensor) -> DTensor:
    """Our DTensor over the same local tensor and mesh as a torch DTensor (no copy, no communication)."""
    placements = tuple(_placement_from_torch(p) for p in t.placements)
    spec = DTensorSpec(t.device_mesh, placements, t.shape, tuple(t.stride()), t.dtype)
    return DTensor(t._local_tensor, spec, requires_grad=t.requires_grad)


def to_torch(t: DTensor) -> torch_dt.DTensor:
    """torch's DTensor over the same local tensor and mesh (no copy, no communication)."""
    spec = t._spec
    return _torch_dt().DTensor.from_local(
        t._local_tensor,
        spec.mesh,
        [_placement_to_torch(p) for p in spec.placements],
        run_check=False,
        shape=spec.shape,
        stride=spec.stride,
    )
