"""The nn family: softmax, layer norm, embedding, nll and mse losses (forward and backward).

Rules where the local computation is the op itself on the shards:

* ``_softmax`` and the softmax backwards: the softmax dim is replicated first, other dims stay sharded.
* ``native_layer_norm`` (+ backward): normalized dims replicated, batch dims stay sharded, weight and
  bias replicated; the weight/bias gradients are ``Partial("sum")`` over every mesh dim that shards a
  batch dim (each rank summed its own rows), as in torch. A pending output gradient is
  reduce-scattered onto dim 0 rather than all-reduced, as torch does.
* ``embedding_dense_backward``: a gradient sharded on its last dim gives a column-sharded weight
  gradient; batch-sharded indices and gradient give a ``Partial("sum")`` one. With both replicated
  the weight gradient is Replicate whatever the weight's layout (the op does not see the weight), as
  in torch: a row-sharded weight then gets a replicated gradient that the optimizer's ops must accept.
* ``nll_loss_backward``: batch dims stay sharded; a class-sharded input (vocab parallel) gets its
  targets shifted into the local class range, the others ignored.

Handlers where it is not:

* ``embedding`` with a row-sharded weight (``Shard(0)``, vocab parallel): each rank looks up only the
  indices in its row range, the rest give zero rows; the output is ``Partial("sum")``.
* ``_log_softmax`` (+ backward) along a sharded dim: torch's loss-parallel idea, a max and a sum
  all-reduce instead of gathering the logits; the output stays sharded on that dim.
* ``nll_loss_forward``: each rank picks the losses of the targets in its class range, all-reduced over
  the mesh dims that shard the classes (Replicate there, as torch's ``loss_parallel``); a batch-sharded
  loss is ``Partial("sum")`` of local sums, divided by the global total weight for ``mean`` (an
  all-reduce of one scalar), exact for uneven shards. Plain
  targets and class weights count as the same full tensor on every rank, as in torch's ``loss_parallel``.
* ``mse_loss`` (+ backward): written as DTensor ops (a difference, a square, a mean or sum), so any
  layout works and a mean divides by the global element count.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .. import collectives
from ..dispatch import Strategy
from ..placements import Partial, Placement, Replicate, Shard, local_box
from ..redistribute import local_as
from ..spec import DTensorSpec
from .common import bind_args, replicate_partials, with_plain_replicated

aten = torch.ops.aten

__all__ = ["RULES", "HANDLERS"]

_MEAN, _SUM = 1, 2  # torch's Reduction enum: 0 none, 1 mean, 2 sum


# ---------------------------------------------------------------- helpers


def _norm(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 and ndim else dim


def _unshard(placements: Sequence[Placement], dims: Sequence[int]) -> tuple[Placement, ...]:
    return tuple(Replicate() if isinstance(p, Shard) and p.dim in dims else p for p in placements)


def _replicated(cls, t: torch.Tensor | None, mesh):
    """A plain tensor argument (targets, class weights) as the same full tensor on every rank, as torch's
    ``loss_parallel`` takes it."""
    if t is None or isinstance(t, cls):
        return t
    return _wrap(cls, t, mesh, (Replicate(),) * mesh.ndim, t.shape)


def _wrap(cls, local: torch.Tensor, mesh, placements, shape: Sequence[int]):
    return cls(local, DTensorSpec.create(mesh, placements, shape, local.dtype))


def _range(shape: Sequence[int], mesh, placements: Sequence[Placement], dim: int) -> tuple[int, int]:
    """(offset, size) of this rank's piece of ``dim`` under ``placements``."""
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return 0, 0
    box = local_box(shape, mesh.shape, placements, coordinate)
    return box.offsets[dim], box.sizes[dim]


def _mesh_dims(placements: Sequence[Placement], dim: int) -> list[int]:
    return [m for m, p in enumerate(placements) if p == Shard(dim)]


# ---------------------------------------------------------------- softmax


def _softmax(func, specs, args, kwargs):
    spec = specs[0]
    placements = replicate_partials(_unshard(spec.placements, [_norm(args[1], len(spec.shape))]))
    return Strategy((placements,), placements)


def _softmax_backward_placements(grad: DTensorSpec, out: DTensorSpec) -> tuple[Placement, ...]:
    """torch's choice: follow whichever of grad_output/output has more shards (Partials resolved)."""
    def shards(s: DTensorSpec) -> int:
        return sum(isinstance(p, Shard) for p in s.placements)

    return replicate_partials((grad if shards(grad) >= shards(out) else out).placements)


