"""Matrix products (``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``addbmm``, ``dot``, ``vdot``, ``mv``, ``addmv``,
``addr``): einsum-style rules chosen by cost.

Each op is an einsum equation (``mk,kn->mn`` for ``mm``). On one mesh dim, a product can run on shards in
a few ways (``_options``), written (output, lhs, rhs):

* everything replicated;
* a batch dim (in both operands and the output) sharded alike everywhere;
* the contraction dim sharded on both operands: every rank multiplies its slices, the output is a
  pending sum, ``Partial("sum")``;
* a free dim of one operand sharded, the other operand replicated: the output is sharded on that dim;
* one operand ``Partial`` (sum or avg) and the other replicated: a product is linear in each operand,
  so the output is the same kind of ``Partial``.

A strategy picks one option per mesh dim, never one that cuts a dim into empty shards; the rule takes
the one whose input redistribution costs least under torch's cost model (``common.redistribute_cost``: a
latency per collective plus bytes over bandwidth), then the one creating no new pending reduction, then
the earlier option. ``addmm``/``baddbmm``/``addbmm``/``addmv``/``addr`` add a bias laid out like the output (a bias added to a ``Partial`` output is
split into shares that sum to it, so it is added once in total).
"""

from __future__ import annotations

import itertools
import math

import torch

from ..dispatch import Strategy
from ..placements import Partial, Placement, Replicate, Shard
from ..spec import DTensorSpec
from .common import is_shardable, redistribute_cost

aten = torch.ops.aten

_R = Replicate()
Option = tuple[Placement, Placement, Placement]  # (output, lhs, rhs) on one mesh dim


def _options(equation: str) -> list[Option]:
    """Every way one mesh dim can run ``equation`` on shards, in tie-break order."""
    inputs, out = equation.split("->")
    lhs, rhs = inputs.split(",")
    options: list[Option] = [(_R, _R, _R)]
    for c in out:
        if c in lhs and c in rhs:
            options.append((Shard(out.index(c)), Shard(lhs.index(c)), Shard(rhs.index(c))))
    for c in lhs:
        if c in rhs and c not in out:
            options.append((Partial("sum"), Shard(lhs.index(c)), Shard(rhs.index(c))))
    for c in lhs:
        if c in out and c not in rhs:
            options.append((Shard(out.index(c)), Shard(lhs.index(c)), _R))
    for c in rhs:
        if c in out and c not in lhs:
            options.append((Shard(out.index(c)), _R, Shard(rhs.index(c))))
    for op in ("sum", "avg"):
        options += [(Partial(op), Partial(op), _R), (Partial(op), _R, Partial(op))]
    return options


def _bias_placement(out: Placement, out_ndim: int, bias_shape: torch.Size) -> Placement:
    """The bias laid out like the output, through broadcasting (a broadcast dim is replicated)."""
    if not isinstance(out, Shard):
        return out
    dim = out.dim - (out_ndim - len(bias_shape))
    return Shard(dim) if dim >= 0 and bias_shape[dim] != 1 else _R


def _partial_in(mesh_dim: int, *specs: DTensorSpec) -> bool:
    return any(s.placements[mesh_dim].is_partial() for s in specs)


def _cheapest(options: list[Option], lhs: DTensorSpec, rhs: DTensorSpec, bias: DTensorSpec | None, out_ndim: int):
    """The (output, lhs, rhs, bias) placements of the cheapest product of per-mesh-dim options.

    Between equal costs, one that creates no new pending reduction (an output Partial on a mesh dim where no
    input is Partial) wins: a pending reduction is communication deferred, not saved.
    """
    given = [s for s in (lhs, rhs, bias) if s is not None]
    best, best_key = None, (math.inf, 0)
    for combo in itertools.product(options, repeat=lhs.mesh.ndim):
        out, a, b = (tuple(p) for p in zip(*combo))
        if not (is_shardable(lhs.shape, a, lhs.mesh.shape) and is_shardable(rhs.shape, b, rhs.mesh.shape)):
            continue
        cost = redistribute_cost(lhs, a) + redistribute_cost(rhs, b)
        c = None
        if bias is not None:
            c = tuple(_bias_placement(p, out_ndim, bias.shape) for p in out)
            cost += redistribute_cost(bias, c)
        new_partials = sum(p.is_partial() and not _partial_in(i, *given) for i, p in enumerate(out))
        key = (round(cost, 9), new_partials)
        if key < best_key:
            best, best_key = (out, a, b, c), key
    return best


def _product_rule(equation: str, with_bias: bool):
    options = _options(equation)
    out_ndim = len(equation.split("->")[1])

    def rule(func, specs, args, kwargs):
        if len(specs) != 2 + with_bias:  # a plain 0-d tensor among the operands: not ours to plan
            return None
        bias = specs[0] if with_bias else None
        lhs, rhs = specs[-2:]
        choice = _cheapest(options, lhs, rhs, bias, out_ndim)
        if choice is None:  # no option keeps every shard non-empty: the replicate fallback
            return None
        out, a, b, c = choice
        inputs = (c, a, b) if with_bias else (a, b)
        return Strategy(inputs, out)

    return rule


RULES = {
    aten.mm.default: _product_rule("mk,kn->mn", with_bias=False),
    aten.addmm.default: _product_rule("mk,kn->mn", with_bias=True),
    aten.bmm.default: _product_rule("bmk,bkn->bmn", with_bias=False),
    aten.baddbmm.default: _product_rule("bmk,bkn->bmn", with_bias=True),
    aten.dot.default: _product_rule("k,k->", with_bias=False),
    aten.mv.default: _product_rule("mk,k->m", with_bias=False),
    aten.vdot.default: _product_rule("k,k->", with_bias=False),
    aten.addmv.default: _product_rule("mk,k->m", with_bias=True),
    aten.addr.default: _product_rule("m,n->mn", with_bias=True),
    aten.addbmm.default: _product_rule("bmk,bkn->mn", with_bias=True),
}
HANDLERS: dict = {}
