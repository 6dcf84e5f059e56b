"""Ops that treat every sample (dim 0 of the activations) alike and independently: convolutions,
pooling, upsampling and group norm, with their backward ops.

Data parallelism over these is a batch split: dim 0 of the activation may stay sharded (every other
tensor of the sample, a gradient, pooling indices, group-norm statistics, is moved to the same layout),
every other dim is replicated first (a convolution window spans spatial dims, channels mix), and
weights and biases are replicated. Outputs per sample keep the batch layout; gradients of weights and
biases are ``Partial("sum")`` over the mesh dims that split the batch (each rank summed its own
samples). Group norm's arguments name the global batch size, and upsampling's backward the global input
size; each rank puts in its own batch size.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..dispatch import Strategy
from ..placements import Partial, Placement, Replicate, Shard
from .common import bind_args, is_shardable

aten = torch.ops.aten

__all__ = ["RULES", "HANDLERS", "batch_layout"]

BATCH, PARAM, GRAD = "batch", "param", "grad"  # per tensor: sample-wise, replicated, a parameter's gradient


def batch_layout(placements: Sequence[Placement]) -> tuple[Placement, ...]:
    """The layout a sample-wise op runs in: the batch (dim 0) split kept, everything else whole."""
    return tuple(p if p == Shard(0) else Replicate() for p in placements)


def _rule(inputs: Sequence[str], outputs: Sequence[str], batch_size_arg: str | None = None, min_ndim: int = 0):
    """A rule for an op whose DTensor arguments (in order) and tensor outputs are each BATCH, PARAM or GRAD.

    The first BATCH argument decides the batch layout; ``batch_size_arg`` names an argument holding the
    global batch size (or a global input size, whose first entry it is), rewritten to the local one.
    ``min_ndim``: below it, dim 0 of the first BATCH argument is not a batch (an unbatched input whose
    dim 0 holds channels that the op mixes): everything is replicated, as it is when a rank's piece of
    dim 0 would be empty (kernels refuse an unbatched input with no channels)."""

    def rule(func, specs, args, kwargs):
        named = bind_args(func, args, kwargs)
        kinds = _present(func, named, inputs)
        if len(kinds) != len(specs):
            return None
        first = next(s for s, k in zip(specs, kinds) if k == BATCH)
        batch = batch_layout(first.placements)
        if len(first.shape) < min_ndim or not is_shardable(first.shape, batch, first.mesh.shape):
            batch = tuple(Replicate() for _ in batch)  # no batch, or empty pieces (kernels refuse 0 channels)
        replicate = tuple(Replicate() for _ in batch)
        grad = tuple(Partial("sum") if p.is_shard() else Replicate() for p in batch)
        wanted = tuple(batch if k == BATCH else replicate for k in kinds)
        layouts = {BATCH: batch, PARAM: replicate, GRAD: grad}
        out = [layouts[k] for k, on in zip(outputs, _output_mask(named, len(outputs))) if on]
        local_args = _local_batch_size(func, batch_size_arg) if batch_size_arg and batch != replicate else None
        return Strategy(wanted, out if len(outputs) > 1 else out[0], local_args)

    return rule


def _present(func, named: dict, kinds: Sequence[str]) -> list[str]:
    """The kinds of the tensor arguments actually given (optional ones, like a bias, may be None)."""
    tensors = [a.name for a in func._schema.arguments if "Tensor" in str(a.type)]
    return [k for name, k in zip(tensors, kinds) if named.get(name) is not None]


def _output_mask(named: dict, count: int) -> list[bool]:
    mask = named.get("output_mask")
    return list(mask) if mask is not None else [True] * count


def _local_batch_size(func, arg: str):
    position = [a.name for a in func._schema.arguments].index(arg)

    def local_args(local: tuple, local_kwargs: dict) -> tuple[tuple, dict]:
        n = local[0].shape[0]  # the input (forward) or the output gradient (backward)
        size = local[position]
        value = [n, *size[1:]] if isinstance(size, (list, tuple)) else n  # an input size, or the batch size
        return local[:position] + (value,) + local[position + 1 :], local_kwargs

    return local_args


def _ops(names: str) -> list:
    """'avg_pool3d upsample_nearest1d.vec' -> the overloads (``.default`` unless named)."""
    out = []
    for name in names.split():
        packet, _, overload = name.partition(".")
        out.append(getattr(getattr(aten, packet), overload or "default"))
    return out


# pooling, upsampling and padding in 1-D and 3-D (2-D has its own lines below), per sample and channel
_ONE_IN_ONE_OUT = (
    "avg_pool3d _adaptive_avg_pool3d upsample_nearest1d upsample_nearest1d.vec _upsample_nearest_exact1d "
    "_upsample_nearest_exact1d.vec upsample_linear1d upsample_linear1d.vec upsample_bicubic2d upsample_bicubic2d.vec "
    "upsample_trilinear3d upsample_trilinear3d.vec _upsample_bilinear2d_aa _upsample_bilinear2d_aa.vec "
    "reflection_pad1d reflection_pad2d reflection_pad3d replication_pad1d replication_pad2d replication_pad3d"
)
_GRAD_AND_INPUT = (
    "avg_pool3d_backward _adaptive_avg_pool3d_backward reflection_pad1d_backward reflection_pad2d_backward "
    "reflection_pad3d_backward replication_pad1d_backward replication_pad2d_backward replication_pad3d_backward"
)
_UPSAMPLE_BACKWARD = (
    "upsample_nearest1d_backward _upsample_nearest_exact1d_backward upsample_linear1d_backward "
    "upsample_bicubic2d_backward upsample_trilinear3d_backward _upsample_bilinear2d_aa_backward"
)
_WITH_INDICES_BACKWARD = "max_pool3d_with_indices_backward adaptive_max_pool2d_backward adaptive_max_pool3d_backward"

RULES = {
    aten.convolution.default: _rule((BATCH, PARAM, PARAM), (BATCH,)),
    aten.convolution_backward.default: _rule((BATCH, BATCH, PARAM), (BATCH, GRAD, GRAD)),
    aten.max_pool2d_with_indices.default: _rule((BATCH,), (BATCH, BATCH)),
    aten.max_pool2d_with_indices_backward.default: _rule((BATCH, BATCH, BATCH), (BATCH,)),
    aten.avg_pool2d.default: _rule((BATCH,), (BATCH,)),
    aten.avg_pool2d_backward.default: _rule((BATCH, BATCH), (BATCH,)),
    aten._adaptive_avg_pool2d.default: _rule((BATCH,), (BATCH,)),
    aten._adaptive_avg_pool2d_backward.default: _rule((BATCH, BATCH), (BATCH,)),
    aten.upsample_nearest2d.vec: _rule((BATCH,), (BATCH,)),
    aten.upsample_nearest2d.default: _rule((BATCH,), (BATCH,)),
    aten.upsample_nearest2d_backward.default: _rule((BATCH,), (BATCH,), "input_size"),
    aten.upsample_bilinear2d.vec: _rule((BATCH,), (BATCH,)),
    aten.upsample_bilinear2d.default: _rule((BATCH,), (BATCH,)),
    aten.upsample_bilinear2d_backward.default: _rule((BATCH,), (BATCH,), "input_size"),
    **{op: _rule((BATCH,), (BATCH,)) for op in _ops(_ONE_IN_ONE_OUT)},
    **{op: _rule((BATCH, BATCH), (BATCH,)) for op in _ops(_GRAD_AND_INPUT)},
    **{op: _rule((BATCH,), (BATCH,), "input_size") for op in _ops(_UPSAMPLE_BACKWARD)},
    **{op: _rule((BATCH,), (BATCH, BATCH)) for op in _ops("max_pool3d_with_indices adaptive_max_pool2d adaptive_max_pool3d")},
    **{op: _rule((BATCH, BATCH, BATCH), (BATCH,)) for op in _ops(_WITH_INDICES_BACKWARD)},
    **{op: _rule((BATCH, BATCH), (BATCH,)) for op in _ops("max_unpool2d max_unpool3d")},
    **{op: _rule((BATCH,), (BATCH,), min_ndim=4) for op in _ops("pixel_shuffle pixel_unshuffle channel_shuffle im2col")},
    aten.col2im.default: _rule((BATCH,), (BATCH,), min_ndim=3),
    **{op: _rule((BATCH, BATCH), (BATCH,)) for op in _ops("grid_sampler_2d grid_sampler_3d")},
    **{op: _rule((BATCH, BATCH, BATCH), (BATCH, BATCH)) for op in _ops("grid_sampler_2d_backward grid_sampler_3d_backward")},
    aten.native_group_norm.default: _rule((BATCH, PARAM, PARAM), (BATCH, BATCH, BATCH), "N"),
    aten.native_group_norm_backward.default: _rule((BATCH, BATCH, BATCH, BATCH, PARAM), (BATCH, GRAD, GRAD), "N"),
}
HANDLERS: dict = {}