def _softmax_backward(func, specs, args, kwargs):
    grad, out = specs
    placements = _unshard(_softmax_backward_placements(grad, out), [_norm(args[2], len(out.shape))])
    return Strategy((placements, placements), placements)


def _log_softmax(cls, func, args, kwargs):
    """Along an unsharded dim: the op on the shards. Along a sharded dim: max and sum all-reduces."""
    x, dim, half_to_float = args
    spec = x._spec
    dim = _norm(dim, len(spec.shape))
    placements = replicate_partials(spec.placements)
    local = local_as(x, placements)
    class_dims = _mesh_dims(placements, dim)
    if not class_dims:
        return _wrap(cls, func(local, dim, half_to_float), spec.mesh, placements, spec.shape)
    if local.size(dim):
        top = local.amax(dim, keepdim=True)
    else:
        top = local.new_full(local.shape[:dim] + (1,) + local.shape[dim + 1 :], float("-inf"))
    top = collectives.all_reduce_dims(top.detach(), "max", spec.mesh, class_dims)
    shifted = local - top
    total = collectives.all_reduce_dims(shifted.exp().sum(dim, keepdim=True), "sum", spec.mesh, class_dims)
    return _wrap(cls, shifted - total.log(), spec.mesh, placements, spec.shape)


def _log_softmax_backward(cls, func, args, kwargs):
    """grad - exp(out) * sum(grad, dim); the sum is all-reduced when ``dim`` is sharded."""
    grad, out, dim, input_dtype = args
    dim = _norm(dim, len(out.shape))
    placements = _softmax_backward_placements(grad._spec, out._spec)
    class_dims = _mesh_dims(placements, dim)
    if not class_dims:
        placements = _unshard(placements, [dim])
    g, y = local_as(grad, placements), local_as(out, placements)
    if not class_dims:
        return _wrap(cls, func(g, y, dim, input_dtype), out._spec.mesh, placements, out.shape)
    total = collectives.all_reduce_dims(g.sum(dim, keepdim=True), "sum", out._spec.mesh, class_dims)
    return _wrap(cls, g - y.exp() * total, out._spec.mesh, placements, out.shape)


# ---------------------------------------------------------------- layer norm


def _batch_placements(x: Sequence[Placement], grad: Sequence[Placement] | None, axis: int) -> tuple[Placement, ...]:
    """Per mesh dim: the input's (else the gradient's) shard of a batch dim (< axis); a pending gradient
    is reduce-scattered onto dim 0 (cheaper than an all-reduce, as torch does); else Replicate."""
    out = []
    for m, p in enumerate(x):
        g = grad[m] if grad is not None else Replicate()
        if isinstance(p, Shard) and p.dim < axis:
            out.append(p)
        elif isinstance(g, Shard) and g.dim < axis:
            out.append(g)
        elif g.is_partial() and axis > 0:
            out.append(Shard(0))
        else:
            out.append(Replicate())
    return tuple(out)


def _grad_of_replicated(batch: tuple[Placement, ...]) -> tuple[Placement, ...]:
    """A gradient summed over this rank's rows only: pending a sum over every batch-sharding mesh dim."""
    return tuple(Partial("sum") if isinstance(p, Shard) else Replicate() for p in batch)


def _layer_norm(func, specs, args, kwargs):
    x = specs[0]
    axis = len(x.shape) - len(args[1])
    batch = _batch_placements(x.placements, None, axis)
    replicate = tuple(Replicate() for _ in batch)
    return Strategy((batch,) + (replicate,) * (len(specs) - 1), [batch, batch, batch])


def _layer_norm_backward(func, specs, args, kwargs):
    grad, x = specs[0], specs[1]
    axis = len(x.shape) - len(args[2])
    batch = _batch_placements(x.placements, grad.placements, axis)
    replicate = tuple(Replicate() for _ in batch)
    weight, bias, mask = args[5], args[6], args[7]
    outputs = [batch] if mask[0] else []
    outputs += [_grad_of_replicated(batch)] * (int(mask[1] and weight is not None) + int(mask[2] and bias is not None))
    return Strategy((batch,) * 4 + (replicate,) * (len(specs) - 4), outputs)


# ---------------------------------------------------------------- embedding


def _embedding_placements(weight: DTensorSpec, indices: DTensorSpec) -> tuple[tuple, tuple, tuple]:
    """(weight placements, indices placements, output placements), mesh dim by mesh dim."""
    w_out, i_out, out = [], [], []
    last = len(indices.shape)
    for wp, ip in zip(weight.placements, indices.placements):
        if isinstance(wp, Shard):  # vocab (rows) or columns: indices replicated
            w_out.append(wp), i_out.append(Replicate())
            out.append(Partial("sum") if wp.dim == 0 else Shard(last))
        elif isinstance(ip, Shard):  # batch: the output follows the indices
            w_out.append(Replicate()), i_out.append(ip), out.append(ip)
        else:
            w_out.append(Replicate()), i_out.append(Replicate()), out.append(Replicate())
    return tuple(w_out), tuple(i_out), tuple(out)


