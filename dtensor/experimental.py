"""``dtensor.experimental``: the counterpart of ``torch.distributed.tensor.experimental``.

``implicit_replication()`` lets plain tensors take part in DTensor ops as ``Replicate`` DTensors: the
caller promises each holds the same full value on every rank (a mask, a position table, a constant).
``local_map`` runs a function written for local tensors on the shards of DTensor arguments.
``register_sharding`` gives an op (a custom op, or an aten op whose default layout does not suit) the
shardings it accepts; ``context_parallel`` is not provided.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Sequence

import torch
from torch._ops import OpOverload
from torch.utils import _pytree as pytree

from . import dispatch, ops
from .api import DTensor
from .ops.registered import registered_rule
from .placements import Placement, PlacementError

__all__ = ["implicit_replication", "local_map", "register_sharding"]


@contextlib.contextmanager
def implicit_replication() -> Iterator[None]:
    """Inside the block, a plain tensor mixed with DTensors counts as ``Replicate`` on their mesh."""
    dispatch.implicit_replication_depth += 1
    try:
        yield
    finally:
        dispatch.implicit_replication_depth -= 1


def local_map(
    func: Callable | None = None,
    out_placements: Sequence[Placement] | Sequence[Sequence[Placement] | None] | None = None,
    in_placements: Sequence[Sequence[Placement] | None] | None = None,
    in_grad_placements: Sequence[Sequence[Placement] | None] | None = None,
    device_mesh=None,
    *,
    redistribute_inputs: bool = False,
) -> Callable:
    """``func`` on local shards, with torch's signature (without ``func``: a decorator).

    DTensor arguments (flattened) become their local tensors, moved first to ``in_placements`` when
    ``redistribute_inputs``, else checked against them; their gradients come back with
    ``in_grad_placements``. When any argument was a DTensor, tensor results become DTensors on its mesh
    (or ``device_mesh``) with ``out_placements``: a tuple holds one entry per flattened output, anything
    else is the single output's, and None means Replicate, as ``DTensor.from_local``'s default. Without a
    DTensor argument the function's result is returned as it is (torch's rules)."""
    if func is None:
        return functools.partial(
            local_map, out_placements=out_placements, in_placements=in_placements,
            in_grad_placements=in_grad_placements, device_mesh=device_mesh, redistribute_inputs=redistribute_inputs,
        )

    @functools.wraps(func)
    def wrapped(*args, **kwargs):
        mesh = device_mesh
        flat, tree = pytree.tree_flatten(args)
        wanted = list(in_placements) if in_placements is not None else [None] * len(flat)
        grads = list(in_grad_placements) if in_grad_placements is not None else [None] * len(flat)
        if not len(wanted) == len(grads) == len(flat):
            raise ValueError(f"local_map: in_placements/in_grad_placements need one entry per argument ({len(flat)})")
        local, seen_dtensor = [], False
        for i, (x, want, grad) in enumerate(zip(flat, wanted, grads)):
            if isinstance(x, DTensor):
                mesh, seen_dtensor = mesh or x.device_mesh, True
                if want is not None and tuple(want) != x.placements:
                    if not redistribute_inputs:
                        raise ValueError(
                            f"local_map: argument {i} has placements {list(x.placements)}, expected {list(want)} "
                            "(pass redistribute_inputs=True to move it)"
                        )
                    x = x.redistribute(mesh, want)
                x = x.to_local(grad_placements=grad)
            local.append(x)
        out = func(*pytree.tree_unflatten(local, tree), **kwargs)
        return _wrap_outputs(out, out_placements, mesh) if seen_dtensor else out

    return wrapped


def _wrap_outputs(out, out_placements, mesh):
    flat, tree = pytree.tree_flatten(out)
    per_output = out_placements if _one_per_output(out_placements) else (out_placements,)
    if len(per_output) != len(flat):
        raise PlacementError(
            f"local_map: out_placements gives {len(per_output)} entries for {len(flat)} outputs; pass a tuple "
            "with one entry (placements, or None for Replicate) per output"
        )
    wrapped = [
        DTensor.from_local(o, mesh, p, run_check=False) if isinstance(o, torch.Tensor) else o
        for o, p in zip(flat, per_output)
    ]
    return pytree.tree_unflatten(wrapped, tree)


def _one_per_output(out_placements) -> bool:
    """A tuple lists every output's placements, as in torch; a tuple of placements (``(Shard(0),)``),
    which torch would misread, is taken as the one output's."""
    return isinstance(out_placements, tuple) and not (out_placements and isinstance(out_placements[0], Placement))


def register_sharding(op: OpOverload | list[OpOverload]) -> Callable:
    """A decorator registering the shardings ``op`` (an overload, or a list of them) accepts, with torch's
    signature: the decorated function takes the op's arguments, each DTensor replaced by its
    ``DTensorSpec`` (``.shape``, ``.ndim``, ``.placements``, ``.mesh``), and returns pairs
    ``(output placements, input placements)`` for one mesh dim — one placement per tensor output, one
    per argument, None for arguments that are not tensors. Every combination over the mesh dims is a
    candidate; the inputs move to the one torch would pick (``ops/registered.py``). A registration
    replaces the op's own rule, here as in torch, for the rest of the process."""
    overloads = op if isinstance(op, list) else [op]
    for overload in overloads:
        if not isinstance(overload, OpOverload):
            raise TypeError(f"register_sharding takes an op overload (torch.ops.aten.add.Tensor), or a list of them; got {overload!r}")

    def register(shardings_of: Callable) -> Callable:
        for overload in overloads:
            ops.REGISTERED[overload] = registered_rule(shardings_of)
        dispatch.forget_plans()
        return shardings_of

    return register
