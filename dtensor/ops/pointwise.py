"""Elementwise ops, their in-place forms, ``_foreach_*`` lists and the fused optimizers.

One chooser (``common.elementwise``) serves them all: inputs broadcast from the right, a Shard on a dim an
input broadcasts cannot stay, and the output follows the input with the most elements (the others are
moved to match). In-place ops keep their target's placements. ``Partial`` survives only where a row of
the op's table below says so (sum/avg through linear ops, max/min through monotone ones), as in torch.
``_foreach_*`` and ``_fused_*`` ops get one choice per list element: every argument's i-th element
follows the i-th ``self``; a tensor shared by all elements (a 0-d scale) must suit them all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree

from ..dispatch import Strategy
from ..placements import Partial, Replicate
from .common import (
    Operand,
    bind_args,
    elementwise,
    is_inplace,
    mutable_args,
    plain_as_replicate,
    split_plain,
    tensor_operands,
)

aten = torch.ops.aten

R, PS, PA, PMAX, PMIN = Replicate(), Partial("sum"), Partial("avg"), Partial("max"), Partial("min")

# Partial rows, one mesh dim each: (output, operand 0, operand 1, ...); a row applies when its length fits.
LINEAR = ((PS, PS), (PA, PA))  # f(sum a_i) = sum f(a_i): scaling by a number
MONOTONE = ((PMAX, PMAX), (PMIN, PMIN))  # non-decreasing f commutes with max and min
DECREASING = ((PMIN, PMAX), (PMAX, PMIN))  # non-increasing f turns a max into a min
NEG = LINEAR + DECREASING
ADDITIVE = ((PS, PS, PS), (PA, PA, PA), (PA, PA, R), (PMAX, PMAX, R), (PMIN, PMIN, R), (PA, R, PA))
MUL = LINEAR + ((PS, PS, R), (PA, PA, R), (PS, R, PS), (PA, R, PA))
DIV = LINEAR + ((PS, PS, R), (PA, PA, R))
_MONOTONE2 = ((PMAX, PMAX, R), (PMAX, R, PMAX), (PMIN, PMIN, R), (PMIN, R, PMIN))
MAXIMUM = _MONOTONE2 + ((PMAX, PMAX, PMAX),)
MINIMUM = _MONOTONE2 + ((PMIN, PMIN, PMIN),)
COPY = tuple((p, p, p) for p in (PS, PA, PMAX, PMIN))  # dst.copy_(src): a copy of every term
KEEP = tuple((p, p) for p in (PS, PA, PMAX, PMIN))  # zero_: zeros are a term of every reduction
SHIFT = ((PA, PA), (PMAX, PMAX), (PMIN, PMIN))  # x.add_(c), c a number: every term shifts by c


def _ops(names: str) -> list:
    """'add.Tensor add_.Tensor' -> [aten.add.Tensor, aten.add_.Tensor]."""
    out = []
    for name in names.split():
        packet, overload = name.split(".")
        out.append(getattr(getattr(aten, packet), overload))
    return out


def elementwise_rule(rules=()):
    """A rule for an elementwise op whose Partial options are ``rules``."""

    def rule(func, specs, args, kwargs):
        operands = tensor_operands(specs, args, kwargs)
        keep = (0,) if is_inplace(func) else ()
        outs = _written_kwargs(func, args, kwargs)
        if outs:  # out= tensors (``out``, ``grad_input``, ``mantissa`` ...) are written like targets
            keep, rules_here = outs, ()
        else:
            rules_here = rules
        choice = elementwise(tuple(operands), tuple(rules_here), keep)
        if choice is None:
            raise RuntimeError(_inplace_error(func, [operands[k] for k in keep] + operands))
        return Strategy(choice.dtensor_inputs(), choice.output)

    return rule


def _written_kwargs(func, args: tuple, kwargs: dict) -> tuple[int, ...]:
    """Operand positions of the tensors an out= overload writes: keyword-only in the schema, so they
    are keyword arguments, and their leaves come after every positional tensor."""
    written = mutable_args(func)
    if not written or is_inplace(func):
        return ()
    position = sum(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(args))
    keep = []
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            if name in written:
                keep.append(position)
            position += 1
    return tuple(keep)


def _inplace_error(func, operands) -> str:
    return (
        f"{func}: the in-place target has placements {list(operands[0].placements)} and the other inputs "
        f"{[list(o.placements) for o in operands[1:] if o.spec is not None]}; no layout runs this op without "
        "changing the target (a Partial target survives only ops linear in it). Redistribute the target "
        "first (e.g. to Replicate) or use the out-of-place op."
    )


def foreach_rule(rules=()):
    """A rule for a ``_foreach_*`` / ``_fused_*`` op: one elementwise choice per list element."""

    def rule(func, specs, args, kwargs):
        leaves = _tensor_leaves(func, specs, args, kwargs)
        count = max((x.element for x in leaves if x.element is not None), default=-1) + 1
        wanted, outputs = [None] * len(leaves), []
        for i in range(count):
            mine = [k for k, x in enumerate(leaves) if x.element in (i, None)]
            keep = tuple(j for j, k in enumerate(mine) if leaves[k].written and leaves[k].element == i)
            operands = tuple(leaves[k].operand for k in mine)
            choice = elementwise(operands, tuple(rules), keep)
            if choice is None:
                raise RuntimeError(f"element {i} of the lists: " + _inplace_error(func, operands))
            for j, k in enumerate(mine):
                if wanted[k] is not None and wanted[k] != choice.inputs[j]:
                    return None  # a tensor shared by all elements that they want in different layouts
                wanted[k] = choice.inputs[j]
            outputs.append(choice.output)
        inputs = tuple(w for w, x in zip(wanted, leaves) if x.operand.spec is not None)
        return Strategy(inputs, [] if is_inplace(func) or not func._schema.returns else outputs)

    return rule


@dataclass(frozen=True)
class _Leaf:
    """A tensor argument of a list op: which list element it belongs to (None: shared), whether written."""

    operand: Operand
    element: int | None
    written: bool


def _tensor_leaves(func, specs, args, kwargs) -> list[_Leaf]:
    """Every tensor leaf of (args, kwargs) in pytree order.

    ``grads`` of the fused optimizers count as read-only: they may be moved to their parameter's layout.
    """
    names = [a.name for a in func._schema.arguments]
    written = mutable_args(func) - {"grads"}
    operands = iter(tensor_operands(specs, args, kwargs))
    out = []
    for path, leaf in pytree.tree_flatten_with_path((args, kwargs))[0]:
        if isinstance(leaf, torch.Tensor):
            name = names[path[1].idx] if path[0].idx == 0 else path[1].key
            operand = next(operands)
            element = path[2].idx if len(path) == 3 else None
            out.append(_Leaf(operand, element, name in written and operand.spec is not None))
    return out


def _to_copy_rule(func, specs, args, kwargs):
    """A dtype cast keeps a Partial unless the reduction does not commute with it (float -> int, -> bool)."""
    src, dst = specs[0].dtype, kwargs.get("dtype") or specs[0].dtype
    to_bool = dst == torch.bool and src != torch.bool
    truncates = src.is_floating_point and not dst.is_floating_point
    rows = [(p, p) for p in (PMAX, PMIN) if not to_bool] + [(p, p) for p in (PS, PA) if not (to_bool or truncates)]
    return elementwise_rule(rows)(func, specs, args, kwargs)


def _masked_fill_scalar(func, specs, args, kwargs):
    """``x.masked_fill_(mask, c)`` with a number ``c`` and a replicated mask: every rank writes ``c`` where
    the mask is set, so a pending avg/max/min stays pending (``c`` is then each term), a pending sum only
    where ``c`` is 0 (its terms add up to 0). torch refuses any in-place op on a Partial; cross_entropy's
    label smoothing needs this one, zeroing the ignored targets' term of class-sharded logits in place.
    Out of place, as torch's rule, no Partial survives (``_TABLE``)."""
    value = args[2] if len(args) > 2 else kwargs["value"]
    rows = ((PA, PA, R), (PMAX, PMAX, R), (PMIN, PMIN, R)) + (((PS, PS, R),) if value == 0 else ())
    return elementwise_rule(rows)(func, specs, args, kwargs)


