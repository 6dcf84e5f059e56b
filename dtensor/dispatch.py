"""How an aten op on DTensors becomes the same op on local shards (``__torch_dispatch__``).

A rule (``ops/``, one module per op family, collected in ``ops.RULES``) looks at the input specs and
returns a ``Strategy``: the placements each DTensor input must have and the placements of the output.
This module carries a strategy out: redistribute inputs, run the op on local tensors, wrap the outputs.
The global shape and stride of outputs come from running the op on meta tensors. An op without a rule
still works: every input is replicated, the op runs locally, and a warning names the op once.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree

from .placements import Placement, Replicate
from .redistribute import redistribute_local
from .spec import DTensorSpec

__all__ = ["Strategy", "dispatch", "fallback_ops"]

fallback_ops: set[str] = set()  # ops that took the replicate-everything path, for tests and users to inspect


@dataclass(frozen=True)
class Strategy:
    """Placements wanted for each DTensor input (in argument order) and for the output(s)."""

    inputs: tuple[tuple[Placement, ...], ...]
    output: tuple[Placement, ...]


def dispatch(cls, func, args: tuple, kwargs: dict):
    flat, tree = pytree.tree_flatten((args, kwargs))
    specs = [x._spec for x in flat if isinstance(x, cls)]
    _check_inputs(func, flat, specs, cls)
    from .ops import RULES

    rule = RULES.get(func)
    strategy = rule(func, specs, args, kwargs) if rule is not None else None
    if strategy is None:
        strategy = _replicate_everything(func, specs)
    return _run(cls, func, flat, tree, specs, strategy)


def _check_inputs(func, flat: list, specs: list[DTensorSpec], cls) -> None:
    meshes = {s.mesh for s in specs}
    if len(meshes) > 1:
        raise ValueError(f"{func}: DTensor inputs live on different meshes {meshes}; redistribute them onto one mesh")
    plain = [x for x in flat if isinstance(x, torch.Tensor) and not isinstance(x, cls) and x.dim() > 0]
    if plain:
        raise TypeError(
            f"{func}: got a plain torch.Tensor of shape {list(plain[0].shape)} mixed with DTensors; "
            "convert it with distribute_tensor or DTensor.from_local first"
        )


def _replicate_everything(func, specs: list[DTensorSpec]) -> Strategy:
    name = str(func)
    if name not in fallback_ops:
        fallback_ops.add(name)
        warnings.warn(f"dtensor: no sharding rule for {name}; replicating its inputs (slow, extra memory)", stacklevel=3)
    replicate = tuple(Replicate() for _ in range(specs[0].mesh.ndim))
    return Strategy(tuple(replicate for _ in specs), replicate)


def _run(cls, func, flat: list, tree, specs: list[DTensorSpec], strategy: Strategy):
    mesh = specs[0].mesh
    locals_, metas, it = [], [], iter(zip(specs, strategy.inputs))
    for x in flat:
        if isinstance(x, cls):
            spec, want = next(it)
            local = x._local_tensor
            if want != spec.placements:
                local = redistribute_local(local, mesh, spec.shape, spec.placements, want)
            locals_.append(local)
            metas.append(torch.empty_strided(spec.shape, spec.stride, dtype=spec.dtype, device="meta"))
        else:
            locals_.append(x)
            metas.append(x.to("meta") if isinstance(x, torch.Tensor) else x)
    local_args, local_kwargs = pytree.tree_unflatten(locals_, tree)
    out = func(*local_args, **local_kwargs)
    if _is_inplace(func):
        return _inplace_result(cls, flat, strategy)
    meta_args, meta_kwargs = pytree.tree_unflatten(metas, tree)
    meta_out = func(*meta_args, **meta_kwargs)
    return _wrap(cls, out, meta_out, mesh, strategy.output)


def _is_inplace(func) -> bool:
    schema = func._schema
    return bool(schema.arguments) and schema.arguments[0].alias_info is not None and schema.arguments[0].alias_info.is_write


def _inplace_result(cls, flat: list, strategy: Strategy):
    target = flat[0]
    if strategy.inputs[0] != target._spec.placements:
        raise RuntimeError(f"in-place op would change the placements of its target from {target._spec.placements}")
    return target


def _wrap(cls, out, meta_out, mesh, placements: tuple[Placement, ...]):
    if isinstance(out, torch.Tensor):
        spec = DTensorSpec(mesh, placements, meta_out.shape, tuple(meta_out.stride()), meta_out.dtype)
        return cls(out, spec, requires_grad=False)
    if isinstance(out, (list, tuple)):
        return type(out)(_wrap(cls, o, m, mesh, placements) for o, m in zip(out, meta_out))
    return out
