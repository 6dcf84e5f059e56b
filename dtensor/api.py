"""The ``DTensor`` class and the differentiable ways in and out of it.

A DTensor is a ``torch.Tensor`` wrapper subclass: globally it has the full shape, dtype and stride; it
holds only this rank's local shard and a ``DTensorSpec`` saying where that shard lies. ``from_local``,
``to_local``, ``redistribute`` and ``full_tensor`` are autograd functions whose backward moves the
gradient back to the forward input's layout (never to ``Partial``: a Partial input gets a Replicate
gradient, as in torch).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from . import checkpoint, collectives, dispatch
from .placements import Placement, Replicate, Shard, local_box, mesh_coordinates
from .redistribute import pad_to, partial_share, redistribute_local
from .spec import DTensorSpec

__all__ = ["DTensor", "distribute_tensor"]


class DTensor(torch.Tensor):
    """A tensor sharded, replicated or partially reduced over a ``DeviceMesh``."""

    _local_tensor: torch.Tensor
    _spec: DTensorSpec
    _copied: bool  # a view made of a redistributed copy of its base: in-place writes to it are refused
    __slots__ = ("_local_tensor", "_spec", "_copied")

    @staticmethod
    def __new__(cls, local_tensor: torch.Tensor, spec: DTensorSpec, *, requires_grad: bool = False) -> "DTensor":
        if local_tensor.requires_grad and not requires_grad:
            raise ValueError("a DTensor built directly must not wrap a tensor that requires grad; use from_local")
        out = torch.Tensor._make_wrapper_subclass(
            cls,
            spec.shape,
            strides=spec.stride,
            dtype=spec.dtype,
            device=local_tensor.device,
            layout=local_tensor.layout,
            requires_grad=requires_grad,
        )
        out._local_tensor = local_tensor
        out._spec = spec
        out._copied = False
        _copy_lazy_bits(local_tensor, out)
        return out

    def __repr__(self) -> str:  # type: ignore[override]
        return f"DTensor(local_tensor={self._local_tensor}, device_mesh={self._spec.mesh}, placements={self._spec.placements})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return dispatch.dispatch(cls, func, args, kwargs or {})

    # torch.compile sees through the wrapper: the local tensor is the only inner tensor.
    def __tensor_flatten__(self):
        return ["_local_tensor"], (self._spec, self.requires_grad)

    @staticmethod
    def __tensor_unflatten__(inner_tensors, ctx, outer_size, outer_stride):
        spec, requires_grad = ctx
        spec = replace(spec, shape=torch.Size(outer_size), stride=tuple(outer_stride))
        return DTensor(inner_tensors["_local_tensor"], spec, requires_grad=requires_grad)

    # torch.save / torch.load(weights_only=True): rebuilt from plain, allow-listed pieces.
    def __reduce_ex__(self, protocol):
        return _rebuild, (self._local_tensor, self._spec, self.requires_grad)

    @property
    def device_mesh(self):
        return self._spec.mesh

    @property
    def placements(self) -> tuple[Placement, ...]:
        return self._spec.placements

    @staticmethod
    def from_local(
        local_tensor: torch.Tensor,
        device_mesh=None,
        placements: Sequence[Placement] | None = None,
        *,
        run_check: bool = False,
        shape: Sequence[int] | None = None,
        stride: Sequence[int] | None = None,
        grad_placements: Sequence[Placement] | None = None,
    ) -> "DTensor":
        """Wrap every rank's local shard into one DTensor (collective only with ``run_check``). Without
        ``stride`` the global strides follow the local tensor's dim order, as torch's. The local tensor's
        gradient is the DTensor's gradient moved to ``grad_placements``, by default ``placements`` with
        Partial as Replicate."""
        if isinstance(local_tensor, DTensor):
            raise RuntimeError(
                "DTensor.from_local takes this rank's plain torch.Tensor, got a DTensor; use it as it is, "
                "or .redistribute() it, or pass its .to_local()"
            )
        device_mesh = collectives.current_mesh(device_mesh, "DTensor.from_local")
        if local_tensor.device.type != device_mesh.device_type and local_tensor.device.type != "meta":
            local_tensor = local_tensor.to(device_mesh.device_type)
        spec = DTensorSpec.create(device_mesh, placements, local_tensor.shape, local_tensor.dtype)
        if run_check:
            global_shape = _checked_global_shape(local_tensor, spec, shape)
        else:
            global_shape = torch.Size(shape) if shape is not None else _even_global_shape(local_tensor.shape, spec)
        if stride is None:
            stride = _global_stride(local_tensor, spec, global_shape)
        spec = DTensorSpec.create(device_mesh, spec.placements, global_shape, local_tensor.dtype, stride)
        grad_spec = _gradient_spec(spec) if grad_placements is None else spec.with_placements(grad_placements)
        return _FromLocal.apply(local_tensor, spec, grad_spec)

    def to_local(self, *, grad_placements: Sequence[Placement] | None = None) -> torch.Tensor:
        """This rank's shard as a plain tensor; its gradient comes back with ``grad_placements``, by default
        this tensor's placements with Partial as Replicate (torch's guarantee: a local gradient of a
        pending sum is every rank's whole gradient, not one term of it)."""
        if not torch.is_grad_enabled():
            return self._local_tensor
        grad_spec = _gradient_spec(self._spec) if grad_placements is None else self._spec.with_placements(grad_placements)
        return _ToLocal.apply(self, grad_spec)

    def redistribute(
        self,
        device_mesh=None,
        placements: Sequence[Placement] | None = None,
        *,
        async_op: bool = False,
        forward_dtype: torch.dtype | None = None,
        backward_dtype: torch.dtype | None = None,
    ) -> "DTensor":
        """The same global tensor with other placements on the same mesh (differentiable).

        ``forward_dtype``: cast before the collective (the result has that dtype), to move fewer bytes;
        ``backward_dtype``: the gradient's collective runs in that dtype, then the gradient is cast back to
        this tensor's dtype (as torch)."""
        if device_mesh is not None and device_mesh != self._spec.mesh:
            raise NotImplementedError("redistribute across different meshes is not supported; use the same mesh")
        if placements is None:
            raise ValueError("redistribute needs placements")
        target = self._spec.with_placements(placements)
        dtypes = (forward_dtype or self.dtype, backward_dtype or self.dtype)
        if target.placements == self._spec.placements and dtypes == (self.dtype, self.dtype):
            return self
        return _Redistribute.apply(self, target, async_op, dtypes)

    def full_tensor(self, *, grad_placements: Sequence[Placement] | None = None) -> torch.Tensor:
        """The whole global tensor on every rank (an all-gather/all-reduce as needed)."""
        replicated = self.redistribute(placements=[Replicate()] * self._spec.mesh.ndim)
        return collectives.wait(replicated.to_local(grad_placements=grad_placements))

    def to_torch(self):
        """This tensor as ``torch.distributed.tensor.DTensor`` (sharing the local tensor)."""
        from .convert import to_torch

        return to_torch(self)

    def __create_write_items__(self, fqn: str, object):  # noqa: A002 - DCP's name
        return checkpoint.create_write_items(self, fqn)

    def __create_chunk_list__(self):
        return checkpoint.create_chunk_list(self)

    def __get_tensor_shard__(self, index):
        return checkpoint.get_tensor_shard(self, index)


