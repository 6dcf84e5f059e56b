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
the full value on every rank: one-element tensors (``d * torch.tensor([3.0])``, as torch), inside
``dtensor.experimental.implicit_replication()``, and in a backward pass, where autograd itself builds
plain zero gradients (the backward of ``split``/``unbind`` for unused outputs). There they count as
``Replicate``.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from .placements import Placement, Replicate
from .redistribute import local_as
from .spec import DTensorSpec

__all__ = ["Strategy", "dispatch", "apply_rule", "forget_plans", "replicate_plain", "fallback_ops", "Placements", "implicit_replication_depth"]

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
    func: Any  # the op it was made for (keys hold its id, which a new op could reuse once it is gone)
    strategy: Strategy
    outputs: list | None  # one DTensorSpec per flattened output leaf (None for non-tensor leaves); None: per call
    moves: tuple[tuple[int, Placements], ...]  # (position in the flat arguments, placements) of inputs to move
    inplace: bool


_cache: dict[Any, _Plan] = {}
_handlers: dict[int, tuple[Any, Callable | None]] = {}  # id(op) -> (op, its handler or None for a rule)
_UNSEEN = (None, None)


def dispatch(cls, func, args: tuple, kwargs: dict):
    # Keyed by id(): skips OpOverload's Python-level __hash__ on the hot path; the op itself is kept and
    # compared, so an id reused by a new op (after a scoped library dropped the old one) is not confused.
    seen, handler = _handlers.get(id(func), _UNSEEN)
    if seen is not func:
        from .ops import handler_for

        handler = handler_for(func)
        _handlers[id(func)] = (func, handler)
    if handler is not None:
        return handler(cls, func, args, kwargs)
    return apply_rule(cls, func, args, kwargs)


def forget_plans() -> None:
    """Drop every cached plan and handler lookup: a rule was registered (``experimental.register_sharding``)."""
    _cache.clear()
    _handlers.clear()


def apply_rule(cls, func, args: tuple, kwargs: dict, rule: Callable | None = None):
    """Run ``func`` through a sharding rule: its own (``ops.rule_for``), or ``rule``. Handlers call it to
    hand the cases a rule covers back to the rule path (a loss with ``reduction='none'`` is elementwise)."""
    flat, tree = _flatten(args, kwargs)
    key, specs, plain = _scan(func, flat, tree, cls)
    if plain:
        flat = replicate_plain(func, flat, specs[0].mesh, cls)
        args, kwargs = _unflatten(flat, tree)
        key, specs, _ = _scan(func, flat, tree, cls)
    plan = _cache.get(key) if key is not None else None
    if plan is None or plan.func is not func:
        from .ops import rule_for

        _check_meshes(func, specs)
        plan = _plan(func, args, kwargs, flat, tree, specs, cls, rule or rule_for(func))
        if key is not None:
            _cache[key] = plan
    return _run(cls, func, flat, tree, specs[0].mesh, plan)


def _scan(func, flat: list, tree, cls) -> tuple[Any, list[DTensorSpec], bool]:
    """One pass over the arguments: the plan cache key (None if unhashable), the DTensor specs, and
    whether a plain tensor that is not a scalar operand is among them."""
    parts: list = [id(func), tree if isinstance(tree, tuple) else repr(tree)]
    specs, plain = [], False
    for x in flat:
        if isinstance(x, cls):
            spec = x._spec
            specs.append(spec)
            parts.append(spec)
        elif isinstance(x, torch.Tensor):
            plain = plain or x.dim() > 0
            parts.append(("tensor", x.dtype, x.device, tuple(x.shape)))
        elif isinstance(x, list):
            parts.append(tuple(x) if all(type(e) is int for e in x) else tuple(_scalar_key(e) for e in x))
        else:
            parts.append(_scalar_key(x))
    key = tuple(parts)
    try:
        hash(key)
    except TypeError:
        key = None
    return key, specs, plain


def _scalar_key(x):
    """A cache key part for a non-tensor argument. ``2``, ``2.0`` and ``True`` are equal in Python but
    promote differently, so numbers carry their type; floats go by repr, so that NaN finds itself."""
    kind = type(x)
    if kind is int:
        return x
    if kind is float:
        return float, repr(x)
    if kind is bool or kind is complex:
        return kind, x
    return x


def _flatten(args: tuple, kwargs: dict) -> tuple[list, Any]:
    """The op's arguments as a flat list. The common case (no tensors inside lists or dicts) skips
    pytree: every argument is one leaf, lists of sizes included."""
    values = (*args, *kwargs.values()) if kwargs else args
    for a in values:
        if type(a) in _CONTAINERS and _holds_tensor(a):
            return pytree.tree_flatten((args, kwargs))
    return list(values), (len(args), tuple(kwargs))


_CONTAINERS = (list, tuple, dict)


def _holds_tensor(container) -> bool:
    for x in container.values() if type(container) is dict else container:
        kind = type(x)
        if kind is int or kind is float:
            continue
        if isinstance(x, torch.Tensor) or kind in _CONTAINERS and _holds_tensor(x):
            return True
    return False


def _unflatten(flat: list, tree) -> tuple[tuple, dict]:
    if isinstance(tree, tuple):
        count, names = tree
        return tuple(flat[:count]), dict(zip(names, flat[count:]))
    return pytree.tree_unflatten(flat, tree)


def _check_meshes(func, specs: list[DTensorSpec]) -> None:
    meshes = {s.mesh for s in specs}
    if len(meshes) > 1:
        raise ValueError(f"{func}: DTensor inputs live on different meshes {meshes}; redistribute them onto one mesh")


