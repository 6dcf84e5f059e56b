"""Sharding rules and handlers, one module per op family, collected here explicitly.

``RULES`` maps an aten overload to a function ``(func, specs, args, kwargs) -> Strategy | None`` (None:
no rule fits these inputs, use the replicate fallback); ``HANDLERS`` maps an overload to a function
``(cls, func, args, kwargs) -> result`` that runs the whole op itself. Each family module exposes both.
"""

from . import attention, matrix, nn, pointwise, random_ops, reductions, tensor_ops, views

_FAMILIES = (pointwise, tensor_ops, matrix, reductions, views, nn, random_ops, attention)

RULES = {op: rule for family in _FAMILIES for op, rule in getattr(family, "RULES", {}).items()}
HANDLERS = {op: handler for family in _FAMILIES for op, handler in getattr(family, "HANDLERS", {}).items()}