def _copy_lazy_bits(local: torch.Tensor, out: torch.Tensor) -> None:
    """The wrapper carries the local tensor's lazy conjugate/negative bits, as torch's DTensor does: torch's
    Conjugate/Negative fallbacks run above ``__torch_dispatch__`` and resolve them before ops that ignore
    them (``mul``, ``matmul`` ...); a wrapper without the bits would let ``a * b.conj()`` compute ``a * b``."""
    if local.is_conj():
        torch._C._set_conj(out, True)
    if local.is_neg():
        torch._C._set_neg(out, True)


def _rebuild(local_tensor: torch.Tensor, spec: DTensorSpec, requires_grad: bool) -> DTensor:
    return DTensor(local_tensor, spec, requires_grad=requires_grad)


def _even_global_shape(local_shape: torch.Size, spec: DTensorSpec) -> torch.Size:
    """torch's assumption without run_check: every shard is the same size."""
    shape = list(local_shape)
    for mesh_dim, p in enumerate(spec.placements):
        if isinstance(p, Shard):
            shape[p.dim] *= spec.mesh.size(mesh_dim)
    return torch.Size(shape)


def _global_stride(local: torch.Tensor, spec: DTensorSpec, global_shape: Sequence[int]) -> tuple[int, ...]:
    """The global strides torch derives from a local tensor: its strides, where each sharded dim grows
    every stride at least as large as its own by the number of pieces (the local dim order is kept).
    With a given (uneven) global shape, strides are contiguous in the local dim order instead."""
    if tuple(global_shape) != tuple(_even_global_shape(local.shape, spec)):
        order = sorted(range(local.dim()), key=lambda d: (local.stride(d), local.size(d)))
        stride, acc = [0] * local.dim(), 1
        for d in order:
            stride[d], acc = acc, acc * max(global_shape[d], 1)
        return tuple(stride)
    stride = list(local.stride())
    for mesh_dim, p in enumerate(spec.placements):
        if isinstance(p, Shard):
            own = stride[p.dim]
            stride = [s * spec.mesh.size(mesh_dim) if d != p.dim and s >= own else s for d, s in enumerate(stride)]
    return tuple(stride)


