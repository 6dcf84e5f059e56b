"""Losses that are elementwise before their reduction: binary cross-entropy (with and without logits),
Huber, smooth L1 and soft margin, forward and backward.

With ``reduction='none'`` each is an elementwise op over its broadcast inputs (the plain elementwise
rule). With ``'mean'`` or ``'sum'`` the handler runs the ``'none'`` form on the shards and then a
``sum``/``mean`` as DTensor ops, so a mean divides by the global element count and any layout works.
Their backward ops get a 0-d output gradient for ``'mean'``/``'sum'``: it is expanded to the input's
shape, the ``'none'`` backward runs elementwise, and a mean divides by the global count.
"""

from __future__ import annotations

import torch

from ..dispatch import apply_rule
from .common import bind_args
from .pointwise import GENERIC

aten = torch.ops.aten

__all__ = ["RULES", "HANDLERS"]

_NONE, _MEAN = 0, 1  # aten's reduction enum (torch.nn._reduction)


def _call(cls, func, named: dict, **changes):
    """``func`` with its arguments by schema name (some changed), through the elementwise rule."""
    named = {**named, **changes}
    args, kwargs = [], {}
    for arg in func._schema.arguments:
        if arg.kwarg_only:
            kwargs[arg.name] = named[arg.name]
        else:
            args.append(named[arg.name])
    return apply_rule(cls, func, tuple(args), kwargs, GENERIC)


def _loss(cls, func, args, kwargs):
    named = bind_args(func, args, kwargs)
    losses = _call(cls, func, named, reduction=_NONE)
    reduction = named["reduction"]
    return losses if reduction == _NONE else aten.mean.default(losses) if reduction == _MEAN else aten.sum.default(losses)


def _loss_backward(cls, func, args, kwargs):
    named = bind_args(func, args, kwargs)
    reduction, x = named["reduction"], named["self"]
    if reduction == _NONE:
        return _call(cls, func, named)
    grad = aten.expand.default(named["grad_output"], list(x.shape))
    out = _call(cls, func, named, grad_output=grad, reduction=_NONE)
    return aten.div.Scalar(out, x.numel()) if reduction == _MEAN else out


_FORWARD = "binary_cross_entropy binary_cross_entropy_with_logits huber_loss smooth_l1_loss soft_margin_loss"
_BACKWARD = "binary_cross_entropy_backward huber_loss_backward smooth_l1_loss_backward soft_margin_loss_backward"

RULES: dict = {}
HANDLERS = {
    **{getattr(aten, name).default: _loss for name in _FORWARD.split()},
    **{getattr(aten, name).default: _loss_backward for name in _BACKWARD.split()},
}
