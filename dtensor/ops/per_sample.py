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
from .common import bind_args

aten = torch.ops.aten

__all__ = ["RULES", "HANDLERS", "batch_layout"]

BATCH, PARAM, GRAD = "batch", "param", "grad"  # per tensor: sample-wise, replicated, a parameter's gradient


def batch_layout(placements: Sequence[Placement]) -> tuple[Placement, ...]:
    """The layout a sample-wise op runs in: the batch (dim 0) split kept, everything else whole."""
    return tuple(p if p == Shard(0) else Replicate() for p in placements)


def _rule(inputs: Sequence[str], outputs: Sequence[str], batch_size_arg: str | None = None):
    """A rule for an op whose DTensor arguments (in order) and tensor outputs are each BATCH, PARAM or GRAD.

    The first BATCH argument decides the batch layout; ``batch_size_arg`` names an argument holding the
    global batch size (or a global input size, whose first entry it is), rewritten to the local one."""

    def rule(func, specs, args, kwargs):
        named = bind_args(func, args, kwargs)
        kinds = _present(func, named, inputs)
        if len(kinds) != len(specs):
            return None
        batch = batch_layout(next(s.placements for s, k in zip(specs, kinds) if k == BATCH))
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
    aten.native_group_norm.default: _rule((BATCH, PARAM, PARAM), (BATCH, BATCH, BATCH), "N"),
    aten.native_group_norm_backward.default: _rule((BATCH, BATCH, BATCH, BATCH, PARAM), (BATCH, GRAD, GRAD), "N"),
}
HANDLERS: dict = {}