def _checked_global_shape(local: torch.Tensor, spec: DTensorSpec, shape: Sequence[int] | None) -> torch.Size:
    """Gather every rank's local shape and insist they form exactly the ``torch.chunk`` layout."""
    mesh = spec.mesh
    gathered = collectives.gather_shapes(local.shape, mesh)
    coords = mesh_coordinates(mesh.shape)
    shapes = {c: tuple(gathered[c].tolist()) for c in coords}
    if shape is None:
        shape = _sum_along_sharded_dims(shapes, spec)
    for c in coords:
        expected = local_box(shape, mesh.shape, spec.placements, c).sizes
        if tuple(expected) != shapes[c]:
            raise ValueError(
                f"from_local(run_check=True): the rank at mesh coordinate {c} holds a local tensor of shape "
                f"{list(shapes[c])}, but placements {list(spec.placements)} of a global shape {list(shape)} give it "
                f"{list(expected)} (torch.chunk layout). Pass shards cut like torch.chunk, or the right `shape`."
            )
    return torch.Size(shape)


def _sum_along_sharded_dims(shapes: dict, spec: DTensorSpec) -> list[int]:
    """The global shape implied by local shapes: add up the pieces of each sharded dim."""
    origin = (0,) * spec.mesh.ndim
    shape = list(shapes[origin])
    sharding = {}
    for mesh_dim, p in enumerate(spec.placements):
        if isinstance(p, Shard):
            sharding.setdefault(p.dim, []).append(mesh_dim)
    for dim, mesh_dims in sharding.items():
        total = 0
        for c, local_shape in shapes.items():
            if all(c[m] == 0 for m in range(spec.mesh.ndim) if m not in mesh_dims):
                total += local_shape[dim]
        shape[dim] = total
    return shape


def _gradient_spec(forward: DTensorSpec) -> DTensorSpec:
    """Where a gradient goes back to: the forward layout, except that Partial becomes Replicate."""
    return forward.with_placements([Replicate() if p.is_partial() else p for p in forward.placements])


class _FromLocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor, spec: DTensorSpec, grad_spec: DTensorSpec) -> DTensor:
        ctx.grad_spec = grad_spec
        # view_as: the DTensor must not share autograd identity with the caller's tensor
        return DTensor(local.view_as(local), spec, requires_grad=local.requires_grad)

    @staticmethod
    def backward(ctx, grad: DTensor):
        target = ctx.grad_spec
        local = grad._local_tensor
        if grad._spec.placements != target.placements:
            local = redistribute_local(local, grad._spec.mesh, grad._spec.shape, grad._spec.placements, target.placements)
        return collectives.wait(local), None, None