def _embedding(cls, func, args, kwargs):
    """Rows outside this rank's range of a row-sharded weight contribute zeros (masked lookup). A plain
    index tensor (a 0-d one, ``embedding(torch.tensor(3), w)``) is the same on every rank; a plain weight
    (an embedding left out of the plan) is refused or replicated as in every op."""
    args = with_plain_replicated(cls, func, args)
    weight = args[0]
    indices = _replicated(cls, args[1], weight._spec.mesh)
    w_p, i_p, out_p = _embedding_placements(weight._spec, indices._spec)
    w, idx = local_as(weight, w_p), local_as(indices, i_p)
    shape = tuple(indices.shape) + (weight.shape[1],)
    if not _mesh_dims(w_p, 0):
        return _wrap(cls, func(w, idx, *args[2:], **kwargs), weight._spec.mesh, out_p, shape)
    offset, size = _range(weight.shape, weight._spec.mesh, w_p, 0)
    mine = (idx >= offset) & (idx < offset + size)
    if size == 0:
        out = w.new_zeros(tuple(idx.shape) + (w.size(1),))
    else:
        out = func(w, torch.where(mine, idx - offset, 0), *args[2:], **kwargs) * mine.unsqueeze(-1).to(w.dtype)
    return _wrap(cls, out, weight._spec.mesh, out_p, shape)


def _embedding_backward(func, specs, args, kwargs):
    grad = specs[0]
    replicate = (Replicate(),) * len(grad.placements)
    indices = specs[1].placements if len(specs) > 1 else replicate  # a plain 0-d index: the same everywhere
    last = len(grad.shape) - 1
    scale_by_freq = args[4] if len(args) > 4 else kwargs.get("scale_grad_by_freq", False)
    g_p, i_p, out = [], [], []
    for gp, ip in zip(grad.placements, indices):
        batch = gp if isinstance(gp, Shard) and gp.dim < last else ip if isinstance(ip, Shard) else None
        if isinstance(gp, Shard) and gp.dim == last:  # column-sharded weight
            g_p.append(gp), i_p.append(Replicate()), out.append(Shard(1))
        elif batch is not None and not scale_by_freq:  # counts would be local: replicate instead
            g_p.append(batch), i_p.append(batch), out.append(Partial("sum"))
        elif gp.is_partial("sum"):
            g_p.append(gp), i_p.append(Replicate()), out.append(gp)
        else:
            g_p.append(Replicate()), i_p.append(Replicate()), out.append(Replicate())
    return Strategy((tuple(g_p), tuple(i_p))[: len(specs)], tuple(out))


# ---------------------------------------------------------------- nll loss


def _loss_layout(x: DTensorSpec):
    """(input placements, target placements, batch mesh dims, class mesh dims) for nll loss."""
    class_dim = 1 if len(x.shape) == 2 else 0
    inputs = replicate_partials(x.placements)
    batch = [m for m, p in enumerate(inputs) if isinstance(p, Shard) and p.dim != class_dim]
    classes = _mesh_dims(inputs, class_dim)
    targets = tuple(Shard(0) if m in batch else Replicate() for m in range(len(inputs)))
    return inputs, targets, batch, classes


def _sample_losses(local, t, weight, ignore_index: int, classes: tuple[int, int, int]):
    """(-w[t] * x[t] per sample, w[t] per sample) from this rank's shard, whose class dim ``classes[0]``
    holds classes [offset, offset + size); samples whose class lies elsewhere (or is ignored) give 0."""
    class_dim, offset, size = classes
    valid = t != ignore_index
    w = valid.to(local.dtype) if weight is None else torch.where(valid, weight[torch.where(valid, t, 0)], 0)
    mine = valid & (t >= offset) & (t < offset + size)
    if not size:
        return local.new_zeros(t.shape), w
    picked = local.gather(class_dim, torch.where(mine, t - offset, 0).unsqueeze(class_dim)).squeeze(class_dim)
    return torch.where(mine, -picked * w, 0), w


