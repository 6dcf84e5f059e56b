"""Elementwise ops: the output is laid out like the inputs when all DTensor inputs agree.

Inputs of different shapes (broadcasting) or layouts are left to the replicate fallback for now.
A pending sum (Partial) survives only ops that are linear in every DTensor input.
"""

from __future__ import annotations

import torch

from ..dispatch import Strategy
from .common import replicate_partials

aten = torch.ops.aten

# Linear in their DTensor inputs when every other argument is a scalar: sum(a_i) op c = sum(a_i op c).
_LINEAR = {aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.sub_.Tensor, aten.neg.default}
_SCALE = {aten.mul.Tensor, aten.mul_.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div_.Tensor, aten.div.Scalar}

_POINTWISE = [
    aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.sub_.Tensor, aten.mul.Tensor, aten.mul_.Tensor,
    aten.mul.Scalar, aten.div.Tensor, aten.div_.Tensor, aten.div.Scalar, aten.neg.default, aten.abs.default,
    aten.exp.default, aten.log.default, aten.sqrt.default, aten.rsqrt.default, aten.pow.Tensor_Scalar,
    aten.sin.default, aten.cos.default, aten.tanh.default, aten.sigmoid.default, aten.relu.default,
    aten.gelu.default, aten.eq.Tensor, aten.ne.Tensor, aten.lt.Tensor, aten.gt.Tensor,
]


def _partial_ok(func, specs, args) -> bool:
    reduce_ops = {p.reduce_op for s in specs for p in s.placements if p.is_partial()}
    if reduce_ops - {"sum"} or any(s.placements != specs[0].placements for s in specs):
        return False
    if func in _LINEAR:
        return True
    return func in _SCALE and len(specs) == 1 and not isinstance(args[1], torch.Tensor)


def _elementwise(func, specs, args, kwargs):
    if any(s.shape != specs[0].shape for s in specs):
        return None
    placements = specs[0].placements
    if any(s.placements != placements for s in specs):
        return None
    if any(p.is_partial() for p in placements) and not _partial_ok(func, specs, args):
        placements = replicate_partials(placements)
    return Strategy(tuple(placements for _ in specs), placements)


RULES = {op: _elementwise for op in _POINTWISE}
