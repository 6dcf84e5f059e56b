"""Sharding rules and handlers, one module per op family, collected here explicitly.

``RULES`` maps an aten overload to a function ``(func, specs, args, kwargs) -> Strategy | None`` (None:
no rule fits these inputs, use the replicate fallback); ``HANDLERS`` maps an overload to a function
``(cls, func, args, kwargs) -> result`` that runs the whole op itself. Each family module exposes both.
``rule_for`` adds one default: any op torch tags ``pointwise`` (``fmod``, ``add.Scalar``, ``bitwise_or_``,
the ``special_*`` functions ...) gets the plain elementwise rule, so a new pointwise op never falls back.
"""

import torch

from . import along_dims, attention, batch_norm, indexing, matrix, nn, per_sample, pointwise, random_ops, reductions, tensor_ops, views

_FAMILIES = (pointwise, tensor_ops, matrix, reductions, views, nn, random_ops, attention, along_dims, per_sample, batch_norm, indexing)

RULES = {op: rule for family in _FAMILIES for op, rule in getattr(family, "RULES", {}).items()}
HANDLERS = {op: handler for family in _FAMILIES for op, handler in getattr(family, "HANDLERS", {}).items()}


def rule_for(func):
    """The op's sharding rule: its family's, else the elementwise one for ops tagged pointwise, else None."""
    rule = RULES.get(func)
    if rule is None and torch.Tag.pointwise in func.tags:
        rule = pointwise.GENERIC
    return rule
