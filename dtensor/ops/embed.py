"""Ops that write a smaller tensor into a view of a bigger one: ``diag_embed`` and ``diagonal_backward``
(into zeros), ``select_scatter`` and ``diagonal_scatter`` (into ``self``).

The view's own dims (the selected dim, the diagonal's two dims) are replicated first; every other dim
of the bigger tensor is one dim of the smaller one, so a shard of it stays, on the matching dim of
both. Writing into zeros keeps a pending sum or average (zeros are a term of it); writing into ``self``
resolves pending reductions first. ``diagonal_backward`` names the global input size, rewritten to the
local one.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..dispatch import Strategy
from ..placements import Placement, Replicate, Shard
from .common import bind_args, replicate_partials
from .views import _local_shape, _sum_only, _with_arg

aten = torch.ops.aten

__all__ = ["RULES", "HANDLERS"]


def _pair(named: dict, ndim: int) -> list[int]:
    return sorted({named["dim1"] % ndim, named["dim2"] % ndim})


def _to_small(big: Sequence[Placement], rest: list[int]) -> tuple[Placement, ...]:
    """The small tensor's placements for the big one's: big dim ``rest[i]`` is small dim ``i``."""
    return tuple(Shard(rest.index(p.dim)) if isinstance(p, Shard) else p for p in big)


def _to_big(small: Sequence[Placement], rest: list[int]) -> tuple[Placement, ...]:
    return tuple(Shard(rest[p.dim]) if isinstance(p, Shard) else p for p in small)


def _small_layout(spec, core: int) -> tuple[Placement, ...]:
    """The small input's placements with its last ``core`` dims whole and only sum/avg pending."""
    ndim = len(spec.shape)
    return _sum_only(tuple(Replicate() if isinstance(p, Shard) and p.dim >= ndim - core else p for p in spec.placements))


def _diag_embed(func, specs, args, kwargs):
    spec = specs[0]
    out_ndim = len(spec.shape) + 1
    rest = [d for d in range(out_ndim) if d not in _pair(bind_args(func, args, kwargs), out_ndim)]
    small = _small_layout(spec, 1)
    return Strategy((small,), _to_big(small, rest))


def _diagonal_backward(func, specs, args, kwargs):
    spec = specs[0]
    named = bind_args(func, args, kwargs)
    sizes = list(named["input_sizes"])
    rest = [d for d in range(len(sizes)) if d not in _pair(named, len(sizes))]
    small = _small_layout(spec, 1)
    out = _to_big(small, rest)
    return Strategy((small,), out, _with_arg(1, _local_shape(spec.mesh, sizes, out)))


def _scatter_into(view_dims):
    """The rule of ``X_scatter(self, src, ...)``: ``view_dims(named, ndim)`` are the view's own dims of
    ``self``; ``src`` holds the other dims in order, then (for a diagonal) one more."""

    def rule(func, specs, args, kwargs):
        if len(specs) != 2:
            return None
        big = specs[0]
        ndim = len(big.shape)
        whole = view_dims(bind_args(func, args, kwargs), ndim)
        rest = [d for d in range(ndim) if d not in whole]
        placements = replicate_partials(tuple(Replicate() if isinstance(p, Shard) and p.dim in whole else p for p in big.placements))
        return Strategy((placements, _to_small(placements, rest)), placements)

    return rule


def _select_dim(named: dict, ndim: int) -> list[int]:
    return [named["dim"] % ndim]


RULES = {
    aten.diag_embed.default: _diag_embed,
    aten.diagonal_backward.default: _diagonal_backward,
    aten.select_scatter.default: _scatter_into(_select_dim),
    aten.diagonal_scatter.default: _scatter_into(_pair),
}
HANDLERS: dict = {}
