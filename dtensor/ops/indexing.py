"""Gather/scatter-style ops: ``gather``, ``scatter`` (+ ``scatter_add``, ``scatter_reduce``, in place too),
``index_select``, ``index_add`` (+ ``index_copy``, ``index_reduce``), ``index_fill`` (its own rule below), ``slice_scatter``,
advanced indexing ``x[idx]`` and ``x[idx] = v`` (``index_put``) with one integer index (the ops MoE
routing and embedding-like code, and their backward, run on), and the lookups
``bucketize``/``searchsorted``/``isin`` (values keep their shards, the table is whole).

These ops pick positions along one dim (``dim``) and keep every other dim position for position, so a
mesh dim may split any other dim as long as every tensor operand is split the same way there (same size
along that dim): ``self``, the index (for gather/scatter, whose index has all of self's dims) and the
source. The dim the op indexes along is replicated first, as are 1-d indices of ``index_select`` /
``index_add``. Per mesh dim, the layout comes from ``self``, else (out of place) from the index or source
(a free local chunk of the others); pending reductions are resolved first. In place, the target's own
layout must do. ``gather`` may also keep its index split along ``dim`` itself, with ``self`` whole: each
rank gathers its own output positions.
"""

from __future__ import annotations

import torch

from ..dispatch import Strategy
from ..placements import Partial, Placement, Replicate, Shard
from .common import bind_args, elementwise, is_inplace, plain_as_replicate, split_plain, tensor_operands

aten = torch.ops.aten

__all__ = ["RULES", "HANDLERS"]


def _choose(specs, aligned: list[int], dim: int, candidates: list[int], gather: bool):
    """(placements of each aligned operand, output placements): per mesh dim, a Shard(d), d != dim, of the
    first candidate operand, valid for every aligned one; for gather, else the index's Shard(dim), self
    whole (each rank gathers its own positions); else (out of place) the first other dim every rank can
    hold a piece of, as torch picks; else Replicate."""
    shapes = [tuple(specs[i].shape) for i in aligned]
    per_operand: list[list[Placement]] = [[] for _ in aligned]
    out: list[Placement] = []
    for m in range(specs[0].mesh.ndim):
        picks = [p for i in candidates for p in [specs[i].placements[m]]
                 if isinstance(p, Shard) and p.dim != dim and len({s[p.dim] for s in shapes}) == 1]
        free = [Shard(d) for d in range(len(shapes[0])) if d != dim and len({s[d] for s in shapes}) == 1
                and shapes[0][d] >= specs[0].mesh.size(m)]
        if picks:
            chosen = [picks[0]] * len(aligned)
        elif gather and specs[aligned[1]].placements[m] == Shard(dim):
            chosen = [Replicate(), Shard(dim)]
        elif free and len(candidates) > 1:  # nobody split validly here: a free chunk of another dim, as torch
            chosen = [free[0]] * len(aligned)
        else:
            chosen = [Replicate()] * len(aligned)
        for k, p in enumerate(chosen):
            per_operand[k].append(p)
        out.append(chosen[-1] if gather else chosen[0])
    return [tuple(p) for p in per_operand], tuple(out)


def _rule(aligned_args: tuple[str, ...], replicated_args: tuple[str, ...] = (), gather: bool = False):
    """``aligned_args`` (self first) share the chosen layout; ``replicated_args`` (1-d indices) are whole."""

    def rule(func, specs, args, kwargs):
        named = bind_args(func, args, kwargs)
        order = [a.name for a in func._schema.arguments if isinstance(named.get(a.name), torch.Tensor)]
        if len(order) != len(specs) or any(n not in order for n in aligned_args):
            return None  # a plain (0-d) tensor among them: replicate
        ndim = len(specs[0].shape)
        dim = named["dim"] % ndim if ndim else 0
        aligned = [order.index(n) for n in aligned_args]
        if any(len(specs[i].shape) != ndim for i in aligned):
            return None
        inplace = is_inplace(func)
        layouts, out = _choose(specs, aligned, dim, aligned[:1] if inplace else aligned, gather)
        if inplace and out != specs[0].placements:
            return None  # the target's own layout cannot run it: the fallback explains
        replicate = (Replicate(),) * len(out)
        by_name = dict(zip(aligned_args, layouts))
        return Strategy(tuple(replicate if n in replicated_args else by_name[n] for n in order), out)

    return rule


