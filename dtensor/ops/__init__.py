"""Sharding rules, one module per op family; ``RULES`` maps each aten overload to its rule."""

from . import pointwise, tensor_ops

RULES = {**pointwise.RULES, **tensor_ops.RULES}
