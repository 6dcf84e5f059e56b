"""Ops that keep the layout of their (first) input: copies, detaches, fills and ``*_like`` factories."""

from __future__ import annotations

import torch

from ..dispatch import Strategy
from .common import replicate_partials

aten = torch.ops.aten


def _same_as_first(func, specs, args, kwargs):
    """Output laid out like the only DTensor input; Partial survives (these ops are linear or copies)."""
    if len(specs) != 1:
        return None
    return Strategy((specs[0].placements,), specs[0].placements)


def _like(func, specs, args, kwargs):
    """A fresh tensor shaped like the input: sharded like it, never Partial (its values are not terms)."""
    placements = replicate_partials(specs[0].placements)
    return Strategy((placements,), placements)


def _copy_into(func, specs, args, kwargs):
    """``dst.copy_(src)``: src is moved to dst's layout first."""
    dst = specs[0].placements
    if dst != replicate_partials(dst) and len(specs) > 1 and specs[1].placements != dst:
        return None
    return Strategy(tuple(dst for _ in specs), dst)


def _fill(func, specs, args, kwargs):
    placements = replicate_partials(specs[0].placements)
    if placements != specs[0].placements:
        return None
    return Strategy((placements,) * len(specs), placements)


RULES = {
    aten.detach.default: _same_as_first,
    aten.alias.default: _same_as_first,
    aten.clone.default: _same_as_first,
    aten._to_copy.default: _same_as_first,
    aten.zeros_like.default: _like,
    aten.ones_like.default: _like,
    aten.empty_like.default: _like,
    aten.full_like.default: _like,
    aten.copy_.default: _copy_into,
    aten.zero_.default: _fill,
    aten.fill_.Scalar: _fill,
}
