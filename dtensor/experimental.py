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
from .placements import Placement

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
    ``in_grad_placements``. Tensor results become DTensors with ``out_placements`` (one per output; None
    leaves that output a plain tensor)."""
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
        local = []
        for i, (x, want, grad) in enumerate(zip(flat, wanted, grads)):
            if isinstance(x, DTensor):
                mesh = mesh or x.device_mesh
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
        if out_placements is None or mesh is None:
            return out
        return _wrap_outputs(out, out_placements, mesh)

    return wrapped


def _wrap_outputs(out, out_placements, mesh):
    flat, tree = pytree.tree_flatten(out)
    single = len(out_placements) == 0 or isinstance(out_placements[0], Placement)
    per_output = [out_placements] * len(flat) if single else list(out_placements)
    if len(per_output) != len(flat):
        raise ValueError(f"local_map: out_placements has {len(per_output)} entries for {len(flat)} outputs")
    wrapped = [
        DTensor.from_local(o, mesh, p, run_check=False) if isinstance(o, torch.Tensor) and p is not None else o
        for o, p in zip(flat, per_output)
    ]
    return pytree.tree_unflatten(wrapped, tree)
