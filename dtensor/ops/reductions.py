"""Reductions: sum, mean, amax/amin, max/min, prod, any/all, argmax/argmin, var/std, vector norms.

Over a dim that no mesh dim shards, a reduction runs on the shards as they are; the output keeps their
sharding, with shard dims renumbered when ``keepdim=False`` drops the reduced dims. Over a sharded dim:

* ``sum``/``amax``/``amin``/``max``/``min`` reduce their local piece and leave the combination pending:
  the output is ``Partial("sum" | "max" | "min")`` on that mesh dim. A rank whose piece of a reduced dim
  is empty (uneven shards) reduces the op's identity instead, so max/min do not fail on it.
* ``mean`` reduces its local piece and leaves ``Partial("avg")`` pending, as torch's, where the pieces
  are even; a mean of uneven pieces is not the mean of their means, so their reduced dims are gathered.
* p-norms (``linalg_vector_norm``, ``norm``, ``_foreach_norm``) are handlers: each rank reduces its piece
  to sum(|x|^p) (max/min |x| for inf/-inf), one all-reduce per mesh dim that shards a reduced dim combines
  them (``_foreach_norm`` stacks every tensor's scalar into one all-reduce), and the p-th root is taken
  locally: the output is replicated where torch leaves a ``_NormPartial``; no gradient is all-gathered.
* ``var``/``std`` (and ``var_mean``/``std_mean``) are handlers: each rank takes its piece's sum and sum of
  squared deviations from its own mean; one all-reduce of the sums gives the global mean, a second adds
  the pieces' deviations shifted to it (Chan et al.'s parallel variance, exact and stable). Two
  all-reduces of output-sized tensors instead of gathering the input; the output is replicated over the
  reduced dims.
* the others (``prod``, ``any``/``all``, ``argmax``/``argmin``, ``max.dim``/``min.dim`` whose indices are
  local, ``median``, ``kthvalue``, ``logsumexp``) replicate the reduced dims first, as torch does; ``aminmax``
  is ``amin`` and ``amax``, ``trace`` the sum of ``diagonal``.

A pending reduction in the input survives only a reduction of the same kind (a sum of ``Partial("sum")``,
an amax of ``Partial("max")``, a mean of ``Partial("avg")``); any other is resolved first, and then, as
torch's, the reduced dims are gathered too (the reduction is not combinable).
"""

from __future__ import annotations

import math

import torch

from .. import collectives
from ..dispatch import Strategy, replicate_plain
from ..placements import Partial, Placement, Replicate, Shard
from ..redistribute import local_as, redistribute_local
from ..spec import DTensorSpec, contiguous_strides
from .common import bind_args

aten = torch.ops.aten

_R = Replicate()


def _reduced_dims(dim, ndim: int) -> tuple[int, ...]:
    """The dims a reduction folds: None or [] mean all of them (aten's convention)."""
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return tuple(range(ndim))
    dims = [dim] if isinstance(dim, int) else list(dim)
    return tuple(sorted({d % max(ndim, 1) for d in dims})) if ndim else ()


def _dims_and_keepdim(func, args, kwargs, ndim: int) -> tuple[tuple[int, ...], bool]:
    named = bind_args(func, args, kwargs)
    return _reduced_dims(named.get("dim"), ndim), bool(named.get("keepdim", False))


def _renumber(dim: int, reduced: tuple[int, ...], keepdim: bool) -> int:
    return dim if keepdim else dim - sum(r < dim for r in reduced)


def _layout(placements, reduced: tuple[int, ...], keepdim: bool, kind: str | None):
    """(input placements wanted, output placements) of a reduction whose pieces combine as ``kind``
    (None: not combinable, the reduced dims are gathered and pending reductions carried out)."""
    wanted, out = [], []
    for p in placements:
        if isinstance(p, Shard) and p.dim not in reduced:
            wanted.append(p)
            out.append(Shard(_renumber(p.dim, reduced, keepdim)))
        elif kind is not None and (isinstance(p, Shard) or p.is_partial(kind)):
            wanted.append(p)
            out.append(Partial(kind))
        else:
            wanted.append(_R)
            out.append(_R)
    return tuple(wanted), tuple(out)


