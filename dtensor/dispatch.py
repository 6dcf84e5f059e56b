"""How an aten op on DTensors becomes the same op on local shards (``__torch_dispatch__``).

Two kinds of entries, one module per op family under ``ops/``, collected explicitly in ``ops/__init__``:

* a **rule** looks at the input specs (and the op's other arguments) and returns a ``Strategy``: the
  placements every DTensor input must have, the placements of the outputs, and, where the op's
  arguments mention global sizes, a function that rewrites them for the local shards. This module
  carries a strategy out: redistribute inputs, run the op on local tensors, wrap the outputs. The output
  specs (global shape, stride, dtype) come from running the op once on meta tensors. Strategies and
  output specs are cached per (op, input specs, other arguments), so the steady state costs a dict
  lookup.
* a **handler** does the whole op itself (random ops, ops whose local computation differs).

An op with neither still works: every input is replicated, the op runs locally, and a warning names the
op once (``fallback_ops`` lists them). Ops whose output shape depends on the data (``masked_select``,
``nonzero``) have no meta kernel; on that path their output specs come from the local result.

Plain tensors beside DTensors are refused (a 0-d one is a scalar), except where they are known to hold
the full value on every rank: inside ``dtensor.experimental.implicit_replication()``, and in a backward
pass, where autograd itself builds plain zero gradients (the backward of ``split``/``unbind`` for unused
outputs). There they count as ``Replicate``.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from .placements import Placement, Replicate
from .redistribute import redistribute_local
from .spec import DTensorSpec

__all__ = ["Strategy", "dispatch", "fallback_ops", "Placements", "implicit_replication_depth"]

Placements = tuple[Placement, ...]
fallback_ops: set[str] = set()  # ops that took the replicate-everything path, for tests and users to inspect
implicit_replication_depth = 0  # > 0 inside dtensor.experimental.implicit_replication()


@dataclass(frozen=True)
class Strategy:
    """How to run one op call.

    ``inputs``: placements wanted for each DTensor argument, in argument (pytree) order.
    ``output``: placements of every tensor output, or a list with one entry per tensor output.
    ``local_args``: rewrites (args, kwargs) for the local op, given the local input shapes, when the op's
    arguments mention global sizes (view shapes, split sizes, ...).
    """

    inputs: tuple[Placements, ...]
    output: Placements | list[Placements]
    local_args: Callable[[tuple, dict], tuple[tuple, dict]] | None = None


@dataclass(frozen=True)
class _Plan:
    strategy: Strategy
    outputs: list | None  # one DTensorSpec per flattened output leaf (None for non-tensor leaves); None: per call


_cache: dict[Any, _Plan] = {}


def dispatch(cls, func, args: tuple, kwargs: dict):
    from .ops import HANDLERS, rule_for

    handler = HANDLERS.get(func)
    if handler is not None:
        return handler(cls, func, args, kwargs)
    flat, tree = _flatten(args, kwargs)
    specs = [x._spec for x in flat if isinstance(x, cls)]
    _check_meshes(func, specs)
    if any(_is_plain(x, cls) for x in flat):
        flat = _replicate_plain(func, flat, specs[0].mesh, cls)
        args, kwargs = _unflatten(flat, tree)
        specs = [x._spec for x in flat if isinstance(x, cls)]
    key = _cache_key(func, flat, tree, cls)
    plan = _cache.get(key) if key is not None else None
    if plan is None:
        plan = _plan(func, args, kwargs, flat, tree, specs, cls, rule_for(func))
        if key is not None:
            _cache[key] = plan
    return _run(cls, func, flat, tree, specs, plan)


def _flatten(args: tuple, kwargs: dict) -> tuple[list, Any]:
    """The op's arguments as a flat list. The common case (no tensors inside lists or dicts) skips
    pytree: every argument is one leaf, lists of sizes included."""
    values = (*args, *kwargs.values())
    if not any(isinstance(a, (list, tuple, dict)) and _holds_tensor(a) for a in values):
        return list(values), (len(args), tuple(kwargs))
    return pytree.tree_flatten((args, kwargs))


def _holds_tensor(container) -> bool:
    items = container.values() if isinstance(container, dict) else container
    return any(isinstance(x, torch.Tensor) or isinstance(x, (list, tuple, dict)) and _holds_tensor(x) for x in items)


def _unflatten(flat: list, tree) -> tuple[tuple, dict]:
    if isinstance(tree, tuple):
        count, names = tree
        return tuple(flat[:count]), dict(zip(names, flat[count:]))
    return pytree.tree_unflatten(flat, tree)


def _cache_key(func, flat: list, tree, cls):
    parts = []
    for x in flat:
        if isinstance(x, cls):
            parts.append(x._spec)
        elif isinstance(x, torch.Tensor):
            parts.append(("tensor", x.dtype, x.device, tuple(x.shape)))
        elif isinstance(x, list):
            parts.append(tuple(x))
        else:
            parts.append(x)
    try:
        key = (func, tuple(parts), tree if isinstance(tree, tuple) else repr(tree))
        hash(key)
    except TypeError:
        return None
    return key


def _check_meshes(func, specs: list[DTensorSpec]) -> None:
    meshes = {s.mesh for s in specs}
    if len(meshes) > 1:
        raise ValueError(f"{func}: DTensor inputs live on different meshes {meshes}; redistribute them onto one mesh")


def _is_plain(x, cls) -> bool:
    """A plain tensor that is not a scalar operand (0-d tensors are scalars, as in torch)."""
    return isinstance(x, torch.Tensor) and not isinstance(x, cls) and x.dim() > 0


def _replicate_plain(func, flat: list, mesh, cls) -> list:
    """Plain tensors as Replicate DTensors where they are known to be the full value (module docstring)."""
    if implicit_replication_depth == 0 and torch._C._current_autograd_node() is None:
        shape = next(list(x.shape) for x in flat if _is_plain(x, cls))
        raise RuntimeError(  # not TypeError: Python's operators would turn that into "unsupported operand type(s)"
            f"{func}: got a plain torch.Tensor of shape {shape} mixed with DTensors; convert it with "
            "distribute_tensor or DTensor.from_local first (or, if it is the same full tensor on every rank, "
            "run the code inside dtensor.experimental.implicit_replication())"
        )
    replicate = (Replicate(),) * mesh.ndim
    return [
        cls(x.detach(), DTensorSpec(mesh, replicate, x.shape, tuple(x.stride()), x.dtype)) if _is_plain(x, cls) else x
        for x in flat
    ]


def _plan(func, args, kwargs, flat, tree, specs, cls, rule) -> _Plan:
    strategy = rule(func, specs, args, kwargs) if rule is not None else None
    if strategy is None:
        strategy = _replicate_everything(func, specs)
    metas = [_meta(x._spec) if isinstance(x, cls) else _to_meta(x) for x in flat]
    meta_args, meta_kwargs = _unflatten(metas, tree)
    # ops that return nothing (in-place _foreach_*/_fused_*) need no output specs; _fused_sgd_ has no meta kernel
    try:
        meta_out = func(*meta_args, **meta_kwargs) if func._schema.returns else None
    except (NotImplementedError, RuntimeError):
        if rule is not None:
            raise
        return _Plan(strategy, None)  # a data-dependent output shape: specs come from each local result
    return _Plan(strategy, _output_specs(meta_out, specs[0].mesh, strategy.output))


def _meta(spec: DTensorSpec) -> torch.Tensor:
    return torch.empty_strided(spec.shape, spec.stride, dtype=spec.dtype, device="meta")


def _to_meta(x):
    return x.to("meta") if isinstance(x, torch.Tensor) else x


def _replicate_everything(func, specs: list[DTensorSpec]) -> Strategy:
    name = str(func)
    if name not in fallback_ops:
        fallback_ops.add(name)
        warnings.warn(f"dtensor: no sharding rule for {name}; replicating its inputs (slow, extra memory)", stacklevel=4)
    replicate = tuple(Replicate() for _ in range(specs[0].mesh.ndim))
    return Strategy(tuple(replicate for _ in specs), replicate)


def _output_specs(meta_out, mesh, output: Placements | list[Placements]) -> list[DTensorSpec | None]:
    """One spec per leaf of the op's (flattened) output; None where the leaf is not a tensor."""
    flat = pytree.tree_leaves(meta_out)
    tensors = [x for x in flat if isinstance(x, torch.Tensor)]
    per_tensor = list(output) if isinstance(output, list) else [output] * len(tensors)
    if len(per_tensor) != len(tensors):
        raise RuntimeError(f"a sharding rule gave {len(per_tensor)} output placements for {len(tensors)} outputs")
    it = iter(per_tensor)
    return [DTensorSpec(mesh, next(it), x.shape, tuple(x.stride()), x.dtype) if isinstance(x, torch.Tensor) else None for x in flat]


