"""Scaled dot-product attention on CPU: the fused kernels ``F.scaled_dot_product_attention`` reaches there.

Attention is independent across its leading (batch, heads) dims, so q, k, v, the output, the
log-sum-exp and every gradient may be sharded on any of them, as long as q, k and v are cut alike:
equal sizes in that dim, or (grouped-query attention, fewer k/v heads) sizes the mesh divides evenly.
An attention mask is cut the same way where it has that dim, and replicated where it broadcasts.
Sharding on the sequence or feature dims (and Partial) becomes Replicate. torch's DTensor has no rule
for these CPU kernels.
"""

from __future__ import annotations

import math

import torch

from ..dispatch import Strategy
from ..placements import Replicate, Shard

aten = torch.ops.aten


def _leading_shard(placements, specs, mesh) -> tuple:
    """Per mesh dim: its Shard if it cuts a leading dim of q/k/v alike, else Replicate."""
    ndim = len(specs[0].shape)
    out = []
    for mesh_dim, p in enumerate(placements):
        keep = isinstance(p, Shard) and p.dim < ndim - 2 and _cut_alike(p.dim, placements, specs, mesh)
        out.append(p if keep else Replicate())
    return tuple(out)


def _cut_alike(dim: int, placements, specs, mesh) -> bool:
    sizes = {s.shape[dim] for s in specs}
    if len(sizes) == 1:
        return True
    ways = math.prod(mesh.size(m) for m, p in enumerate(placements) if p == Shard(dim))
    return all(size % ways == 0 for size in sizes)


def _mask_placements(mask, qkv_placements, ndim: int) -> tuple:
    """The mask follows q's sharding on the dims it has at full size; elsewhere it is replicated."""
    offset = ndim - len(mask.shape)
    out = []
    for p in qkv_placements:
        dim = p.dim - offset if isinstance(p, Shard) else -1
        out.append(Shard(dim) if dim >= 0 and mask.shape[dim] > 1 else Replicate())
    return tuple(out)


def _attention(qkv_at: int, func, specs, args, kwargs):
    """Rule for the forward (q, k, v first) and backward (grad_out, q, k, v, out, lse) kernels."""
    n_core = 3 if qkv_at == 0 else 6
    qkv = specs[qkv_at : qkv_at + 3]
    if len(specs) < n_core or any(len(s.shape) != len(qkv[0].shape) for s in qkv):
        return None
    mesh = qkv[0].mesh
    placements = _leading_shard(qkv[0].placements, qkv, mesh)
    ndim = len(qkv[0].shape)
    inputs = [placements] * n_core
    if len(specs) > n_core:  # the attention mask, the only other tensor argument
        inputs.append(_mask_placements(specs[n_core], placements, ndim))
    outputs = [placements] * (2 if qkv_at == 0 else 3)
    return Strategy(tuple(inputs), outputs)


def _forward(func, specs, args, kwargs):
    return _attention(0, func, specs, args, kwargs)


def _backward(func, specs, args, kwargs):
    return _attention(1, func, specs, args, kwargs)


RULES = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: _forward,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: _backward,
}
HANDLERS: dict = {}
