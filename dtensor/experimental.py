"""``dtensor.experimental``: the counterpart of ``torch.distributed.tensor.experimental``.

``implicit_replication()`` lets plain tensors take part in DTensor ops as ``Replicate`` DTensors: the
caller promises each holds the same full value on every rank (a mask, a position table, a constant).
``local_map`` runs a function written for local tensors on the shards of DTensor arguments.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Sequence

import torch
from torch.utils import _pytree as pytree

from . import dispatch
from .api import DTensor
from .placements import Placement, PlacementError

__all__ = ["implicit_replication", "local_map"]


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