def _combinable(spec: DTensorSpec, reduced: tuple[int, ...], kind: str | None, of_partial: bool) -> str | None:
    """``kind`` where the pieces may combine as it, as torch's ``reduction_linear``: every pending
    reduction is of the same kind (and passes, ``of_partial``), and an average's pieces are even (a mean
    of uneven pieces is not the mean of their means); else None."""
    if kind is None or any(p.is_partial() and not (of_partial and p.is_partial(kind)) for p in spec.placements):
        return None
    if kind == "avg":
        for d in reduced:
            pieces = math.prod(n for n, p in zip(spec.mesh.shape, spec.placements) if p.is_shard(d))
            if spec.shape[d] % pieces:
                return None
    return kind


def _identity(kind: str, dtype: torch.dtype):
    if kind == "sum":
        return 0
    if dtype.is_floating_point:
        return -math.inf if kind == "max" else math.inf
    info = torch.iinfo(dtype)
    return info.min if kind == "max" else info.max


def _fill_empty_pieces(global_shape: torch.Size, reduced: tuple[int, ...], kind: str):
    """local_args: a piece that is empty along a reduced dim (while the whole is not) becomes the identity."""

    def local_args(args, kwargs):
        x = args[0]
        if all(x.shape[d] > 0 or global_shape[d] == 0 for d in reduced):
            return args, kwargs
        shape = [1 if d in reduced else s for d, s in enumerate(x.shape)]
        return (torch.full(shape, _identity(kind, x.dtype), dtype=x.dtype, device=x.device), *args[1:]), kwargs

    return local_args


def _reduction_rule(kind: str | None, outputs: int = 1, of_partial: bool = True):
    """The rule of a reduction whose pieces combine as ``kind`` ("sum"/"avg"/"max"/"min"), or must not
    combine (None). ``of_partial=False``: a pending sum does not pass through (``count_nonzero`` of a sum is not
    the sum of the counts)."""

    def rule(func, specs, args, kwargs):
        if len(specs) != 1:
            return None
        spec = specs[0]
        reduced, keepdim = _dims_and_keepdim(func, args, kwargs, len(spec.shape))
        wanted, out = _layout(spec.placements, reduced, keepdim, _combinable(spec, reduced, kind, of_partial))
        local_args = None
        if kind in ("max", "min") and any(isinstance(p, Shard) and p.dim in reduced for p in wanted):
            local_args = _fill_empty_pieces(spec.shape, reduced, kind)
        return Strategy((wanted,), out if outputs == 1 else [out] * outputs, local_args)

    return rule


# ---- variance: per-piece moments combined across ranks ------------------------------------------------------


def _variance(cls, func, args, kwargs):
    """var / std / var_mean / std_mean over any dims, sharded ones included (module docstring)."""
    x = args[0]
    spec = x._spec
    func(torch.empty(spec.shape, dtype=spec.dtype, device="meta"), *args[1:], **kwargs)  # torch's own argument checks
    named = bind_args(func, args, kwargs)
    reduced, keepdim = _dims_and_keepdim(func, args, kwargs, len(spec.shape))
    correction = named.get("correction")
    correction = 1 if correction is None else correction
    placements = tuple(_R if p.is_partial() else p for p in spec.placements)
    local = local_as(x, placements)
    split = [m for m, p in enumerate(placements) if isinstance(p, Shard) and p.dim in reduced]
    count = math.prod(local.shape[d] for d in reduced)
    total = math.prod(spec.shape[d] for d in reduced)
    piece_sum = local.sum(reduced, keepdim=True)
    piece_mean = piece_sum / max(count, 1)
    deviations = _squared(local - piece_mean).sum(reduced, keepdim=True)
    mean = collectives.all_reduce_dims(piece_sum, "sum", spec.mesh, split) / total
    if split:  # each piece's squared deviations, moved from its own mean to the global one
        deviations = collectives.all_reduce_dims(deviations + count * _squared(piece_mean - mean), "sum", spec.mesh, split)
    var = deviations / max(total - correction, 0)
    first = var.sqrt() if func in _STD else var
    resolved = tuple(_R if isinstance(p, Shard) and p.dim in reduced else p for p in placements)
    out = [_reduced_output(cls, spec, v, reduced, keepdim, resolved) for v in (first, mean)]
    return tuple(out) if func in _WITH_MEAN else out[0]


def _squared(t: torch.Tensor) -> torch.Tensor:
    """|t|^2, real for complex ``t`` (a complex variance is real). Not ``t.conj() * t``: below
    ``__torch_dispatch__`` the lazy conjugate bit is not applied."""
    return torch.view_as_real(t).square().sum(-1) if t.is_complex() else t * t


_STD = {aten.std.correction, aten.std_mean.correction}
_WITH_MEAN = {aten.var_mean.correction, aten.std_mean.correction}