def _is_plain(x, cls) -> bool:
    """A plain tensor that is not a scalar operand (0-d tensors are scalars, as in torch)."""
    return isinstance(x, torch.Tensor) and not isinstance(x, cls) and x.dim() > 0


def replicate_plain(func, flat: list, mesh, cls) -> list:
    """Plain tensors as Replicate DTensors where they are known to be the full value (module docstring)."""
    implicit = implicit_replication_depth > 0 or torch._C._current_autograd_node() is not None
    if not implicit and any(_is_plain(x, cls) and x.numel() != 1 for x in flat):
        shape = next(list(x.shape) for x in flat if _is_plain(x, cls) and x.numel() != 1)
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
    fell_back = strategy is None
    if fell_back:
        strategy = _replicate_everything(func, specs)
    metas = [_meta(x._spec) if isinstance(x, cls) else _to_meta(x) for x in flat]
    meta_args, meta_kwargs = _unflatten(metas, tree)
    # ops that return nothing (in-place _foreach_*/_fused_*) need no output specs; _fused_sgd_ has no meta kernel
    positions = [i for i, x in enumerate(flat) if isinstance(x, cls)]
    moves = tuple((i, want) for i, spec, want in zip(positions, specs, strategy.inputs) if want != spec.placements)
    inplace = _is_inplace(func)
    if inplace:
        _check_targets_stay(flat, tree, strategy, cls)
    try:
        meta_out = func(*meta_args, **meta_kwargs) if func._schema.returns else None
    except (NotImplementedError, RuntimeError):
        if not fell_back:
            raise
        return _Plan(func, strategy, None, moves, inplace)  # a data-dependent output shape: specs from each local result
    return _Plan(func, strategy, _output_specs(meta_out, specs[0].mesh, strategy.output), moves, inplace)


def _meta(spec: DTensorSpec) -> torch.Tensor:
    return torch.empty_strided(spec.shape, spec.stride, dtype=spec.dtype, device="meta")


def _to_meta(x):
    """An argument for the planning call on meta tensors: tensors, and devices (``_to_copy(device=)``,
    ``new_empty(device=)``), move to meta, or the op would try to copy a meta tensor's data."""
    if isinstance(x, torch.Tensor):
        return x.to("meta")
    return _META if isinstance(x, torch.device) else x


_META = torch.device("meta")


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


def _run(cls, func, flat: list, tree, mesh, plan: _Plan):
    if plan.inplace:
        _refuse_writes_into_copies(func, flat, cls)
    local_flat = [x._local_tensor if isinstance(x, cls) else x for x in flat]
    # Moved and waited for here, not on first use: a functional collective's result dropped unwaited (the
    # op raising, an argument left unused) corrupts the heap under gloo (a later malloc aborts).
    for i, want in plan.moves:
        local_flat[i] = local_as(flat[i], want)
    local_args, local_kwargs = _unflatten(local_flat, tree)
    strategy = plan.strategy
    if strategy.local_args is not None:
        local_args, local_kwargs = strategy.local_args(local_args, local_kwargs)
    out = func(*local_args, **local_kwargs)
    if plan.inplace:  # the target, unless the op returns nothing (``_foreach_*_``)
        return None if out is None else _unflatten(flat, tree)[0][0]
    wrapped = _wrap(cls, out, plan.outputs if plan.outputs is not None else _output_specs(out, mesh, strategy.output))
    if _returns_view(func) and isinstance(flat[0], cls) and (flat[0]._copied or any(i == 0 for i, _ in plan.moves)):
        for view in pytree.tree_leaves(wrapped):  # views of a moved (so copied) input: writes would be lost
            if isinstance(view, cls):
                view._copied = True
    return wrapped


@functools.cache
def _returns_view(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write


def _refuse_writes_into_copies(func, flat: list, cls) -> None:
    """An in-place op on a view that had to be made of a redistributed copy (``d[1]`` of a ``Shard(0)``
    tensor, a column of a ``Shard(1)`` one) would change the copy, not the tensor: refused, where it
    would otherwise silently do nothing."""
    target = flat[0]
    if isinstance(target, cls) and target._copied:
        raise RuntimeError(
            f"{func}: an in-place write into a view of a DTensor that had to be redistributed to make the view "
            f"(placements {list(target._spec.placements)}; e.g. d[i] of a Shard(0) tensor) would change a copy "
            "and leave the tensor as it was. Write out of place (torch.where, index_put, cat) or redistribute "
            "the tensor to Replicate() first and write into that"
        )


@functools.cache
def _is_inplace(func) -> bool:
    first = func._schema.arguments[0].alias_info if func._schema.arguments else None
    return first is not None and first.is_write


def _check_targets_stay(flat: list, tree, strategy: Strategy, cls) -> None:
    """In-place ops keep their targets' layouts (checked before anything runs)."""
    target = _unflatten(flat, tree)[0][0]
    count = len(pytree.tree_leaves(target))
    for i, t in enumerate(x for x in flat[:count] if isinstance(x, cls)):
        if strategy.inputs[i] != t._spec.placements:
            raise RuntimeError(
                f"an in-place op would change the placements of its target from {list(t._spec.placements)} "
                f"to {list(strategy.inputs[i])}; redistribute the target first or use the out-of-place op"
            )


def _wrap(cls, out, out_specs: list):
    if isinstance(out, torch.Tensor):
        return cls(out, out_specs[0], requires_grad=False)
    flat, tree = pytree.tree_flatten(out)
    wrapped = [cls(o, s, requires_grad=False) if isinstance(o, torch.Tensor) else o for o, s in zip(flat, out_specs)]
    return pytree.tree_unflatten(wrapped, tree)