def _index(func, specs, args, kwargs):
    """``x[..., idx, ...]`` with one integer DTensor index at dim k: x's shards of other dims stay (dims
    after k shift by idx.ndim - 1), else the index's shards become the output's (x whole there); pending
    reductions pass (indexing only moves data). Boolean or several indices: the fallback."""
    indices = args[1]
    given = [k for k, t in enumerate(indices) if t is not None]
    if len(given) != 1 or len(specs) != 2 or specs[1].dtype in (torch.bool, torch.uint8):
        return None
    k, x, idx = given[0], specs[0], specs[1]
    shift = len(idx.shape) - 1
    x_p, idx_p, out = [], [], []
    for p, q in zip(x.placements, idx.placements):
        if isinstance(p, Shard) and p.dim != k:
            x_p.append(p), idx_p.append(Replicate()), out.append(Shard(p.dim + shift if p.dim > k else p.dim))
        elif isinstance(q, Shard):
            x_p.append(Replicate()), idx_p.append(q), out.append(Shard(k + q.dim))
        elif p.is_partial():
            x_p.append(p), idx_p.append(Replicate()), out.append(p)
        else:
            x_p.append(Replicate()), idx_p.append(Replicate()), out.append(Replicate())
    return Strategy((tuple(x_p), tuple(idx_p)), tuple(out))


def _index_put(func, specs, args, kwargs):
    """``x[..., idx, ...] = v`` and ``+=`` (``index_put``; also the backward of ``x[idx]``, which puts the
    gradient into whole zeros) with one integer index at dim k, per mesh dim in this order of preference
    (which gave torch's placements, or more sharded ones, in every case tested): a split of x along a
    dim other than k splits v's matching dim alike; else (out of place) v's split cuts x to match (no
    data moves where x is whole: the backward's zeros); else x's pending reduction makes v a term of it
    (a put selects element by element, so any reduction passes it; an accumulation adds, so a sum or
    average does); else (out of place) the first other dim every rank can hold a piece of, else v's
    pending reduction as x's; else both whole. Integer tensors keep no pending sum or average: a
    replicated value made a term of one is divided (torch's convention), which changes its dtype. The index is always whole; in place, x's own layout decides.
    v of another shape (broadcast), boolean or several indices, and in place where x's layout cannot
    run it: the fallback."""
    named = bind_args(func, args, kwargs)
    given = [k for k, t in enumerate(named["indices"]) if t is not None]
    if len(given) != 1 or len(specs) != 3 or specs[1].dtype in (torch.bool, torch.uint8):
        return None
    k, (x, idx, v) = given[0], specs
    shift, inplace = len(idx.shape) - 1, is_inplace(func)
    if tuple(v.shape) != (*x.shape[:k], *idx.shape, *x.shape[k + 1:]):
        return None
    v_dim = {d: d if d < k else d + shift for d in range(len(x.shape)) if d != k}  # x's dim -> v's
    x_dim = {e: d for d, e in v_dim.items()}
    summed = ("sum", "avg") if x.dtype.is_floating_point or x.dtype.is_complex else ()
    linear = summed if named.get("accumulate", False) else summed + ("max", "min")
    x_p, v_p = [], []
    for m, (p, q) in enumerate(zip(x.placements, v.placements)):
        free = [d for d in v_dim if x.shape[d] >= x.mesh.size(m)]
        if isinstance(p, Shard) and p.dim != k:
            q = Shard(v_dim[p.dim])
        elif isinstance(q, Shard) and q.dim in x_dim and not inplace:
            p = Shard(x_dim[q.dim])
        elif p.is_partial() and p.reduce_op in linear:
            q = p
        elif free and not inplace:
            p, q = Shard(free[0]), Shard(v_dim[free[0]])
        elif q.is_partial() and q.reduce_op in linear and not inplace:
            p = q
        else:
            p, q = Replicate(), Replicate()
        x_p.append(p), v_p.append(q)
    if inplace and tuple(x_p) != tuple(x.placements):
        return None  # the target's own layout cannot run it: the fallback explains
    return Strategy((tuple(x_p), (Replicate(),) * len(x_p), tuple(v_p)), tuple(x_p))