def _trace(cls, func, args, kwargs):
    """``trace`` is the sum of the diagonal: both are DTensor ops with their own rules."""
    return aten.sum.default(aten.diagonal.default(args[0]))


def _aminmax(cls, func, args, kwargs):
    """``aminmax`` is ``amin`` and ``amax``: each pends as its own Partial over sharded dims."""
    named = bind_args(func, args, kwargs)
    dim = [] if named.get("dim") is None else [named["dim"]]
    keepdim = bool(named.get("keepdim", False))
    return aten.amin.default(args[0], dim, keepdim), aten.amax.default(args[0], dim, keepdim)


# ---- vector norms: local power sums, one all-reduce, a root ------------------------------------------------


def _norm_kind(order: float) -> str:
    return "max" if order == math.inf else "min" if order == -math.inf else "sum"


def _local_stat(local: torch.Tensor, order: float, reduced, dtype, spec: DTensorSpec) -> torch.Tensor:
    """This rank's term of the norm, reduced dims kept (size 1): sum |x|^p, or max/min |x| for +-inf."""
    if any(local.shape[d] == 0 and spec.shape[d] > 0 for d in reduced):  # an empty piece: the identity
        shape = [1 if d in reduced else s for d, s in enumerate(local.shape)]
        like = torch.linalg.vector_norm(local.new_zeros(shape), order, list(reduced), True, dtype=dtype)
        return like.fill_(math.inf if order == -math.inf else 0)
    norm = torch.linalg.vector_norm(local, order, list(reduced), True, dtype=dtype)
    return norm if order in (0, math.inf, -math.inf) else norm**order


def _stat_layout(placements, reduced, order) -> tuple[tuple[Placement, ...], tuple[Placement, ...]]:
    """(pending, resolved) placements of the local stats: Partial where a mesh dim shards a reduced dim."""
    kind = _norm_kind(order)
    pending = tuple(Partial(kind) if isinstance(p, Shard) and p.dim in reduced else p for p in placements)
    return pending, tuple(_R if p.is_partial() else p for p in pending)


def _norms(cls, xs, order, dim, keepdim: bool, dtype) -> list:
    """Vector norms of DTensors ``xs`` over ``dim``; one all-reduce per group of identically laid out stats."""
    order = float(order)
    stats, groups = [], {}
    for i, x in enumerate(xs):
        spec = x._spec
        reduced = _reduced_dims(dim, len(spec.shape))
        placements = tuple(_R if p.is_partial() else p for p in spec.placements)
        local = local_as(x, placements)
        stat = _local_stat(local, order, reduced, dtype, spec)
        pending, resolved = _stat_layout(placements, reduced, order)
        stat_shape = tuple(1 if d in reduced else s for d, s in enumerate(spec.shape))
        stats.append((stat, reduced, resolved))
        if pending != resolved:
            whole = not any(isinstance(p, Shard) for p in pending)  # whole stats of any shape share one collective
            key = (spec.mesh, pending, resolved, stat.dtype, None if whole else stat_shape)
            groups.setdefault(key, []).append(i)
    for (mesh, pending, resolved, _, stat_shape), members in groups.items():
        _combine(stats, members, mesh, pending, resolved, stat_shape)
    return [_finish(cls, x._spec, stat, order, dims, keepdim, resolved) for x, (stat, dims, resolved) in zip(xs, stats)]


def _combine(stats: list, members: list[int], mesh, pending, resolved, stat_shape) -> None:
    """All-reduce the pending stats of ``members``; unsharded ones (whole on every rank) flattened into one."""
    if not any(isinstance(p, Shard) for p in pending):
        flat = torch.cat([stats[i][0].reshape(-1) for i in members])
        done = collectives.wait(redistribute_local(flat, mesh, flat.shape, pending, resolved))
        for i, value in zip(members, done.split([stats[i][0].numel() for i in members])):
            stats[i] = (value.reshape(stats[i][0].shape), *stats[i][1:])
        return
    for i in members:
        done = redistribute_local(stats[i][0], mesh, stat_shape, pending, resolved)
        stats[i] = (collectives.wait(done), *stats[i][1:])


def _finish(cls, spec: DTensorSpec, stat: torch.Tensor, order, reduced, keepdim: bool, resolved):
    """Root, squeeze and wrap one norm."""
    value = stat if order in (0, math.inf, -math.inf) else stat ** (1 / order)
    return _reduced_output(cls, spec, value, reduced, keepdim, resolved)


