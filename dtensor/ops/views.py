"""View and shape ops: which tensor dims stay sharded when dims move, merge, split, appear or vanish.

Every rule maps each input ``Shard(d)`` to the output dim that ``d`` becomes, or replicates ``d`` first
when that is impossible: the dim is removed, broadcast, sliced, indexed, concatenated or split along, or
merged/split by a reshape in a way that would not leave every rank holding its ``torch.chunk`` piece of
the output. Data movement commutes with any elementwise reduction, so ``Partial`` survives all of these
ops except the zero-filling backward ones, where only ``sum``/``avg`` do.

Reshapes (``view``, ``_unsafe_view``, ``reshape``) are planned by two pure functions: ``view_groups``
cuts the shapes into groups of input dims and output dims with equal element counts, and
``view_placements`` decides, per sharded dim, whether it can stay sharded (it must be the outermost dim
of its group, and every rank's piece must be exactly its ``torch.chunk`` piece of the output's
outermost dim), can move to its group's outermost dim (an all-to-all, where that piece is then exact),
or must be replicated. Ops whose arguments hold global sizes (view shapes, ``expand``,
``*_backward`` input sizes) get them rewritten to the local shape through ``Strategy.local_args``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..dispatch import Strategy
from ..placements import Placement, Replicate, Shard, local_box, mesh_coordinates

aten = torch.ops.aten

__all__ = ["RULES", "HANDLERS", "view_groups", "view_placements"]

Group = tuple[tuple[int, ...], tuple[int, ...]]  # (input dims, output dims) with equal element counts


# ---------------------------------------------------------------- pure planning


def view_groups(src: Sequence[int], dst: Sequence[int]) -> list[Group]:
    """Cut a reshape of ``src`` into ``dst`` into groups of consecutive dims with equal products.

    A size-1 dim facing a non-1 dim forms a group on its own (it appears or vanishes); otherwise dims
    are taken from the smaller side until both products agree. Shapes with no elements are not split.
    """
    if math.prod(src) != math.prod(dst):
        raise RuntimeError(f"shape '{list(dst)}' is invalid for input of size {math.prod(src)}")
    if math.prod(src) == 0:
        return [(tuple(range(len(src))), tuple(range(len(dst))))]
    groups: list[Group] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        if i < len(src) and src[i] == 1 and (j == len(dst) or dst[j] != 1):
            groups.append(((i,), ()))
            i += 1
        elif j < len(dst) and dst[j] == 1 and (i == len(src) or src[i] != 1):
            groups.append(((), (j,)))
            j += 1
        else:
            ins, outs, f, t = [i], [j], src[i], dst[j]
            i, j = i + 1, j + 1
            while f != t:
                if f < t:
                    ins.append(i)
                    f, i = f * src[i], i + 1
                else:
                    outs.append(j)
                    t, j = t * dst[j], j + 1
            groups.append((tuple(ins), tuple(outs)))
    return groups


def _exact(src, dst, mesh_shape, placements, group: Group, d: int) -> bool:
    """Whether every rank's rows of input dim ``d`` (the outermost of ``group``) are exactly, element for
    element, its ``torch.chunk`` piece of the group's outermost output dim: then the local view is right."""
    ins, outs = group
    e = outs[0]
    inner_in, inner_out = math.prod(src[i] for i in ins[1:]), math.prod(dst[o] for o in outs[1:])
    src_p = tuple(p if p == Shard(d) else Replicate() for p in placements)
    dst_p = tuple(Shard(e) if p == Shard(d) else Replicate() for p in placements)
    for c in mesh_coordinates(mesh_shape):
        a, b = local_box(src, mesh_shape, src_p, c), local_box(dst, mesh_shape, dst_p, c)
        if (a.offsets[d] * inner_in, a.sizes[d] * inner_in) != (b.offsets[e] * inner_out, b.sizes[e] * inner_out):
            return False
    return True


def view_placements(
    src: Sequence[int], dst: Sequence[int], mesh_shape: Sequence[int], placements: Sequence[Placement]
) -> tuple[tuple[Placement, ...], tuple[Placement, ...]]:
    """(placements the input must have, placements of the output) for reshaping ``src`` into ``dst``."""
    target: dict[int, int | None] = {}  # sharded input dim -> the output dim it stays sharded on, or None
    sharded = {p.dim for p in placements if isinstance(p, Shard)}
    placements = tuple(placements)
    for group in view_groups(src, dst):
        ins, outs = group
        for k, d in enumerate(ins):
            if d in sharded:
                outermost = k == 0 and bool(outs) and math.prod(src) > 0
                keep = outermost and _exact(src, dst, mesh_shape, placements, group, d)
                target[d] = outs[0] if keep else None
        moved = _to_outermost(src, dst, mesh_shape, placements, group, sharded)
        if moved is not None:
            placements, target[ins[0]] = moved, outs[0]
    inputs = tuple(Replicate() if isinstance(p, Shard) and target[p.dim] is None else p for p in placements)
    output = tuple(Shard(target[p.dim]) if isinstance(p, Shard) else p for p in inputs)
    return inputs, output