def _threshold(func, specs, args, kwargs):
    """``threshold(x, t, v)`` (``x`` where ``x > t``, else ``v``) is non-decreasing only for ``v <= t``;
    torch keeps a pending max/min for any ``v``, which gives a wrong maximum where ``v > t``."""
    named = bind_args(func, args, kwargs)
    return elementwise_rule(MONOTONE if named["value"] <= named["threshold"] else ())(func, specs, args, kwargs)


def _additive(func, specs, args, kwargs):
    """``add``/``sub`` under torch's rows (``ADDITIVE``). A Python number (``x + 1``) is no operand, so no
    row applies and a pending reduction is carried out first, as in torch; in place (``x.add_(1)``) torch
    refuses a Partial target, and we shift every term of an average, max or min by the number (``SHIFT``:
    ``F.rms_norm`` over a sharded dim adds its eps to a pending mean so), refusing only a sum, which would
    count it once per term. A plain 0-d tensor (``mean(x * x) + eps``) torch moves to the Partial of the
    other side; we keep it whole and split it into the terms of a sum locally (``plain_as_replicate``)."""
    rows = ADDITIVE + (SHIFT if is_inplace(func) else ())
    strategy = elementwise_rule(plain_as_replicate(rows, tensor_operands(specs, args, kwargs)))(func, specs, args, kwargs)
    return split_plain(strategy, specs[0].mesh, args, kwargs)