def _reduced_output(cls, spec: DTensorSpec, value: torch.Tensor, reduced, keepdim: bool, resolved):
    """A local result with the reduced dims kept (size 1) as the reduction's output DTensor."""
    if not keepdim and reduced:
        value = value.squeeze(reduced) if value.dim() else value
    out_shape = [1 if d in reduced else s for d, s in enumerate(spec.shape)]
    if not keepdim:
        out_shape = [s for d, s in enumerate(spec.shape) if d not in reduced]
    placements = tuple(Shard(_renumber(p.dim, reduced, keepdim)) if isinstance(p, Shard) else p for p in resolved)
    out_spec = DTensorSpec(spec.mesh, placements, torch.Size(out_shape), contiguous_strides(out_shape), value.dtype)
    return cls(value.contiguous(), out_spec, requires_grad=False)


def _vector_norm(cls, func, args, kwargs):
    named = bind_args(func, args, kwargs)
    order = named.get("ord", named.get("p"))
    order = 2 if order is None else order
    return _norms(cls, [args[0]], order, named.get("dim"), bool(named.get("keepdim", False)), named.get("dtype"))[0]


def _foreach_norm(cls, func, args, kwargs):
    """Plain tensors in the list are refused, or replicated, as in every op (``clip_grad_norm_`` of a
    model whose gradients are partly plain tensors); they have no layout to take a norm over."""
    named = bind_args(func, args, kwargs)
    xs = list(named["self"])
    mesh = next(x._spec.mesh for x in xs if isinstance(x, cls))
    replicate = (Replicate(),) * mesh.ndim
    xs = [  # 0-d tensors (scalar parameters) are left plain by replicate_plain: they are whole on every rank
        x if isinstance(x, cls) else cls(x.detach(), DTensorSpec(mesh, replicate, x.shape, tuple(x.stride()), x.dtype))
        for x in replicate_plain(func, xs, mesh, cls)
    ]
    return _norms(cls, xs, named.get("ord", 2), None, False, named.get("dtype"))


RULES = {
    aten.sum.default: _reduction_rule("sum"),
    aten.sum.dim_IntList: _reduction_rule("sum"),
    aten.mean.default: _reduction_rule("avg"),
    aten.mean.dim: _reduction_rule("avg"),
    aten.amax.default: _reduction_rule("max"),
    aten.amin.default: _reduction_rule("min"),
    aten.max.default: _reduction_rule("max"),
    aten.min.default: _reduction_rule("min"),
    aten.prod.default: _reduction_rule(None),
    aten.prod.dim_int: _reduction_rule(None),
    aten.any.default: _reduction_rule(None),
    aten.any.dim: _reduction_rule(None),
    aten.any.dims: _reduction_rule(None),
    aten.all.default: _reduction_rule(None),
    aten.all.dim: _reduction_rule(None),
    aten.all.dims: _reduction_rule(None),
    aten.argmax.default: _reduction_rule(None),
    aten.argmin.default: _reduction_rule(None),
    aten.max.dim: _reduction_rule(None, outputs=2),
    aten.min.dim: _reduction_rule(None, outputs=2),
    aten.nansum.default: _reduction_rule("sum", of_partial=False),
    aten.count_nonzero.default: _reduction_rule("sum", of_partial=False),
    aten.count_nonzero.dim_IntList: _reduction_rule("sum", of_partial=False),
    aten.logsumexp.default: _reduction_rule(None),
    aten.median.default: _reduction_rule(None),
    aten.median.dim: _reduction_rule(None, outputs=2),
    aten.nanmedian.default: _reduction_rule(None),
    aten.nanmedian.dim: _reduction_rule(None, outputs=2),
    aten.kthvalue.default: _reduction_rule(None, outputs=2),
    aten.mode.default: _reduction_rule(None, outputs=2),
}

def _dist(cls, func, args, kwargs):
    """``dist(a, b, p)``: the p-norm of the difference, as DTensor ops (the norm handler's layout)."""
    named = bind_args(func, args, kwargs)
    return aten.linalg_vector_norm.default(aten.sub.Tensor(named["self"], named["other"]), named["p"])


HANDLERS = {
    aten.dist.default: _dist,
    aten.trace.default: _trace,
    aten.aminmax.default: _aminmax,
    aten.var.correction: _variance,
    aten.std.correction: _variance,
    aten.var_mean.correction: _variance,
    aten.std_mean.correction: _variance,
    aten.linalg_vector_norm.default: _vector_norm,
    aten.norm.Scalar: _vector_norm,
    aten.norm.ScalarOpt_dim: _vector_norm,
    aten._foreach_norm.Scalar: _foreach_norm,
}
