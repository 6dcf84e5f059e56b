"""Sharding rules and handlers, one module per op family, collected here explicitly.

``RULES`` maps an aten overload to a function ``(func, specs, args, kwargs) -> Strategy | None`` (None:
no rule fits these inputs, use the replicate fallback); ``HANDLERS`` maps an overload to a function
``(cls, func, args, kwargs) -> result`` that runs the whole op itself. Each family module exposes both.
``rule_for`` adds one default: any op torch tags ``pointwise`` (``fmod``, ``add.Scalar``, ``bitwise_or_``,
the ``special_*`` functions ...) gets the plain elementwise rule, so a new pointwise op never falls back;
and the ``*_copy`` twins of view ops (``view_copy``, ``transpose_copy`` ...) get the view's rule.
"""

import torch

from . import along_dims, attention, batch_norm, embed, indexing, linalg, losses, matrix, nn, per_sample, pointwise, random_ops, reductions, tensor_ops, views

_FAMILIES = (
    pointwise, tensor_ops, matrix, reductions, views, nn, losses, random_ops, attention, along_dims, per_sample, batch_norm, indexing, linalg, embed,
)

RULES = {op: rule for family in _FAMILIES for op, rule in getattr(family, "RULES", {}).items()}
HANDLERS = {op: handler for family in _FAMILIES for op, handler in getattr(family, "HANDLERS", {}).items()}


# Ops laid out exactly as another op (same arguments, same layout): the ``*_copy`` twins of view ops (their
# output strides come from their own meta call), ``unsafe_split``, ``_safe_softmax``. The model's rule
# runs as if the model were called, so rules that look at which op they serve still work.
_TWINS = """
alias_copy=alias expand_copy=expand view_copy=view diagonal_copy=diagonal transpose_copy.int=transpose.int
unsqueeze_copy=unsqueeze select_copy.int=select.int slice_copy.Tensor=slice.Tensor squeeze_copy.dims=squeeze.dims
detach_copy=detach _conj_copy=_conj _neg_view_copy=_neg_view view_as_real_copy=view_as_real
view_as_complex_copy=view_as_complex permute_copy=permute t_copy=t split_copy.Tensor=split.Tensor
split_with_sizes_copy=split_with_sizes unbind_copy.int=unbind.int unsafe_split.Tensor=split.Tensor
unsafe_split_with_sizes=split_with_sizes unfold_copy=unfold narrow_copy=slice.Tensor _safe_softmax=_softmax
"""


def _op(name: str):
    packet, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, packet), overload or "default")


def _as(model, rule):
    return lambda func, specs, args, kwargs: rule(model, specs, args, kwargs)


def _copy_variants(rules: dict) -> dict:
    pairs = [pair.split("=") for pair in _TWINS.split()]
    return {_op(twin): _as(_op(model), rules[_op(model)]) for twin, model in pairs}


RULES.update(_copy_variants(RULES))


# Rules registered at run time (``dtensor.experimental.register_sharding``): they come before the
# families' rules and handlers, as a registration in torch replaces its default strategy.
REGISTERED: dict = {}


def rule_for(func):
    """The op's sharding rule: a registered one, its family's, else the elementwise one for ops tagged
    pointwise, else None."""
    rule = REGISTERED.get(func) or RULES.get(func)
    if rule is None and torch.Tag.pointwise in func.tags:
        rule = pointwise.GENERIC
    return rule


def handler_for(func):
    """The op's handler, unless a rule was registered for it (``REGISTERED``)."""
    return None if func in REGISTERED else HANDLERS.get(func)