class _ToLocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dt: DTensor, grad_spec: DTensorSpec) -> torch.Tensor:
        ctx.grad_spec = grad_spec
        return dt._local_tensor.view_as(dt._local_tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return DTensor(grad, ctx.grad_spec, requires_grad=False), None


class _Redistribute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dt: DTensor, target: DTensorSpec, async_op: bool, dtypes: tuple[torch.dtype, torch.dtype]) -> DTensor:
        ctx.source, ctx.backward_dtype = dt._spec, dtypes[1]
        local = dt._local_tensor.to(dtypes[0])
        local = redistribute_local(local, dt._spec.mesh, dt._spec.shape, dt._spec.placements, target.placements)
        if not async_op:
            local = collectives.wait(local)
        return DTensor(local, replace(target, stride=dt._spec.stride, dtype=dtypes[0]), requires_grad=dt.requires_grad)

    @staticmethod
    def backward(ctx, grad: DTensor):
        back = _gradient_spec(ctx.source)
        spec = grad._spec
        local = grad._local_tensor.to(ctx.backward_dtype)
        local = redistribute_local(local, spec.mesh, spec.shape, spec.placements, back.placements)
        return DTensor(collectives.wait(local).to(back.dtype), back, requires_grad=False), None, None, None


def distribute_tensor(
    tensor: torch.Tensor,
    device_mesh=None,
    placements: Sequence[Placement] | None = None,
    *,
    src_data_rank: int | None = 0,
) -> DTensor:
    """Split a full tensor over the mesh: scattered from ``src_data_rank``, or, with None (or a tensor on
    the meta device, which stays there), sliced locally. The DTensor keeps the input's strides (a
    transposed or channels_last input stays so globally, as torch's); local shards are contiguous."""
    device_mesh = collectives.current_mesh(device_mesh, "distribute_tensor")
    if isinstance(tensor, DTensor):
        raise ValueError("distribute_tensor got a DTensor; use redistribute to change its placements")
    requires_grad = tensor.requires_grad  # as torch: a leaf that requires grad when the input does
    tensor = tensor.detach()
    if tensor.device.type not in (device_mesh.device_type, "meta"):
        tensor = tensor.to(device_mesh.device_type)
    spec = DTensorSpec.create(device_mesh, placements, tensor.shape, tensor.dtype, tensor.stride())
    if device_mesh.get_coordinate() is None:
        local = tensor.new_empty(0)
    elif src_data_rank is None or tensor.is_meta:
        replicated = tuple(Replicate() for _ in spec.placements)
        local = redistribute_local(tensor, device_mesh, spec.shape, replicated, spec.placements)
    else:
        local = _scatter_from(tensor, spec, src_data_rank)
    return DTensor(local.contiguous(), spec, requires_grad=requires_grad)


def _scatter_from(tensor: torch.Tensor, spec: DTensorSpec, src_data_rank: int) -> torch.Tensor:
    """Mesh dim by mesh dim, each group's member at group rank ``src_data_rank`` sends the others their
    part (as torch: the source is a group rank on every mesh dim, not a global rank)."""
    mesh = spec.mesh
    if not all(0 <= src_data_rank < n for n in mesh.shape):
        raise ValueError(f"src_data_rank {src_data_rank} is not a group rank of every dim of the mesh {mesh}")
    local = tensor
    for mesh_dim, p in enumerate(spec.placements):
        local = _from_source(local, p, spec, mesh_dim, src_data_rank)
    return local


def _from_source(local: torch.Tensor, p: Placement, spec: DTensorSpec, mesh_dim: int, src: int) -> torch.Tensor:
    mesh = spec.mesh
    n = mesh.size(mesh_dim)
    if isinstance(p, Shard):
        pieces = list(torch.chunk(local, n, dim=p.dim)) if local.size(p.dim) else []
        pieces += [local.narrow(p.dim, 0, 0)] * (n - len(pieces))
        chunk = -(-local.size(p.dim) // n)
        padded = [pad_to(x, p.dim, chunk) for x in pieces]
        out = padded[0].new_empty(padded[0].shape)  # contiguous: scatter writes raw memory, in row-major order
        collectives.scatter(out, padded, mesh, mesh_dim, src)
        return out.narrow(p.dim, 0, pieces[mesh.get_local_rank(mesh_dim)].size(p.dim))
    local = collectives.broadcast(local.contiguous().clone(), mesh, mesh_dim, src)
    return partial_share(local, p.reduce_op, n) if p.is_partial() else local