def _run(cls, func, flat: list, tree, specs: list[DTensorSpec], plan: _Plan):
    strategy = plan.strategy
    mesh = specs[0].mesh
    wanted = iter(strategy.inputs)
    local_flat = []
    for x in flat:
        if isinstance(x, cls):
            want = next(wanted)
            local = x._local_tensor
            if want != x._spec.placements:
                local = redistribute_local(local, mesh, x._spec.shape, x._spec.placements, want)
            local_flat.append(local)
        else:
            local_flat.append(x)
    local_args, local_kwargs = _unflatten(local_flat, tree)
    if strategy.local_args is not None:
        local_args, local_kwargs = strategy.local_args(local_args, local_kwargs)
    out = func(*local_args, **local_kwargs)
    if _is_inplace(func):
        return _inplace_result(cls, flat, tree, strategy, out)
    return _wrap(cls, out, plan.outputs if plan.outputs is not None else _output_specs(out, mesh, strategy.output))


@functools.cache
def _is_inplace(func) -> bool:
    first = func._schema.arguments[0].alias_info if func._schema.arguments else None
    return first is not None and first.is_write


def _inplace_result(cls, flat: list, tree, strategy: Strategy, out):
    """In-place ops return their target (``_foreach_*_`` return nothing); targets keep their layout."""
    target = _unflatten(flat, tree)[0][0]
    count = len(pytree.tree_leaves(target))
    for i, t in enumerate(x for x in flat[:count] if isinstance(x, cls)):
        if strategy.inputs[i] != t._spec.placements:
            raise RuntimeError(
                f"an in-place op would change the placements of its target from {list(t._spec.placements)} "
                f"to {list(strategy.inputs[i])}; redistribute the target first or use the out-of-place op"
            )
    return None if out is None else target


def _wrap(cls, out, out_specs: list):
    if isinstance(out, torch.Tensor):
        return cls(out, out_specs[0], requires_grad=False)
    flat, tree = pytree.tree_flatten(out)
    wrapped = [cls(o, s, requires_grad=False) if isinstance(o, torch.Tensor) else o for o, s in zip(flat, out_specs)]
    return pytree.tree_unflatten(wrapped, tree)
