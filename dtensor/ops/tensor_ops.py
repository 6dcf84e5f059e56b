"""Ops that copy, fill or make tensors like their input, and the ones that answer a Python value.

Detaches and aliases keep their input's layout (Partial too); copies (``clone``) reduce a Partial
first, as torch's. ``*_like`` and ``new_*`` factories are sharded like their input when they have its
shape, never Partial where their values would be summed (``ones_like`` of a pending sum is Replicate). ``equal`` and ``.item()`` return
plain Python values every rank agrees on; they are handlers because their result is not a DTensor.
"""

from __future__ import annotations

import torch

from .. import collectives
from ..dispatch import Strategy
from ..placements import Replicate
from ..redistribute import redistribute_local
from ..spec import DTensorSpec, contiguous_strides
from .common import elementwise, replicate_partials, tensor_operands
from .pointwise import COPY, GENERIC, KEEP, PA, PMAX, PMIN, elementwise_rule

aten = torch.ops.aten


def _same_as_first(func, specs, args, kwargs):
    """Output laid out like the only DTensor input; Partial survives (these ops are copies)."""
    if len(specs) != 1:
        return None
    return Strategy((specs[0].placements,), specs[0].placements)


def _like(func, specs, args, kwargs):
    """A fresh tensor shaped like the input: sharded like it, never Partial (its values are not terms)."""
    placements = replicate_partials(specs[0].placements)
    return Strategy((specs[0].placements,), placements)


def _fill(func, specs, args, kwargs):
    """``fill_(value)``: every term becomes the value, right for avg/max/min and for sum only when 0."""
    spec, value = specs[0], args[1]
    if isinstance(value, torch.Tensor):  # fill_.Tensor: a 0-d value, broadcast like any elementwise op
        rows = ()
    else:
        rows = KEEP if value == 0 else tuple((p, p) for p in (PA, PMAX, PMIN))
    choice = elementwise(tuple(tensor_operands(specs, args, kwargs)), tuple(rows), (0,))
    if choice is None:
        raise RuntimeError(
            f"{func}: cannot fill a DTensor with placements {list(spec.placements)} in place with {value!r} "
            "(each rank's term would be the value, so their sum would not be); redistribute it to Replicate first"
        )
    return Strategy(choice.dtensor_inputs(), choice.output)


def _new_factory(func, specs, args, kwargs):
    """``x.new_zeros(size)``: like ``x`` when ``size`` is its shape and it is sharded, else Replicate.

    An uninitialized ``new_empty`` follows a Partial input too (its values are about to be overwritten).
    """
    spec = specs[0]
    size = tuple(args[1])
    follows = any(p.is_shard() for p in spec.placements) or func in _UNINITIALIZED
    if size != tuple(spec.shape) or not follows:
        return Strategy((spec.placements,), tuple(Replicate() for _ in spec.placements))
    placements = spec.placements if func in _UNINITIALIZED else replicate_partials(spec.placements)
    return Strategy((spec.placements,), placements, local_args=_local_size)


def _local_size(args, kwargs):
    """The global size argument (and stride of ``new_empty_strided``) turned into the local shard's."""
    local = args[0]
    out = (local, list(local.shape)) + tuple(args[2:])
    if len(out) > 2 and isinstance(out[2], (list, tuple)):  # new_empty_strided's stride
        out = out[:2] + (list(contiguous_strides(local.shape)),) + out[3:]
    return out, kwargs


_UNINITIALIZED = (aten.new_empty.default, aten.new_empty_strided.default)


def _equal(cls, func, args, kwargs):
    """``torch.equal``: same shape, then every rank compares its shards of one common layout."""
    a, b = (_scalar_as_replicate(cls, x, args) for x in args)
    if not isinstance(a, cls) or not isinstance(b, cls):
        other = type(b if isinstance(a, cls) else a).__name__
        raise TypeError(f"torch.equal got a DTensor and a {other}; make both DTensors (distribute_tensor)")
    if a.shape != b.shape:
        return False
    sa, sb = a._spec, b._spec
    target = replicate_partials(sa.placements if _shards(sa) >= _shards(sb) else sb.placements)
    la = redistribute_local(a._local_tensor, sa.mesh, sa.shape, sa.placements, target)
    lb = redistribute_local(b._local_tensor, sb.mesh, sb.shape, sb.placements, target)
    same = torch.tensor(int(torch.equal(collectives.wait(la), collectives.wait(lb))), device=la.device)
    for mesh_dim in range(sa.mesh.ndim):
        same = collectives.all_reduce(same, "min", sa.mesh, mesh_dim)
    return bool(collectives.wait(same).item())


def _scalar_as_replicate(cls, x, args):
    """A plain 0-d tensor beside a DTensor is a scalar, the same on every rank (as in torch)."""
    if isinstance(x, cls) or not isinstance(x, torch.Tensor) or x.dim() != 0:
        return x
    mesh = next(y for y in args if isinstance(y, cls))._spec.mesh
    return cls(x.detach(), DTensorSpec.create(mesh, (Replicate(),) * mesh.ndim, x.shape, x.dtype))


def _shards(spec) -> int:
    n = 1
    for mesh_dim, p in enumerate(spec.placements):
        if p.is_shard():
            n *= spec.mesh.size(mesh_dim)
    return n


def _item(cls, func, args, kwargs):
    """``.item()``: the value of a one-element DTensor, the same on every rank (reduced/gathered first)."""
    (x,) = args
    spec = x._spec
    replicate = tuple(Replicate() for _ in spec.placements)
    local = redistribute_local(x._local_tensor, spec.mesh, spec.shape, spec.placements, replicate)
    return func(collectives.wait(local))


RULES = {
    aten.detach.default: _same_as_first,
    aten.alias.default: _same_as_first,
    # torch tags clone pointwise and gives it no Partial rule: a pending reduction is carried out first
    # (reduce-scattered where the input is sharded on another mesh dim), so x.clone().abs_() runs
    aten.clone.default: GENERIC,
    aten.contiguous.default: GENERIC,
    aten.empty_like.default: _same_as_first,
    aten.zeros_like.default: _like,
    aten.ones_like.default: _like,
    aten.full_like.default: _like,
    aten.copy_.default: elementwise_rule(COPY),
    aten.zero_.default: elementwise_rule(KEEP),
    aten.fill_.Scalar: _fill,
    aten.fill_.Tensor: _fill,
    aten.new_zeros.default: _new_factory,
    aten.new_ones.default: _new_factory,
    aten.new_empty.default: _new_factory,
    aten.new_full.default: _new_factory,
    aten.new_empty_strided.default: _new_factory,
}

HANDLERS = {
    aten.equal.default: _equal,
    aten._local_scalar_dense.default: _item,
}
