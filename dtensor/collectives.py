"""The only module of ``dtensor`` that talks to ``torch.distributed``.

Tensor collectives go through ``torch.distributed._functional_collectives`` so torch's ``CommDebugMode``
counts them and ``torch.compile`` can trace them; they return tensors that wait on first use, which is
what makes ``redistribute(async_op=True)`` asynchronous. Each collective acts along one mesh dim: the
group is ``(mesh, mesh_dim)``. Reductions gloo lacks (``avg``) are done as a sum and a division.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = [
    "DeviceMesh",
    "init_device_mesh",
    "MeshDims",
    "group_size",
    "can_flatten",
    "all_gather",
    "all_reduce",
    "all_reduce_dims",
    "reduce_scatter",
    "all_to_all",
    "broadcast",
    "scatter",
    "gather_shapes",
    "wait",
    "is_initialized",
    "current_mesh",
    "NoMeshError",
]


# torch renamed all_gather_tensor / reduce_scatter_tensor to *_single; keep working on the older releases we support.
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
_reduce_scatter = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


class NoMeshError(ValueError, RuntimeError):
    """No mesh given and none active: a ``ValueError``, and the ``RuntimeError`` torch raises for it."""


def current_mesh(mesh: DeviceMesh | None, what: str) -> DeviceMesh:
    """``mesh``, else the one of the innermost ``with mesh:`` block (torch's default mesh)."""
    if mesh is not None:
        return mesh
    from torch.distributed.device_mesh import _mesh_resources

    if not _mesh_resources.mesh_stack:
        raise NoMeshError(f"{what} needs a device_mesh: pass device_mesh=, or call it inside a `with mesh:` block")
    return _mesh_resources.mesh_stack[-1]


def _divides_avg(op: str) -> tuple[str, bool]:
    return ("sum", True) if op == "avg" else (op, False)


MeshDims = int | tuple[int, ...]  # one mesh dim, or several acting as one flattened group (outer first)

_flat_groups: dict[tuple[DeviceMesh, tuple[int, ...]], dist.ProcessGroup] = {}  # this rank's group per (mesh, dims)


_spans_world: dict[tuple[DeviceMesh, int], bool] = {}  # ``mesh.mesh`` builds a tensor per call: asked once


def can_flatten(mesh: DeviceMesh) -> bool:
    """Whether collectives over several mesh dims of ``mesh`` may use one flattened group: the mesh must
    span the whole world, since creating groups is collective over every rank (the same on all ranks)."""
    key = (mesh, dist.get_world_size())
    spans = _spans_world.get(key)
    if spans is None:
        spans = _spans_world[key] = mesh.mesh.numel() == key[1]
    return spans


def _group(mesh: DeviceMesh, mesh_dims: MeshDims):
    """What functional collectives take for ``mesh_dims``: ``(mesh, dim)`` for one mesh dim, else this
    rank's group over the flattened mesh dims (ranks in row-major order, so the outer mesh dim's pieces
    come first, as nested sharding lays them out). Every rank creates every such group of the mesh, in
    the same order, on first use (``can_flatten`` meshes only), and keeps its own."""
    if isinstance(mesh_dims, int) or len(mesh_dims) == 1:
        return mesh, mesh_dims if isinstance(mesh_dims, int) else mesh_dims[0]
    key = (mesh, tuple(mesh_dims))
    if key not in _flat_groups:
        others = [d for d in range(mesh.ndim) if d not in mesh_dims]
        grid = mesh.mesh.permute(*others, *mesh_dims).reshape(-1, group_size(mesh, mesh_dims))
        mine = dist.get_rank()
        for ranks in grid.tolist():
            group = dist.new_group(ranks)
            if mine in ranks:
                _flat_groups[key] = group
    return _flat_groups[key]


def group_size(mesh: DeviceMesh, mesh_dims: MeshDims) -> int:
    dims = (mesh_dims,) if isinstance(mesh_dims, int) else mesh_dims
    return math.prod(mesh.size(d) for d in dims)


def all_gather(tensor: torch.Tensor, mesh: DeviceMesh, mesh_dims: MeshDims, gather_dim: int) -> torch.Tensor:
    """Concatenate equal-sized pieces from every rank of the mesh dim(s) along ``gather_dim``."""
    return _all_gather(tensor.contiguous(), gather_dim, _group(mesh, mesh_dims))


def all_reduce(tensor: torch.Tensor, op: str, mesh: DeviceMesh, mesh_dims: MeshDims) -> torch.Tensor:
    """Reduce across the mesh dim(s), in one collective; every rank gets the result."""
    op, divide = _divides_avg(op)
    out = funcol.all_reduce(tensor.contiguous(), op, _group(mesh, mesh_dims))
    return out / group_size(mesh, mesh_dims) if divide else out


def all_reduce_dims(tensor: torch.Tensor, op: str, mesh: DeviceMesh, mesh_dims) -> torch.Tensor:
    """Reduce across several mesh dims (one collective over them all); the result is ready (waited for)."""
    mesh_dims = tuple(mesh_dims)
    if len(mesh_dims) > 1 and not can_flatten(mesh):
        for mesh_dim in mesh_dims:
            tensor = wait(all_reduce(tensor, op, mesh, mesh_dim))
        return tensor
    return wait(all_reduce(tensor, op, mesh, mesh_dims)) if mesh_dims else tensor


def reduce_scatter(tensor: torch.Tensor, op: str, mesh: DeviceMesh, mesh_dim: int, scatter_dim: int) -> torch.Tensor:
    """Reduce across the mesh dim and leave rank i with the i-th equal piece along ``scatter_dim``."""
    op, divide = _divides_avg(op)
    out = _reduce_scatter(tensor.contiguous(), op, scatter_dim, (mesh, mesh_dim))
    return out / mesh.size(mesh_dim) if divide else out


def all_to_all(tensor: torch.Tensor, mesh: DeviceMesh, mesh_dim: int) -> torch.Tensor:
    """Send equal slice i of dim 0 to rank i of the mesh dim; receive rank j's slice at position j."""
    return funcol.all_to_all_single(tensor.contiguous(), None, None, (mesh, mesh_dim))


def broadcast(tensor: torch.Tensor, mesh: DeviceMesh, mesh_dim: int, src: int = 0) -> torch.Tensor:
    """Every rank of the mesh dim gets the tensor of the rank at coordinate ``src`` (in place)."""
    group = mesh.get_group(mesh_dim)
    dist.broadcast(tensor, group=group, group_src=src)
    return tensor


def scatter(out: torch.Tensor, pieces: list[torch.Tensor] | None, mesh: DeviceMesh, mesh_dim: int, src: int = 0) -> torch.Tensor:
    """Rank ``src`` of the mesh dim sends ``pieces[i]`` (equal shapes) to rank i, received into ``out``."""
    group = mesh.get_group(mesh_dim)
    if mesh.get_local_rank(mesh_dim) == src:
        pieces = [p.contiguous() for p in pieces]
    else:
        pieces = None
    dist.scatter(out, pieces, group=group, group_src=src)
    return out


def gather_shapes(shape: torch.Size, mesh: DeviceMesh) -> torch.Tensor:
    """Every rank's local shape, as an int64 tensor of shape ``mesh.shape + (len(shape),)``."""
    t = torch.tensor(list(shape), dtype=torch.int64, device=mesh.device_type)
    for mesh_dim in reversed(range(mesh.ndim)):
        t = _all_gather(t.unsqueeze(0).contiguous(), 0, (mesh, mesh_dim))
    return wait(t).cpu()


def wait(tensor: torch.Tensor) -> torch.Tensor:
    """The finished value of a tensor a functional collective returned, in the autograd graph where the
    tensor is: ``AsyncCollectiveTensor.wait()`` hands back its raw buffer, outside it (``full_tensor()`` of
    an ``async_op`` redistribute, as tensor parallel's layers make, lost every gradient)."""
    if isinstance(tensor, funcol.AsyncCollectiveTensor):
        return _Waited.apply(tensor) if tensor.requires_grad and torch.is_grad_enabled() else tensor.wait()
    return tensor


class _Waited(torch.autograd.Function):
    """``wait()`` as an identity of autograd: the gradient of the finished value is the collective's."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.wait()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad
