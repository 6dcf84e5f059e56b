"""Ops that work along some dims and treat every position of the other dims alike: scans (``cumsum``,
``cummax`` ...), ``sort``/``argsort``/``topk``, ``flip``, ``roll``, ``constant_pad_nd``, ``repeat`` (along
the dims it repeats; the new leading dims shift the others), ``diagonal`` (along its two dims, which
become one last dim), the triangles ``tril``/``triu``, the Fourier transforms (``_fft_*``, along their
dims), and ``linalg_cross`` and ``glu`` (elementwise over broadcast inputs except along their ``dim``).

The dims an op works along must be whole on every rank, so a ``Shard`` of one of them is replicated
first; shards of any other dim stay, and every output (values and indices alike) keeps the input's
placements. A pending reduction stays where the op commutes with it (``flip``/``roll`` only move data;
constant padding writes the same value on every rank, which an average, max or min keeps, and a sum
only when it is 0); otherwise it is all-reduced first, as torch's scan and triangle rules do, or
reduce-scattered onto another dim for the sorts, ``cummax``/``cummin`` and padding, as torch's costs pick.
``tril`` and ``triu`` keep even their own two dims sharded (torch gathers them): a rank holding rows
from ``r0`` and columns from ``c0`` keeps exactly the global triangle by shifting the diagonal by
``r0 - c0``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..dispatch import Strategy
from ..placements import Partial, Placement, Replicate, Shard, local_box
from ..spec import DTensorSpec
from .common import Operand, bind_args, elementwise, is_shardable, tensor_operands

aten = torch.ops.aten

__all__ = ["RULES", "HANDLERS"]

# Whether a pending reduction ``p`` passes through the op called with ``named`` arguments.
Keeps = Callable[[dict, Placement], bool]


def _never(named: dict, p: Placement) -> bool:
    return False


def _always(named: dict, p: Placement) -> bool:
    return True


def _sum_or_avg(named: dict, p: Placement) -> bool:
    return p.is_partial("sum") or p.is_partial("avg")


def _constant_pad(func, specs, args, kwargs):
    """``constant_pad_nd`` is elementwise over the dims it does not pad, chosen as torch's single-dim
    rule is (by cost, a Partial reduce-scattered where another mesh dim moves anyway). Every rank
    writes the pad value, so an average, max or min of equal values stays pending, and a sum only
    when the value is 0 (or nothing is padded)."""
    spec = specs[0]
    named = bind_args(func, args, kwargs)
    ndim = len(spec.shape)
    pad = list(named["pad"])
    padded = tuple(ndim - 1 - i for i in range(len(pad) // 2) if pad[2 * i] or pad[2 * i + 1])
    kinds = ("avg", "max", "min") + (("sum",) if named.get("value") in (None, 0) or not any(pad) else ())
    rows = tuple((Partial(k), Partial(k)) for k in kinds)
    choice = elementwise((Operand(spec, tuple(spec.shape)),), rows, (), padded)
    return Strategy(choice.dtensor_inputs(), choice.output)


def _layout(
    spec: DTensorSpec, active: set[int], keeps: Callable[[Placement], bool], scatter: bool = False
) -> tuple[Placement, ...]:
    """The placements the op runs in (module docstring); ``scatter``: a pending reduction the op does not
    keep is reduce-scattered onto the first other dim that every rank can hold a piece of and no later
    mesh dim splits (torch's cheapest choice for sorts, which would otherwise nest the shards in another
    order), else all-reduced."""
    out: list[Placement] = [
        Replicate() if isinstance(p, Shard) and p.dim in active or p.is_partial() and not keeps(p) else p
        for p in spec.placements
    ]
    for m, p in enumerate(spec.placements if scatter else ()):
        if p.is_partial() and not keeps(p):
            for d in (d for d in range(len(spec.shape)) if d not in active):
                trial = out[:m] + [Shard(d)] + out[m + 1 :]
                if is_shardable(spec.shape, trial, spec.mesh.shape) and not any(q.is_shard(d) for q in out[m + 1 :]):
                    out = trial
                    break
    return tuple(out)


def _along(active: Callable[[dict, int], Sequence[int]], outputs: int = 1, keeps: Keeps = _never, scatter: bool = False):
    """The rule of an op that works along ``active(named_args, ndim)`` dims; it has ``outputs`` tensors;
    ``scatter`` as in ``_layout``."""

    def rule(func, specs, args, kwargs):
        spec = specs[0]
        ndim = len(spec.shape)
        named = bind_args(func, args, kwargs)
        dims = {d % ndim for d in active(named, ndim)} if ndim else set()
        placements = _layout(spec, dims, lambda p: keeps(named, p), scatter)
        return Strategy((placements,), placements if outputs == 1 else [placements] * outputs)

    return rule


def _dim(named: dict, ndim: int) -> Sequence[int]:
    return [named["dim"]]


def _dims(named: dict, ndim: int) -> Sequence[int]:
    return named["dims"] or range(ndim)  # roll with no dims rolls the flattened tensor


def _dim_list(named: dict, ndim: int) -> Sequence[int]:
    return named["dim"]


def _all_but_dim(named: dict, ndim: int) -> Sequence[int]:
    """``renorm`` normalizes each slice along ``dim``: the slice is every other dim."""
    return [d for d in range(ndim) if d != named["dim"] % ndim]


def _dimension(named: dict, ndim: int) -> Sequence[int]:
    return [named["dimension"]]


def _unfold_backward(func, specs, args, kwargs):
    """The windows' gradient (``dim`` became the window count, a window dim was appended) summed back
    into zeros of the global ``input_sizes``: ``dim`` and the window dim whole, the others keep shards."""
    spec = specs[0]
    named = bind_args(func, args, kwargs)
    sizes = list(named["input_sizes"])
    placements = _layout(spec, {named["dim"] % len(sizes), len(spec.shape) - 1}, lambda p: _sum_or_avg(named, p))
    coordinate = spec.mesh.get_coordinate()
    local = list(local_box(sizes, spec.mesh.shape, placements, coordinate).sizes) if coordinate is not None else [0] * len(sizes)
    return Strategy((placements,), placements, lambda a, k: ((a[0], local, *a[2:]), k))


def _along_broadcast(func, specs, args, kwargs):
    """``linalg_cross``, ``glu`` and its backward: elementwise over broadcast inputs except along ``dim``,
    which stays whole (its size may differ between the inputs: ``glu`` halves it)."""
    operands = tensor_operands(specs, args, kwargs)
    ndim = max(len(o.shape) for o in operands)
    back = bind_args(func, args, kwargs)["dim"] % ndim - ndim  # from the end: inputs may differ in rank
    flat = tuple(Operand(o.spec, _one_at(o.shape, back)) for o in operands)
    choice = elementwise(flat, (), (), (ndim + back,))
    if choice is None:
        return None
    return Strategy(choice.dtensor_inputs(), choice.output)


def _one_at(shape: tuple[int, ...], back: int) -> tuple[int, ...]:
    """``shape`` with the dim ``back`` from the end (if it has one) set to 1, so that it broadcasts."""
    if len(shape) < -back:
        return shape
    return shape[:back] + (1,) + (shape[back + 1 :] if back != -1 else ())


def _repeat(func, specs, args, kwargs):
    """``repeat`` only copies data: dims repeated once keep their shards (shifted past the new leading
    dims), repeated dims are replicated first, and every pending reduction passes through."""
    spec = specs[0]
    repeats = list(bind_args(func, args, kwargs)["repeats"])
    lead = len(repeats) - len(spec.shape)
    placements = _layout(spec, {d for d in range(len(spec.shape)) if repeats[d + lead] != 1}, lambda p: True)
    out = tuple(Shard(p.dim + lead) if isinstance(p, Shard) else p for p in placements)
    return Strategy((placements,), out)


def _diagonal(func, specs, args, kwargs):
    """``diagonal`` views its two dims as one new last dim: shards of the other dims stay (renumbered), a
    pending reduction is carried out first, as torch's."""
    spec = specs[0]
    named = bind_args(func, args, kwargs)
    ndim = len(spec.shape)
    pair = {named["dim1"] % ndim, named["dim2"] % ndim}
    placements = _layout(spec, pair, lambda p: False)
    out = tuple(Shard(p.dim - sum(d < p.dim for d in pair)) if isinstance(p, Shard) else p for p in placements)
    return Strategy((placements,), out)


