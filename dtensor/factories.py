"""DTensor factories: every rank allocates only its own shard."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import collectives, random
from .api import DTensor
from .placements import Box, Placement, PlacementError
from .spec import DTensorSpec

__all__ = ["zeros", "ones", "empty", "full", "rand", "randn"]


def _size(size: tuple) -> tuple[int, ...]:
    if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
        return tuple(size[0])
    return tuple(size)


def _make(
    make_local: Callable[[DTensorSpec, Box], torch.Tensor],
    size: tuple,
    device_mesh,
    placements: Sequence[Placement] | None,
    dtype: torch.dtype | None,
    requires_grad: bool,
    layout: torch.layout,
) -> DTensor:
    """The DTensor of ``make_local``'s shards. As torch's factories: strided tensors only (torch raises
    an AssertionError for any other layout, hence ``PlacementError``), and no placements (None or
    empty) mean Replicate on every mesh dim."""
    if layout != torch.strided:
        raise PlacementError(
            f"layout value not supported! DTensor factories make torch.strided tensors, got layout={layout}; "
            "make a strided DTensor and convert its local tensor (to_local()) if another layout is needed"
        )
    device_mesh = collectives.current_mesh(device_mesh, "DTensor factories")
    spec = DTensorSpec.create(device_mesh, placements or None, _size(size), dtype or torch.get_default_dtype())
    box = spec.local_box()
    if box is None:  # a rank outside the mesh holds an empty 1-D tensor, as torch's
        local = torch.empty(0, dtype=spec.dtype, device=device_mesh.device_type)
    else:
        local = make_local(spec, box)
    return DTensor(local, spec, requires_grad=requires_grad)


def _filled(value) -> Callable:
    def make(spec: DTensorSpec, box: Box) -> torch.Tensor:
        return torch.full(box.sizes, value, dtype=spec.dtype, device=spec.mesh.device_type)

    return make


def zeros(*size, requires_grad=False, dtype=None, layout=torch.strided, device_mesh=None, placements=None) -> DTensor:
    return _make(_filled(0), size, device_mesh, placements, dtype, requires_grad, layout)


def ones(*size, requires_grad=False, dtype=None, layout=torch.strided, device_mesh=None, placements=None) -> DTensor:
    return _make(_filled(1), size, device_mesh, placements, dtype, requires_grad, layout)


def full(size, fill_value, *, requires_grad=False, dtype=None, layout=torch.strided, device_mesh=None, placements=None) -> DTensor:
    """Without ``dtype`` the fill value decides it, as ``torch.full``'s: int64 for an int, bool for a bool,
    the default complex dtype for a complex number, the default dtype for a float."""
    if dtype is None:
        dtype = torch.full((), fill_value, device="meta").dtype
    return _make(_filled(fill_value), (size,), device_mesh, placements, dtype, requires_grad, layout)


def empty(*size, requires_grad=False, dtype=None, layout=torch.strided, device_mesh=None, placements=None) -> DTensor:
    def make(spec: DTensorSpec, box: Box) -> torch.Tensor:
        return torch.empty(box.sizes, dtype=spec.dtype, device=spec.mesh.device_type)

    return _make(make, size, device_mesh, placements, dtype, requires_grad, layout)


def _random(draw: Callable) -> Callable:
    seed = random.draw_seed()

    def make(spec: DTensorSpec, box: Box) -> torch.Tensor:
        if spec.has_partial:
            raise ValueError(f"random factories cannot produce Partial placements, got {list(spec.placements)}")
        return draw(seed, spec.shape, box, spec.dtype, spec.mesh.device_type)

    return make


def rand(*size, requires_grad=False, dtype=None, layout=torch.strided, device_mesh=None, placements=None) -> DTensor:
    """U[0, 1): shards differ, replicas agree, and the full tensor does not depend on the mesh."""
    return _make(_random(random.uniform), size, device_mesh, placements, dtype, requires_grad, layout)


def randn(*size, requires_grad=False, dtype=None, layout=torch.strided, device_mesh=None, placements=None) -> DTensor:
    """N(0, 1): shards differ, replicas agree, and the full tensor does not depend on the mesh."""
    return _make(_random(random.normal), size, device_mesh, placements, dtype, requires_grad, layout)