# index_fill's Partial rows (output, self[, value]): every rank writes a number, which an average, max
# or min of equal terms keeps; a 0-d tensor value is a term of any reduction, so all four stay
_FILL_NUMBER = tuple((Partial(k),) * 2 for k in ("avg", "max", "min"))
_FILL_TENSOR = tuple((Partial(k),) * 3 for k in ("sum", "avg", "max", "min"))


def _index_fill(func, specs, args, kwargs):
    """``index_fill`` is elementwise over every dim but ``dim`` (kept whole), chosen by cost as torch's
    single-dim rule: a pending reduction stays where a row of ``_FILL_*`` allows it (a sum filled with a
    number is reduce-scattered onto another dim where one is sharded, else all-reduced); the index is
    replicated, a plain 0-d value split into a sum's terms as torch's (``plain_as_replicate``)."""
    named = bind_args(func, args, kwargs)
    ndim = len(specs[0].shape)
    self, index, *value = tensor_operands(specs, args, kwargs)
    operands = (self, *value)
    rows = plain_as_replicate(_FILL_TENSOR if value else _FILL_NUMBER, operands)
    choice = elementwise(operands, rows, (0,) if is_inplace(func) else (), (named["dim"] % ndim,) if ndim else ())
    if choice is None:
        return None  # in place, the target's own layout cannot run it: the fallback explains
    inputs = (choice.inputs[0], (Replicate(),) * len(choice.output) if index.spec is not None else None, *choice.inputs[1:])
    strategy = Strategy(tuple(p for p in inputs if p is not None), choice.output)
    return split_plain(strategy, specs[0].mesh, args, kwargs)


def _lookup(values: str):
    """``bucketize``, ``searchsorted`` (1-d sequence), ``isin``: each element of ``values`` is looked up
    in a whole table (boundaries, a sorted sequence, test elements), so ``values`` keeps its shards and
    the table (and a ``sorter``) is replicated; pending reductions are resolved first."""

    def rule(func, specs, args, kwargs):
        named = bind_args(func, args, kwargs)
        order = [a.name for a in func._schema.arguments if isinstance(named.get(a.name), torch.Tensor)]
        if len(order) != len(specs) or values not in order:
            return None
        table = [s for n, s in zip(order, specs) if n != values]
        if func is aten.searchsorted.Tensor and len(table[0].shape) != 1:
            return None  # a batch of sequences, one per row of values: the fallback
        kept = tuple(Replicate() if p.is_partial() else p for p in specs[order.index(values)].placements)
        replicate = (Replicate(),) * len(kept)
        return Strategy(tuple(kept if n == values else replicate for n in order), kept)

    return rule


_GATHER = _rule(("self", "index"), gather=True)
_SCATTER = _rule(("self", "index", "src"))
_SCATTER_VALUE = _rule(("self", "index"))
_INDEX_SELECT = _rule(("self",), ("index",))
_INDEX_ADD = _rule(("self", "source"), ("index",))

RULES = {
    aten.gather.default: _GATHER,
    aten.scatter.src: _SCATTER,
    aten.scatter_.src: _SCATTER,
    aten.scatter.value: _SCATTER_VALUE,
    aten.scatter_.value: _SCATTER_VALUE,
    aten.scatter_add.default: _SCATTER,
    aten.scatter_add_.default: _SCATTER,
    aten.index_select.default: _INDEX_SELECT,
    aten.index_add.default: _INDEX_ADD,
    aten.index_add_.default: _INDEX_ADD,
    aten.index_copy.default: _INDEX_ADD,
    aten.index_reduce.default: _INDEX_ADD,
    aten.scatter_reduce.two: _SCATTER,
    aten.slice_scatter.default: _rule(("self", "src")),
    aten.index.Tensor: _index,
    aten.index_put.default: _index_put,
    aten.index_put_.default: _index_put,
    aten._index_put_impl_.default: _index_put,
    aten._unsafe_index_put.default: _index_put,
    aten.bucketize.Tensor: _lookup("self"),
    aten.searchsorted.Tensor: _lookup("self"),
    aten.isin.Tensor_Tensor: _lookup("elements"),
    aten.index_fill.int_Tensor: _index_fill,
    aten.index_fill.int_Scalar: _index_fill,
    aten.index_fill_.int_Tensor: _index_fill,
    aten.index_fill_.int_Scalar: _index_fill,
}
HANDLERS: dict = {}