_TABLE = [
    ("mul.Tensor mul_.Tensor", MUL),
    ("div.Tensor div_.Tensor", DIV),
    ("mul.Scalar mul_.Scalar div.Scalar div_.Scalar", LINEAR),
    ("neg.default neg_.default _neg_view.default", NEG),
    # conjugation is linear over the reals; resolving a lazy bit changes no value
    ("_conj.default _conj_physical.default conj_physical.default conj_physical_.default resolve_conj.default resolve_neg.default", KEEP),
    # non-decreasing on their whole domain (rounding too: floor(max a_i) = max floor(a_i))
    ("exp.default exp_.default relu.default relu_.default sigmoid.default sigmoid_.default tanh.default "
     "tanh_.default erf.default erf_.default sign.default sign_.default sgn.default sgn_.default floor.default "
     "floor_.default ceil.default ceil_.default round.default round_.default round.decimals round_.decimals "
     "trunc.default trunc_.default nan_to_num.default nan_to_num_.default expm1.default expm1_.default "
     "exp2.default exp2_.default atan.default atan_.default sinh.default sinh_.default asinh.default "
     "asinh_.default deg2rad.default deg2rad_.default rad2deg.default rad2deg_.default hardshrink.default "
     "special_modified_bessel_i1.default", MONOTONE),
    ("erfc.default erfc_.default special_erfcx.default", DECREASING),
    ("maximum.default clamp_min.Tensor clamp_min_.Tensor", MAXIMUM),
    ("minimum.default clamp_max.Tensor clamp_max_.Tensor", MINIMUM),
    ("abs.default abs_.default log.default log_.default sqrt.default sqrt_.default rsqrt.default rsqrt_.default "
     "pow.Tensor_Scalar pow.Tensor_Tensor pow.Scalar pow_.Scalar pow_.Tensor reciprocal.default reciprocal_.default "
     "sin.default sin_.default cos.default cos_.default gelu.default gelu_.default silu.default silu_.default "
     "clamp.default clamp_.default clamp.Tensor clamp_.Tensor clamp_min.default clamp_min_.default "
     "clamp_max.default clamp_max_.default where.self masked_fill.Tensor masked_fill.Scalar "
     "masked_fill_.Tensor lerp.Scalar lerp_.Scalar lerp.Tensor lerp_.Tensor addcmul.default addcmul_.default "
     "addcdiv.default addcdiv_.default log1p.default erfinv.default square.default atan2.default hypot.default "
     "threshold_backward.default gelu_backward.default sigmoid_backward.default tanh_backward.default "
     "silu_backward.default native_dropout_backward.default", ()),
    # elementwise, though torch does not tag them pointwise: activation backwards, rsub, complex builders
    ("elu_backward.default hardtanh_backward.default log_sigmoid_forward.default log_sigmoid_backward.default "
     "hardshrink_backward.default hardsigmoid_backward.default hardswish.default hardswish_backward.default "
     "leaky_relu_backward.default mish_backward.default softplus_backward.default softshrink_backward.default "
     "rsub.Tensor floor_divide.default floor_divide.Scalar polar.default complex.default _prelu_kernel.default "
     "fill.Scalar fill.Tensor", ()),
    ("add.out sub.out mul.out div.out maximum.out minimum.out neg.out exp.out sqrt.out abs.out sign.out "
     "clamp.out addcmul.out addcdiv.out lerp.Scalar_out where.self_out", ()),
    ("eq.Tensor eq.Scalar ne.Tensor ne.Scalar lt.Tensor lt.Scalar le.Tensor le.Scalar gt.Tensor gt.Scalar "
     "ge.Tensor ge.Scalar logical_and.default logical_or.default logical_xor.default logical_not.default "
     "isnan.default isinf.default isfinite.default bitwise_not.default bitwise_and.Tensor bitwise_or.Tensor", ()),
]

