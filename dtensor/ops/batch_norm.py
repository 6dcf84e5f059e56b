"""Batch norm over a batch split across ranks, with the statistics of the whole batch (what
``SyncBatchNorm`` does for DDP): a DTensor's batch is one global batch, so its mean and variance are.

Training forward: each rank sums its samples per channel; one all-reduce gives the global mean, a second
the global sum of squared deviations from it (exact, as stable as one process). The output keeps the
batch split; the saved mean and inverse std and the updated running statistics are replicated. Training
backward needs two per-channel sums of the whole batch, taken in one all-reduce; the weight and bias
gradients are those sums. In eval mode the op is per sample and runs on the shards as they are, its
weight and bias gradients pending sums. Dim 0 may stay sharded; every other dim is replicated first.
"""

from __future__ import annotations

import math

import torch

from .. import collectives
from ..placements import Partial, Replicate
from ..redistribute import local_as
from ..spec import DTensorSpec
from .common import bind_args, with_plain_replicated
from .per_sample import batch_layout

aten = torch.ops.aten

__all__ = ["RULES", "HANDLERS"]


def _layouts(x):
    """(batch layout, replicated, mesh dims that split the batch) for activation ``x``."""
    batch = batch_layout(x._spec.placements)
    return batch, (Replicate(),) * len(batch), [m for m, p in enumerate(batch) if p.is_shard()]


def _wrap(cls, like, local: torch.Tensor, placements, shape):
    return cls(local, DTensorSpec.create(like._spec.mesh, placements, shape, local.dtype))


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against an (N, C, ...) tensor."""
    return t.reshape(1, -1, *([1] * (ndim - 2)))


def _batch_norm(cls, func, args, kwargs):
    """Plain weight, bias or running statistics (a BatchNorm left undistributed) are refused or replicated
    as in every op; replicated, the running statistics are still updated in place."""
    named = bind_args(func, with_plain_replicated(cls, func, args), kwargs)
    x = named["input"]
    batch, replicate, split = _layouts(x)
    local = local_as(x, batch)
    params = {k: None if named[k] is None else local_as(named[k], replicate) for k in ("weight", "bias", "running_mean", "running_var")}
    if not named["training"]:  # per sample: the local op with the running statistics
        out, save_mean, save_invstd = func(local, *params.values(), False, named["momentum"], named["eps"])
    else:
        out, save_mean, save_invstd = _normalize(local, params, named, x.shape, x._spec.mesh, split)
    channels = (x.shape[1],)
    return (
        _wrap(cls, x, out, batch, x.shape),
        _wrap(cls, x, save_mean, replicate, channels if save_mean.numel() else (0,)),
        _wrap(cls, x, save_invstd, replicate, channels if save_invstd.numel() else (0,)),
    )


def _normalize(local, params, named, shape, mesh, split):
    """Training forward with the global batch's statistics; updates the running statistics in place."""
    dims = [d for d in range(local.dim()) if d != 1]
    count = math.prod(shape[d] for d in dims)
    acc = torch.float64 if local.dtype == torch.float64 else torch.float32
    mean = collectives.all_reduce_dims(local.sum(dims, dtype=acc), "sum", mesh, split) / count
    centered = local.to(acc) - _channel_view(mean, local.dim())
    squares = collectives.all_reduce_dims((centered * centered).sum(dims), "sum", mesh, split)
    invstd = torch.rsqrt(squares / count + named["eps"])
    out = centered * _channel_view(invstd, local.dim())
    if params["weight"] is not None:
        out = out * _channel_view(params["weight"], local.dim())
    if params["bias"] is not None:
        out = out + _channel_view(params["bias"], local.dim())
    momentum = named["momentum"]
    if params["running_mean"] is not None:
        params["running_mean"].mul_(1 - momentum).add_(mean.to(params["running_mean"].dtype), alpha=momentum)
    if params["running_var"] is not None:
        unbiased = squares / max(count - 1, 1)
        params["running_var"].mul_(1 - momentum).add_(unbiased.to(params["running_var"].dtype), alpha=momentum)
    return out.to(local.dtype), mean, invstd  # statistics in the accumulation dtype, as torch keeps them


def _batch_norm_backward(cls, func, args, kwargs):
    named = bind_args(func, with_plain_replicated(cls, func, args), kwargs)
    x = named["input"]
    batch, replicate, split = _layouts(x)
    g, local = local_as(named["grad_out"], batch), local_as(x, batch)
    tensors = {k: None if named[k] is None else local_as(named[k], replicate)
               for k in ("weight", "running_mean", "running_var", "save_mean", "save_invstd")}
    mask = list(named["output_mask"])
    if not named["train"]:  # per sample: local op; weight and bias gradients pend as sums of the shards
        grads = func(g, local, *tensors.values(), False, named["eps"], mask)
        pending = tuple(Partial("sum") if p.is_shard() else Replicate() for p in batch)
        layouts = (batch, pending, pending)
    else:
        grads = _normalize_backward(g, local, tensors, x.shape, x._spec.mesh, split, mask)
        layouts = (batch, replicate, replicate)
    shapes = (x.shape, (x.shape[1],), (x.shape[1],))
    return tuple(None if t is None else _wrap(cls, x, t, p, s) for t, p, s in zip(grads, layouts, shapes))


def _normalize_backward(g, local, tensors, shape, mesh, split, mask):
    ndim = local.dim()
    dims = [d for d in range(ndim) if d != 1]
    count = math.prod(shape[d] for d in dims)
    mean, invstd = tensors["save_mean"], tensors["save_invstd"]
    acc = mean.dtype  # the statistics' dtype (float32 for half inputs): compute in it, return in the inputs'
    gx = g.to(acc)
    xhat = (local.to(acc) - _channel_view(mean, ndim)) * _channel_view(invstd, ndim)
    sums = collectives.all_reduce_dims(torch.stack([gx.sum(dims), (gx * xhat).sum(dims)]), "sum", mesh, split)
    sum_g, sum_gx = sums[0], sums[1]
    weight = tensors["weight"].to(acc) if tensors["weight"] is not None else torch.ones_like(invstd)
    grad_input = None
    if mask[0]:
        scale = _channel_view(weight * invstd / count, ndim)
        grad_input = (scale * (count * gx - _channel_view(sum_g, ndim) - xhat * _channel_view(sum_gx, ndim))).to(g.dtype)
    param_dtype = tensors["weight"].dtype if tensors["weight"] is not None else g.dtype
    return grad_input, sum_gx.to(param_dtype) if mask[1] else None, sum_g.to(param_dtype) if mask[2] else None


RULES: dict = {}
HANDLERS = {
    aten.native_batch_norm.default: _batch_norm,
    aten.native_batch_norm_backward.default: _batch_norm_backward,
}
