"""Sharding rules registered by users (``dtensor.experimental.register_sharding``), as strategies.

A registered function takes the op's arguments, every DTensor replaced by its ``DTensorSpec``, and
returns the shardings it accepts on one mesh dim: pairs ``(output placements, input placements)``, one
output placement per tensor output and one input placement per argument (None for an argument that is
not a DTensor; a ``Tensor[]`` argument arrives as a tuple of specs and takes one placement per tensor).
As in torch, every combination of them over the mesh dims is a candidate; a candidate that would cut a
dim into fewer elements than shards, or change an in-place target's layout, is dropped, and the one
torch would pick wins (``common.cheapest``: nothing moves, else only free moves, else the cheapest).
"""

from __future__ import annotations

from typing import Callable, Sequence

from torch.utils import _pytree as pytree

from ..dispatch import Strategy
from ..placements import Placement
from ..spec import DTensorSpec
from .common import Operand, cheapest, is_inplace, mesh_candidates

__all__ = ["registered_rule"]

Sharding = tuple[Sequence[Placement | None], Sequence[Placement | None]]


def registered_rule(shardings_of: Callable[..., Sequence[Sharding]]) -> Callable:
    """The dispatch rule ``(func, specs, args, kwargs) -> Strategy`` of a registered function."""

    def rule(func, specs: list[DTensorSpec], args: tuple, kwargs: dict) -> Strategy:
        it = iter(specs)
        as_specs = pytree.tree_map(lambda x: next(it) if _is_dtensor(x) else x, (args, kwargs))
        args_given = tuple(_tensor_list_as_tuple(a) for a in as_specs[0])
        kwargs_given = {k: _tensor_list_as_tuple(v) for k, v in as_specs[1].items()}
        accepted = [_single_dim(func, s, len(specs)) for s in shardings_of(*args_given, **kwargs_given)]
        return _choose(func, specs, accepted)

    return rule


def _tensor_list_as_tuple(value):
    """A ``Tensor[]`` argument as torch hands it to the function: a tuple of specs (other lists stay)."""
    if isinstance(value, list) and any(isinstance(v, DTensorSpec) for v in value):
        return tuple(value)
    return value


def _is_dtensor(x) -> bool:
    from ..api import DTensor

    return isinstance(x, DTensor)


def _single_dim(func, sharding: Sharding, count: int) -> tuple[tuple[Placement, ...], tuple[Placement, ...]]:
    """(output placements, placements of the DTensor arguments) of one accepted sharding, checked."""
    try:
        outputs, inputs = sharding
    except (TypeError, ValueError):
        raise ValueError(f"register_sharding for {func}: each accepted sharding is a pair (output placements, "
                         f"input placements), got {sharding!r}") from None
    outputs = (outputs,) if isinstance(outputs, Placement) else tuple(outputs)
    inputs = tuple(p for p in inputs if p is not None)
    if len(inputs) != count or not all(isinstance(p, Placement) for p in (*outputs, *inputs)):
        raise ValueError(
            f"register_sharding for {func}: the sharding {sharding!r} gives {len(inputs)} input placements for "
            f"{count} DTensor argument(s); give one placement per DTensor argument and None for every other argument"
        )
    return outputs, inputs


def _choose(func, specs: list[DTensorSpec], accepted: list) -> Strategy:
    counts = {len(outputs) for outputs, _ in accepted}
    if len(counts) > 1:
        raise ValueError(f"register_sharding for {func}: the accepted shardings give {sorted(counts)} output placements; "
                         "give one per tensor output in every one")
    outputs = counts.pop() if counts else 0
    operands = [Operand(s, tuple(s.shape)) for s in specs]
    candidates = ((inputs, tuple(zip(*per_dim))) for inputs, per_dim in mesh_candidates(accepted, specs[0].mesh.ndim, len(specs)))
    if outputs <= 1:  # one output: its placements themselves, which an in-place target's must equal (an op
        # returning nothing, ``add_`` in a custom op, leaves its target as it is)
        candidates = ((inputs, out[0] if out else inputs[0]) for inputs, out in candidates)
    best = cheapest(operands, candidates, keep=(0,) if is_inplace(func) else ())
    if best is None:
        raise RuntimeError(
            f"{func}: none of the shardings registered for it fits inputs with placements "
            f"{[list(s.placements) for s in specs]} and shapes {[list(s.shape) for s in specs]}"
        )
    inputs, output = best
    return Strategy(inputs, output if outputs <= 1 else list(output))