def _to_outermost(src, dst, mesh_shape, placements: tuple, group: Group, sharded: set) -> tuple | None:
    """``placements`` with the one sharded inner dim of a merge (``view(-1)`` of a ``Shard(1)`` tensor)
    sharding the group's outermost dim instead, where every rank's piece then is exactly its
    ``torch.chunk`` piece of the output; else None. One all-to-all to that layout keeps the view
    sharded, where replicating it gathered the whole tensor on every rank (torch keeps such a dim
    sharded as a ``_StridedShard``, a placement we lack)."""
    ins, outs = group
    inner = [d for d in ins[1:] if d in sharded]
    if len(inner) != 1 or not outs or ins[0] in sharded or math.prod(src) == 0:
        return None
    d, o = inner[0], ins[0]
    moved = tuple(Shard(o) if p == Shard(d) else p for p in placements)
    pieces = math.prod(n for n, p in zip(mesh_shape, moved) if p == Shard(o))
    return moved if src[o] >= pieces and _exact(src, dst, mesh_shape, moved, group, o) else None


def _infer_size(size: Sequence[int], numel: int) -> list[int]:
    size = list(size)
    if -1 in size:
        known = math.prod(s for s in size if s != -1)
        size[size.index(-1)] = numel // known if known else 0
    return size


# ---------------------------------------------------------------- helpers for the rules


def _local_shape(mesh, shape: Sequence[int], placements: Sequence[Placement]) -> list[int]:
    """This rank's piece of a tensor of global ``shape`` laid out as ``placements``."""
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return [0] * len(shape)
    return list(local_box(shape, mesh.shape, placements, coordinate).sizes)