_FOREACH_TABLE = [
    ("_foreach_add.List _foreach_add_.List _foreach_sub.List _foreach_sub_.List", ADDITIVE),
    ("_foreach_mul.List _foreach_mul_.List _foreach_mul.Tensor _foreach_mul_.Tensor", MUL),
    ("_foreach_div.List _foreach_div_.List _foreach_div.Tensor _foreach_div_.Tensor", DIV),
    ("_foreach_mul.Scalar _foreach_mul_.Scalar _foreach_mul.ScalarList _foreach_mul_.ScalarList "
     "_foreach_div.Scalar _foreach_div_.Scalar _foreach_div.ScalarList _foreach_div_.ScalarList", LINEAR),
    ("_foreach_neg.default _foreach_neg_.default", NEG),
    ("_foreach_exp.default _foreach_exp_.default _foreach_clamp_min.Scalar _foreach_clamp_min_.Scalar "
     "_foreach_clamp_max.Scalar _foreach_clamp_max_.Scalar _foreach_sign.default _foreach_sign_.default", MONOTONE),
    ("_foreach_maximum.List _foreach_maximum_.List", MAXIMUM),
    ("_foreach_minimum.List _foreach_minimum_.List", MINIMUM),
    ("_foreach_copy_.default", COPY),
    ("_foreach_zero_.default", KEEP),
    ("_foreach_add.Scalar _foreach_add_.Scalar _foreach_add.ScalarList _foreach_add_.ScalarList "
     "_foreach_add.Tensor _foreach_add_.Tensor _foreach_sub.Scalar _foreach_sub_.Scalar _foreach_sub.ScalarList "
     "_foreach_sub_.ScalarList _foreach_addcmul.Scalar _foreach_addcmul_.Scalar _foreach_addcmul.ScalarList "
     "_foreach_addcmul_.ScalarList _foreach_addcmul.Tensor _foreach_addcmul_.Tensor _foreach_addcdiv.Scalar "
     "_foreach_addcdiv_.Scalar _foreach_addcdiv.ScalarList _foreach_addcdiv_.ScalarList _foreach_addcdiv.Tensor "
     "_foreach_addcdiv_.Tensor _foreach_lerp.Scalar _foreach_lerp_.Scalar _foreach_lerp.List _foreach_lerp_.List "
     "_foreach_lerp.ScalarList _foreach_lerp_.ScalarList _foreach_sqrt.default _foreach_sqrt_.default "
     "_foreach_rsqrt.default _foreach_rsqrt_.default _foreach_abs.default _foreach_abs_.default "
     "_foreach_reciprocal.default _foreach_reciprocal_.default _foreach_pow.List _foreach_pow_.List "
     "_foreach_pow.Scalar _foreach_pow_.Scalar _foreach_pow.ScalarList _foreach_pow_.ScalarList "
     "_foreach_pow.ScalarAndTensor _foreach_log.default _foreach_log_.default _foreach_cos.default "
     "_foreach_sin.default _foreach_maximum.Scalar _foreach_maximum_.Scalar "
     "_fused_adam_.default _fused_adam_.tensor_lr _fused_adamw_.default _fused_adamw_.tensor_lr "
     "_fused_sgd_.default _fused_sgd_.tensor_lr", ()),
]

GENERIC = elementwise_rule()  # any op torch tags pointwise and the table leaves out (see ops.rule_for)
RULES = {op: elementwise_rule(rows) for names, rows in _TABLE for op in _ops(names)}
RULES.update({op: foreach_rule(rows) for names, rows in _FOREACH_TABLE for op in _ops(names)})
RULES[aten._to_copy.default] = _to_copy_rule
RULES.update({op: _threshold for op in _ops("threshold.default threshold_.default")})
RULES.update({op: _masked_fill_scalar for op in _ops("masked_fill_.Scalar")})
RULES.update({op: _additive for op in _ops("add.Scalar add_.Scalar sub.Scalar sub_.Scalar add.Tensor add_.Tensor "
                                                   "sub.Tensor sub_.Tensor")})
HANDLERS: dict = {}