def _nll_loss_forward(cls, func, args, kwargs):
    """Local per-sample losses; their sum is pending over batch and class mesh dims. ``mean`` divides by
    the global total weight (one all-reduced scalar), which comes back replicated."""
    x, target, weight, reduction, ignore_index = args
    mesh, class_dim = x._spec.mesh, 1 if len(x.shape) == 2 else 0
    target, weight = _replicated(cls, target, mesh), _replicated(cls, weight, mesh)
    x_p, t_p, batch, classes = _loss_layout(x._spec)
    replicate = (Replicate(),) * mesh.ndim
    local, t = local_as(x, x_p), local_as(target, t_p)
    w_full = None if weight is None else local_as(weight, replicate)
    offset, size = _range(x.shape, mesh, x_p, class_dim)
    losses, w = _sample_losses(local, t, w_full, ignore_index, (class_dim, offset, size))
    losses = collectives.all_reduce_dims(losses, "sum", mesh, classes)  # torch's loss_parallel: Replicate on them
    pending = tuple(Partial("sum") if m in batch else Replicate() for m in range(mesh.ndim))
    if reduction == 0:
        out_p = tuple(Shard(0) if m in batch else pending[m] for m in range(mesh.ndim))
        return _wrap(cls, losses, mesh, out_p, target.shape), _wrap(cls, local.new_zeros(()), mesh, replicate, ())
    if reduction == _SUM:
        tw_p = tuple(Partial("sum") if m in batch else Replicate() for m in range(mesh.ndim))
        return _wrap(cls, losses.sum(), mesh, pending, ()), _wrap(cls, w.sum(), mesh, tw_p, ())
    total_weight = collectives.all_reduce_dims(w.sum(), "sum", mesh, batch)
    loss = _wrap(cls, losses.sum() / total_weight, mesh, pending, ())
    return loss, _wrap(cls, total_weight, mesh, replicate, ())


def _nll_loss_backward(func, specs, args, kwargs):
    x = specs[1]
    reduction = args[4]
    x_p, t_p, batch, classes = _loss_layout(x)
    replicate = (Replicate(),) * len(x_p)
    g_p = t_p if reduction == 0 else replicate
    weight_p = tuple(Shard(0) if m in classes else Replicate() for m in range(len(x_p)))
    inputs = [g_p, x_p, t_p] + ([weight_p] if args[3] is not None else [])
    tw = specs[-1].placements
    inputs.append(replicate if reduction == _MEAN else tw)
    rewrite = _shift_targets(x, x_p) if classes else None
    return Strategy(tuple(inputs), x_p, rewrite)


def _shift_targets(x: DTensorSpec, x_p):
    """Targets outside this rank's class range (or ignored) become ignore index -1; the rest shift down."""
    class_dim = 1 if len(x.shape) == 2 else 0
    offset, size = _range(x.shape, x.mesh, x_p, class_dim)

    def rewrite(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        t, ignore_index = args[2], args[5]
        mine = (t != ignore_index) & (t >= offset) & (t < offset + size)
        return args[:2] + (torch.where(mine, t - offset, -1),) + args[3:5] + (-1,) + args[6:], kwargs

    return rewrite


# ---------------------------------------------------------------- mse loss


def _mse_loss(cls, func, args, kwargs):
    """(x - y)^2, then the mean or sum as DTensor ops (a mean over shards divides by the global count)."""
    named = bind_args(func, args, kwargs)
    squared = aten.pow.Tensor_Scalar(aten.sub.Tensor(named["self"], named["target"]), 2)
    reduction = named["reduction"]
    return squared if reduction == 0 else aten.mean.default(squared) if reduction == _MEAN else aten.sum.default(squared)


def _mse_loss_backward(cls, func, args, kwargs):
    """2 (x - y) grad, divided by the global element count for ``mean``."""
    grad, x, y, reduction = (bind_args(func, args, kwargs)[k] for k in ("grad_output", "self", "target", "reduction"))
    scale = 2.0 / x.numel() if reduction == _MEAN else 2.0
    return aten.mul.Tensor(aten.mul.Scalar(aten.sub.Tensor(x, y), scale), grad)


RULES = {
    aten._softmax.default: _softmax,
    aten._softmax_backward_data.default: _softmax_backward,
    aten.native_layer_norm.default: _layer_norm,
    aten.native_layer_norm_backward.default: _layer_norm_backward,
    aten.embedding_dense_backward.default: _embedding_backward,
    aten.nll_loss_backward.default: _nll_loss_backward,
}

HANDLERS = {
    aten.mse_loss.default: _mse_loss,
    aten.mse_loss_backward.default: _mse_loss_backward,
    aten._log_softmax.default: _log_softmax,
    aten._log_softmax_backward_data.default: _log_softmax_backward,
    aten.embedding.default: _embedding,
    aten.nll_loss_forward.default: _nll_loss_forward,
}