def _with_arg(index: int, value):
    """A ``local_args`` that replaces positional argument ``index`` with ``value``."""

    def rewrite(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args[:index] + (value,) + args[index + 1 :], kwargs

    return rewrite


def _unshard(placements: Sequence[Placement], dims: Sequence[int]) -> tuple[Placement, ...]:
    """Replicate every mesh dim that shards one of ``dims``."""
    return tuple(Replicate() if isinstance(p, Shard) and p.dim in dims else p for p in placements)


def _moved(placements: Sequence[Placement], dim_map) -> tuple[Placement, ...]:
    """Placements after input dim d became output dim ``dim_map(d)``."""
    return tuple(Shard(dim_map(p.dim)) if isinstance(p, Shard) else p for p in placements)


def _sum_only(placements: Sequence[Placement]) -> tuple[Placement, ...]:
    """Resolve Partials an op that fills zeros does not commute with (max/min)."""
    return tuple(Replicate() if p.is_partial() and p.reduce_op not in ("sum", "avg") else p for p in placements)


def _norm(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


# ---------------------------------------------------------------- rules


def _viewable(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``t``, or a contiguous copy when its strides do not allow the view (a redistribution can leave
    the local piece non-contiguous while the global tensor is contiguous)."""
    if t.is_contiguous():
        return t
    try:
        torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta").view(shape)
        return t
    except RuntimeError:
        return t.contiguous()


def _view(func, specs, args, kwargs):
    spec = specs[0]
    shape = _infer_size(args[1], math.prod(spec.shape))
    inputs, output = view_placements(spec.shape, shape, spec.mesh.shape, spec.placements)
    local = _local_shape(spec.mesh, shape, output)

    def rewrite(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return (_viewable(args[0], local), local) + args[2:], kwargs

    return Strategy((inputs,), output, rewrite)


def _permute_rule(func, specs, args, kwargs):
    spec = specs[0]
    ndim = len(spec.shape)
    if func is aten.permute.default:
        order = [_norm(d, ndim) for d in args[1]]
    else:
        order = list(range(ndim))
        if ndim >= 2:
            a, b = (0, 1) if func is aten.t.default else (_norm(args[1], ndim), _norm(args[2], ndim))
            order[a], order[b] = order[b], order[a]
    return Strategy((spec.placements,), _moved(spec.placements, order.index))


def _unsqueeze(func, specs, args, kwargs):
    spec = specs[0]
    dim = _norm(args[1], len(spec.shape) + 1)
    return Strategy((spec.placements,), _moved(spec.placements, lambda d: d + (d >= dim)))


def _squeeze_dims(func, specs, args, kwargs):
    """``squeeze.dims``; ``squeeze``/``squeeze.dim`` are turned into it (handlers below)."""
    spec = specs[0]
    ndim = len(spec.shape)
    dims = sorted({_norm(d, ndim) for d in args[1] if ndim and spec.shape[_norm(d, ndim)] == 1})
    inputs = _unshard(spec.placements, dims)
    output = _moved(inputs, lambda d: d - sum(x < d for x in dims))
    return Strategy((inputs,), output, _with_arg(1, dims))  # only globally size-1 dims: a local 1 may not be


def _squeeze_to_dims(cls, func, args, kwargs):
    x = args[0]
    if func is aten.squeeze.default:
        dims = [d for d, s in enumerate(x.shape) if s == 1]
    else:
        dims = [args[1]]
    return aten.squeeze.dims(x, dims)


_OUT_OF_PLACE = {
    aten.squeeze_.default: aten.squeeze.default,
    aten.squeeze_.dim: aten.squeeze.dim,
    aten.squeeze_.dims: aten.squeeze.dims,
    aten.unsqueeze_.default: aten.unsqueeze.default,
    aten.transpose_.default: aten.transpose.int,
    aten.t_.default: aten.t.default,
}


def _inplace_view(cls, func, args, kwargs):
    """``squeeze_``, ``unsqueeze_``, ``transpose_``, ``t_`` (matmul of a 1-D tensor squeezes its Partial
    result in place): the out-of-place view's layout, applied to the target itself. The local data does
    not move; the target's spec and the wrapper's sizes and strides change, as in torch."""
    from torch.utils._python_dispatch import return_and_correct_aliasing

    target = args[0]
    view = _OUT_OF_PLACE[func](*args, **kwargs)
    if view._local_tensor.data_ptr() != target._local_tensor.data_ptr() and target._local_tensor.numel():
        raise RuntimeError(
            f"{func}: the view needs the target moved from {list(target.placements)} to another layout, which "
            "an in-place view cannot do; redistribute the target first or use the out-of-place op"
        )
    func(target._local_tensor, *args[1:], **kwargs)
    target._spec = view._spec
    return return_and_correct_aliasing(func, args, kwargs, target)


def _reshape_alias_to_view(cls, func, args, kwargs):
    """``_reshape_alias`` is only emitted where a view is possible, with the view's strides."""
    return aten.view.default(args[0], args[1])


def _expand(func, specs, args, kwargs):
    spec = specs[0]
    size = list(args[1])
    lead = len(size) - len(spec.shape)
    shape = [s if s != -1 else spec.shape[i - lead] for i, s in enumerate(size)]
    broadcast = [d for d, s in enumerate(spec.shape) if s != shape[d + lead]]
    inputs = _unshard(spec.placements, broadcast)
    output = _moved(inputs, lambda d: d + lead)
    return Strategy((inputs,), output, _with_arg(1, _local_shape(spec.mesh, shape, output)))


def _view_as_complex(func, specs, args, kwargs):
    """float ``[..., 2]`` -> complex ``[...]``: the pair dim goes (a split pair cannot stay split)."""
    spec = specs[0]
    inputs = _unshard(spec.placements, [len(spec.shape) - 1])
    return Strategy((inputs,), inputs)


def _view_as_real(func, specs, args, kwargs):
    """complex ``[...]`` -> float ``[..., 2]``: every dim keeps its place, the pair dim is new and whole."""
    return Strategy((specs[0].placements,), specs[0].placements)


def _as_strided(func, specs, args, kwargs):
    """``x.as_strided(x.size(), x.stride(), x.storage_offset())``, the identity view torch's DTensor
    allows, keeps the layout (each rank views its own shard the same way); other strides fall back."""
    spec = specs[0]
    offset = args[3] if len(args) > 3 else kwargs.get("storage_offset")
    if tuple(args[1]) != tuple(spec.shape) or tuple(args[2]) != spec.stride or offset not in (None, 0):
        return None

    def rewrite(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        t = args[0]
        return (t, t.size(), t.stride(), t.storage_offset()), {}

    return Strategy((spec.placements,), spec.placements, rewrite)


_DIM_ARG = {  # op -> position of its ``dim`` argument (every default is 0)
    aten.slice.Tensor: 1,
    aten.select.int: 1,
    aten.unbind.int: 1,
    aten.split.Tensor: 2,
    aten.split_with_sizes.default: 2,
}


def _along_unsharded(func, specs, args, kwargs):
    """slice/select/split/unbind along ``dim``: that dim is replicated first; other dims keep their layout."""
    spec = specs[0]
    ndim = len(spec.shape)
    position = _DIM_ARG[func]
    dim = _norm(args[position] if len(args) > position else kwargs.get("dim", 0), ndim)
    inputs = _unshard(spec.placements, [dim])
    if func in (aten.select.int, aten.unbind.int):
        return Strategy((inputs,), _moved(inputs, lambda d: d - (d > dim)))
    return Strategy((inputs,), inputs)


def _join(func, specs, args, kwargs):
    """cat/stack: one layout for every input, ``dim`` unsharded. Per mesh dim, the first input's shard
    if any input is sharded there (the others narrow or reduce-scatter to it), else a Partial every
    input shares or can take locally (R->P), else Replicate."""
    tensors = args[0]
    ndim = len(specs[0].shape)
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if any(len(s.shape) != ndim for s in specs):
        return None  # legacy cat of empty 1-D tensors: replicate
    if len(specs) != len(tensors):  # plain one-element tensors, which the dispatcher leaves plain as whole on
        # every rank: autograd's 0-d zero gradients in the backward of a 1-D tensor's unbind
        replicate = (Replicate(),) * specs[0].mesh.ndim
        return Strategy(tuple(replicate for _ in specs), replicate)
    stack = func is aten.stack.default
    dim = _norm(dim, ndim + 1) if stack else _norm(dim, ndim) if ndim else 0
    per_input = [_unshard(s.placements, [] if stack else [dim]) for s in specs]
    placements = tuple(_join_mesh_dim([c[m] for c in per_input]) for m in range(len(per_input[0])))
    output = _moved(placements, lambda d: d + (d >= dim)) if stack else placements
    return Strategy(tuple(placements for _ in specs), output)


def _join_mesh_dim(options: list[Placement]) -> Placement:
    shards = [p for p in options if p.is_shard()]
    if shards:
        return shards[0]
    partials = {p for p in options if p.is_partial()}
    return partials.pop() if len(partials) == 1 else Replicate()


def _slice_backward(func, specs, args, kwargs):
    """Zeros of ``input_sizes`` with the gradient placed in: ``dim`` unsharded, sizes made local."""
    spec = specs[0]
    sizes, dim = list(args[1]), _norm(args[2], len(args[1]))
    inputs = _sum_only(_unshard(spec.placements, [dim]))
    return Strategy((inputs,), inputs, _with_arg(1, _local_shape(spec.mesh, sizes, inputs)))


def _select_backward(func, specs, args, kwargs):
    spec = specs[0]
    sizes, dim = list(args[1]), _norm(args[2], len(args[1]))
    inputs = _sum_only(spec.placements)
    output = _moved(inputs, lambda d: d + (d >= dim))
    return Strategy((inputs,), output, _with_arg(1, _local_shape(spec.mesh, sizes, output)))


RULES = {
    aten.view.default: _view,
    aten._unsafe_view.default: _view,
    aten.reshape.default: _view,
    aten.t.default: _permute_rule,
    aten.transpose.int: _permute_rule,
    aten.permute.default: _permute_rule,
    aten.unsqueeze.default: _unsqueeze,
    aten.squeeze.dims: _squeeze_dims,
    aten.expand.default: _expand,
    aten.view_as_complex.default: _view_as_complex,
    aten.view_as_real.default: _view_as_real,
    aten.as_strided.default: _as_strided,
    aten.slice.Tensor: _along_unsharded,
    aten.select.int: _along_unsharded,
    aten.split.Tensor: _along_unsharded,
    aten.split_with_sizes.default: _along_unsharded,
    aten.unbind.int: _along_unsharded,
    aten.cat.default: _join,
    aten.stack.default: _join,
    aten.slice_backward.default: _slice_backward,
    aten.select_backward.default: _select_backward,
}

HANDLERS = {
    aten.squeeze.default: _squeeze_to_dims,
    aten.squeeze.dim: _squeeze_to_dims,
    aten._reshape_alias.default: _reshape_alias_to_view,
    **{op: _inplace_view for op in _OUT_OF_PLACE},
}
