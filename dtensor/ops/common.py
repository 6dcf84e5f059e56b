"""Helpers shared by the rule modules (pure: no collectives).

The centre is ``elementwise``: the strategy chooser of every op whose output element ``i`` depends only
on element ``i`` of its (broadcast) inputs. It works like torch's DTensor: per mesh dim the op may run
all-Replicate, sharded along any output dim (an input that broadcasts that dim is Replicate there), or
under a few op-specific ``Partial`` rules; every combination over the mesh dims is priced with
``redistribute_cost`` and the first one that moves nothing wins, else the first that costs nothing (a
local chunk), else the cheapest. Since moving a bigger input costs more, the output follows the input
with the most elements. Other rule authors may use any public name here; it only grows.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils import _pytree as pytree

from ..dispatch import Placements, Strategy, replicate_plain
from ..placements import Partial, Placement, Replicate, Shard
from ..redistribute import partial_share
from ..spec import DTensorSpec

__all__ = [
    "replicate_partials",
    "broadcast_map",
    "redistribute_cost",
    "is_shardable",
    "Operand",
    "Choice",
    "elementwise",
    "mesh_candidates",
    "cheapest",
    "plain_as_replicate",
    "split_plain",
    "tensor_operands",
    "is_inplace",
    "mutable_args",
]

# One mesh dim of a Partial rule: (output placement, placement of each tensor operand).
PartialRule = tuple[Placement, ...]

# torch's cost model (torch/distributed/tensor/_collective_utils.py) for a CPU mesh, where every mesh dim
# counts as inter-host: microseconds of latency plus bytes over bandwidth.
_BASE_LATENCY_US = 6.6
_HOP_LATENCY_US = 2.7
_BANDWIDTH_GB_S = 87.7 * 0.22


def replicate_partials(placements: tuple[Placement, ...]) -> tuple[Placement, ...]:
    """The placements with every pending reduction resolved (Partial -> Replicate)."""
    return tuple(Replicate() if p.is_partial() else p for p in placements)


def broadcast_map(out_shape: Sequence[int], in_shape: Sequence[int]) -> tuple[int, ...]:
    """For each output dim, the input dim it comes from, or -1 where the input broadcasts (missing or 1)."""
    offset = len(out_shape) - len(in_shape)
    return tuple(
        d - offset if d >= offset and in_shape[d - offset] == out_shape[d] else -1 for d in range(len(out_shape))
    )


def _collective_us(gb: float, n: int, hops: int) -> float:
    return _BASE_LATENCY_US + hops * _HOP_LATENCY_US + gb * hops / n / _BANDWIDTH_GB_S * 1e6


def redistribute_cost(spec: DTensorSpec, dst: Placements) -> float:
    """Estimated microseconds to move ``spec`` to placements ``dst`` (inf: a move torch refuses)."""
    src = spec.placements
    if src == dst or all(p.is_replicate() for p in src):
        return 0.0
    mesh_shape = spec.mesh.shape
    shards = math.prod(mesh_shape[i] for i, p in enumerate(src) if p.is_shard())
    gb = spec.dtype.itemsize * math.prod(spec.shape) / shards / 2**30
    cost = 0.0
    for mesh_dim, a, b in _torch_steps(src, dst):
        n = mesh_shape[mesh_dim]
        if a.is_shard() and b.is_replicate():  # all-gather
            gb *= n
            cost += _collective_us(gb, n, n - 1)
        elif a.is_shard() and b.is_shard():  # all-to-all, priced a little above an all-gather like torch
            cost += _collective_us(gb, n, n - 1) + 1.0
        elif a.is_partial() and b.is_replicate():  # all-reduce
            cost += _collective_us(gb, n, 2 * (n - 1))
        elif a.is_partial() and b.is_shard():  # reduce-scatter
            cost += _collective_us(gb, n, n - 1)
            gb /= n
        elif b.is_partial() and not a.is_replicate():  # S->P, P->P: legal for us, banned by torch
            return math.inf
        elif b.is_shard():  # R->S: a local chunk
            gb /= n
    return cost


def _torch_steps(src: Placements, dst: Placements) -> list[tuple[int, Placement, Placement]]:
    """torch's greedy redistribute order, which its costs assume (our own plan may differ; costs need not).

    Inner to outer, move each mesh dim straight to its target, unless that Shard would nest differently
    (then to Replicate); then outer to inner, whatever is left.
    """
    current, steps = list(src), []

    def move(mesh_dim: int, to: Placement) -> None:
        if current[mesh_dim] != to:
            steps.append((mesh_dim, current[mesh_dim], to))
            current[mesh_dim] = to

    if any(p.is_shard() for p in src):
        for i in reversed(range(len(src))):
            to = dst[i]
            if isinstance(to, Shard):
                before = [k for k in range(i) if current[k].is_shard(to.dim)]
                if before != [k for k in range(i) if dst[k].is_shard(to.dim)]:
                    to = Replicate()
            move(i, to)
    for i in range(len(src)):
        move(i, dst[i])
    return steps


def is_shardable(shape: Sequence[int], placements: Placements, mesh_shape: Sequence[int]) -> bool:
    """Whether every sharded dim has at least one element per shard (torch's test for a new layout)."""
    pieces = [1] * len(shape)
    for mesh_dim, p in enumerate(placements):
        if isinstance(p, Shard):
            pieces[p.dim] *= mesh_shape[mesh_dim]
    return all(size >= k for size, k in zip(shape, pieces) if k > 1)  # unsharded dims may be empty


@dataclass(frozen=True)
class Operand:
    """A tensor argument of an elementwise op: a DTensor's spec, or a plain 0-d tensor (spec None)."""

    spec: DTensorSpec | None
    shape: tuple[int, ...]

    @property
    def placements(self) -> Placements | None:
        return None if self.spec is None else self.spec.placements


@dataclass(frozen=True)
class Choice:
    """What ``elementwise`` picked: placements per operand (None for plain tensors) and of the output."""

    inputs: tuple[Placements | None, ...]
    output: Placements

    def dtensor_inputs(self) -> tuple[Placements, ...]:
        return tuple(p for p in self.inputs if p is not None)


def _mixed_partials(placements: Sequence[Placement]) -> bool:
    ops = {p.reduce_op for p in placements if isinstance(p, Partial)}
    return len(ops) > 1 and ops != {"sum", "avg"}


def _single_dim_options(operands: Sequence[Operand], out_shape, rules: Sequence[PartialRule], whole: tuple[int, ...]):
    """Per mesh dim: (output placement, operand placements) options, in torch's order."""
    n = len(operands)
    options = [(Replicate(), (Replicate(),) * n)]
    if any(p.is_shard() for o in operands if o.spec is not None for p in o.spec.placements):
        maps = [broadcast_map(out_shape, o.shape) for o in operands]
        for d in (d for d in range(len(out_shape)) if d not in whole):
            options.append((Shard(d), tuple(Shard(m[d]) if m[d] >= 0 else Replicate() for m in maps)))
    options += [(r[0], tuple(r[1:])) for r in rules if len(r) == n + 1]
    return options


@functools.lru_cache(maxsize=4096)
def elementwise(
    operands: tuple[Operand, ...], rules: tuple[PartialRule, ...] = (), keep: tuple[int, ...] = (), whole: tuple[int, ...] = ()
) -> Choice | None:
    """The cheapest layout for an elementwise op over broadcast ``operands`` (see the module docstring).

    ``rules`` adds Partial options for one mesh dim, ``(output, operand 0, operand 1, ...)``, used when their
    length fits the operand count. ``keep``: operands that must not move (in-place targets; the output
    then equals the first of them). None when no layout keeps them. ``whole``: (non-negative) dims of
    the broadcast shape that no option shards, for ops elementwise over every other dim (``cross``,
    ``glu`` work along one dim).
    """
    mesh = next(o.spec.mesh for o in operands if o.spec is not None)
    out_shape = tuple(torch.broadcast_shapes(*[o.shape for o in operands]))
    options = _single_dim_options(operands, out_shape, rules, whole)
    best = cheapest(operands, mesh_candidates(options, mesh.ndim, len(operands)), keep)
    if best is None:
        return None
    inputs, output = best
    return Choice(tuple(p if o.spec is not None else None for o, p in zip(operands, inputs)), output)


def mesh_candidates(options: Sequence[tuple], ndim: int, inputs: int):
    """Every choice of one of ``options`` — ``(output, placements per input)`` for one mesh dim — on each
    of ``ndim`` mesh dims, as ``(placements of each input, output of each mesh dim)``."""
    for combo in itertools.product(options, repeat=ndim):
        yield tuple(tuple(c[1][k] for c in combo) for k in range(inputs)), tuple(c[0] for c in combo)


def cheapest(operands: Sequence[Operand], candidates, keep: tuple[int, ...] = ()):
    """The first of ``candidates`` — ``(placements per operand, output placements)`` pairs, the output
    any value — that torch would pick: one moving nothing, else one moving only for free (a local
    chunk), else the cheapest; None when none is allowed (``keep``: as in ``elementwise``)."""
    mesh_shape = next(o.spec.mesh.shape for o in operands if o.spec is not None)
    best, best_key = None, None
    for inputs, output in candidates:
        key = _price(operands, inputs, output, keep, mesh_shape)
        if key is not None and (best_key is None or key < best_key):
            best, best_key = (inputs, output), key
    return best


def _price(operands, inputs, output, keep, mesh_shape) -> tuple[int, float] | None:
    """torch's preference: (0, 0) nothing moves, (1, 0) only free moves, (2, cost); None: not allowed."""
    if _mixed_partials(output) or any(_mixed_partials(p) for p in inputs):
        return None
    if keep and (output != operands[keep[0]].placements or any(inputs[k] != operands[k].placements for k in keep)):
        return None
    moved, cost = False, 0.0
    for o, want in zip(operands, inputs):
        if o.spec is None:
            if any(not p.is_replicate() for p in want):
                return None
            continue
        if want == o.spec.placements:
            continue
        if not keep and not is_shardable(o.shape, want, mesh_shape):
            return None  # torch's guard against new uneven shards; an in-place target's layout is forced
        moved = True
        cost += redistribute_cost(o.spec, want)
    if math.isinf(cost):
        return None
    return (0, 0.0) if not moved else (1, 0.0) if cost == 0 else (2, cost)


def plain_as_replicate(rows: Sequence[PartialRule], operands: Sequence[Operand]) -> tuple[PartialRule, ...]:
    """torch's Partial ``rows`` for ``operands`` some of which are plain 0-d tensors, which torch moves to
    the Partial of its row and we keep whole: an average, max or min of equal terms is the tensor itself,
    so their Partial reads Replicate; a sum's share is taken locally (``split_plain``). Only for tables
    where a row with a Partial("sum") output has every operand a Partial("sum") (additive ops, fills)."""
    plain = [o.spec is None for o in operands]
    return tuple((r[0], *(Replicate() if q else p for q, p in zip(plain, r[1:]))) for r in rows if len(r) == len(operands) + 1)


def split_plain(strategy: Strategy, mesh, args: tuple, kwargs: dict) -> Strategy:
    """``strategy`` with the plain 0-d tensors of (args, kwargs) split evenly into the terms of the
    output's pending sum, as torch's Replicate -> Partial("sum") splits a value (``x + eps`` with a plain
    ``eps`` adds ``eps / n`` on each of n ranks; see ``plain_as_replicate``)."""
    from ..api import DTensor

    n = math.prod(mesh.shape[m] for m, p in enumerate(strategy.output) if p.is_partial("sum"))
    if n == 1:
        return strategy
    leaves = pytree.tree_leaves((args, kwargs))
    plain = {i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and not isinstance(x, DTensor)}

    def shared(local_args: tuple, local_kwargs: dict) -> tuple[tuple, dict]:
        flat, tree = pytree.tree_flatten((local_args, local_kwargs))
        return pytree.tree_unflatten([partial_share(x, "sum", n) if i in plain else x for i, x in enumerate(flat)], tree)

    return Strategy(strategy.inputs, strategy.output, shared)


def tensor_operands(specs: Sequence[DTensorSpec], args: tuple, kwargs: dict) -> list[Operand]:
    """Every tensor leaf of (args, kwargs) in pytree order, the DTensors paired with ``specs``."""
    from ..api import DTensor

    it = iter(specs)
    out = []
    for x in pytree.tree_leaves((args, kwargs)):
        if isinstance(x, DTensor):
            spec = next(it)
            out.append(Operand(spec, tuple(spec.shape)))
        elif isinstance(x, torch.Tensor):
            out.append(Operand(None, tuple(x.shape)))
    return out


def is_inplace(func) -> bool:
    """Whether the op writes into its first argument (``add_``, ``copy_``, ``_foreach_mul_`` ...)."""
    first = func._schema.arguments[0].alias_info if func._schema.arguments else None
    return first is not None and first.is_write


def mutable_args(func) -> set[str]:
    """Names of the arguments the op writes into."""
    return {a.name for a in func._schema.arguments if a.alias_info is not None and a.alias_info.is_write}


def with_plain_replicated(cls, func, args: tuple) -> tuple:
    """A handler's arguments with plain tensors (a module's weight or buffer left undistributed) made
    Replicate DTensors on the DTensor arguments' mesh, or refused with the error every op raises for
    them (``dispatch.replicate_plain``); 0-d ones stay plain, as scalars."""
    mesh = next(a._spec.mesh for a in args if isinstance(a, cls))
    return tuple(replicate_plain(func, list(args), mesh, cls))


def bind_args(func, args: tuple, kwargs: dict) -> dict:
    """The op's arguments by schema name, defaults filled in (None where the schema has no default)."""
    bound = {}
    for i, arg in enumerate(func._schema.arguments):
        if i < len(args) and not arg.kwarg_only:
            bound[arg.name] = args[i]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        else:
            bound[arg.name] = arg.default_value if arg.has_default_value() else None
    return bound