def _triangle(func, specs, args, kwargs):
    """``tril``/``triu`` on any sharding: each rank shifts the diagonal by its piece's offsets."""
    spec = specs[0]
    placements = _layout(spec, set(), lambda p: False)  # a Partial is reduced first, as torch's
    coordinate = spec.mesh.get_coordinate()
    if coordinate is None or len(spec.shape) < 2:
        return Strategy((placements,), placements)
    box = local_box(spec.shape, spec.mesh.shape, placements, coordinate)
    shift = box.offsets[-2] - box.offsets[-1]
    if shift == 0:
        return Strategy((placements,), placements)

    def shifted(local_args: tuple, local_kwargs: dict) -> tuple[tuple, dict]:
        named = bind_args(func, local_args, local_kwargs)
        return (local_args[0], named["diagonal"] + shift), {}

    return Strategy((placements,), placements, shifted)


RULES = {
    aten.cumsum.default: _along(_dim),
    aten.cumprod.default: _along(_dim),
    aten.logcumsumexp.default: _along(_dim),
    aten.cummax.default: _along(_dim, outputs=2, scatter=True),
    aten.cummin.default: _along(_dim, outputs=2, scatter=True),
    aten.sort.default: _along(_dim, outputs=2, scatter=True),
    aten.sort.stable: _along(_dim, outputs=2, scatter=True),
    aten.argsort.default: _along(_dim, scatter=True),
    aten.argsort.stable: _along(_dim, scatter=True),
    aten.topk.default: _along(_dim, outputs=2, scatter=True),
    aten.flip.default: _along(_dims, keeps=_always),
    aten.roll.default: _along(_dims, keeps=_always),
    aten.constant_pad_nd.default: _constant_pad,
    aten.repeat.default: _repeat,
    # the discrete Fourier transforms work along their dims and are linear
    aten._fft_c2c.default: _along(_dim_list, keeps=_sum_or_avg),
    aten._fft_r2c.default: _along(_dim_list, keeps=_sum_or_avg),
    aten._fft_c2r.default: _along(_dim_list, keeps=_sum_or_avg),
    aten.renorm.default: _along(_all_but_dim),
    aten.unfold.default: _along(_dimension, keeps=_always),
    aten.unfold_backward.default: _unfold_backward,
    aten.linalg_cross.default: _along_broadcast,
    aten.glu.default: _along_broadcast,
    aten.glu_backward.default: _along_broadcast,
    aten.diagonal.default: _diagonal,
    aten.tril.default: _triangle,
    aten.triu.default: _triangle,
}
HANDLERS: dict = {}
