"""Running torch's OpInfo database (``op_db``) on DTensors, as torch's test_dtensor_ops.py does.

For each op, a few of its own samples (float64 where the op supports it: the comparison is then tight)
are run twice on a 1-D mesh: once with every tensor argument ``Shard(0)``, once with the first one
``Shard(-1)`` and the others ``Replicate``. Each run compares every output's ``full_tensor()`` with the op
on plain tensors, then, where the op has a gradient, the gradients of every input (``autograd.grad`` with
the same random output gradients on both sides). An op that draws random numbers, or returns
uninitialized memory (``empty_like``), is compared on shapes only.

``sweep`` returns one outcome per op: ``"n/a: ..."`` (no sample with a tensor input, a factory, or an op
that fails on plain CPU tensors too); ``"sharded"``; ``"fallback: <aten ops>"`` (it ran, but through the
replicate fallback); or ``"error: ..."`` / ``"mismatch: ..."``. With ``ours=False`` it runs torch's own
DTensor on the same samples (the oracle; it has no fallback, an op without a rule raises).
Every rank must call it with the same arguments: samples are drawn from generators seeded per op.
"""

from __future__ import annotations

import itertools
import random
import time
import warnings
from typing import Iterator

import torch
import torch.distributed.tensor as tdt
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import dtensor
from dtensor import dispatch

SAMPLES_PER_OP = 1


def _seed(seed: int) -> None:
    """Seed torch's CPU generator (``torch.manual_seed`` also walks every accelerator, a third of the time here)."""
    torch.default_generator.manual_seed(seed)


def op_key(op) -> str:
    """The op's name in outcomes and xfail lists: ``name`` or ``name.variant``."""
    return f"{op.name}.{op.variant_test_name}" if op.variant_test_name else op.name


def ops_to_run():
    """Every op of ``op_db`` that runs on CPU in float64 (or float32), with its dtype."""
    from torch.testing._internal.common_methods_invocations import op_db

    for op in op_db:
        dtypes = op.supported_dtypes("cpu")
        dtype = torch.float64 if torch.float64 in dtypes else torch.float32 if torch.float32 in dtypes else None
        if dtype is not None:
            yield op, dtype


def _samples(op, dtype, seed: int) -> list:
    """The op's first samples whose input is a tensor of at least one dim (those can be sharded)."""
    _seed(seed)
    random.seed(seed)
    picked = []
    for sample in itertools.islice(op.sample_inputs("cpu", dtype, requires_grad=op.supports_autograd), 20):
        tensors = [x for x in pytree.tree_leaves((sample.input, sample.args, sample.kwargs)) if isinstance(x, torch.Tensor)]
        if tensors and tensors[0].dim() >= 1:
            picked.append(sample)
        if len(picked) == SAMPLES_PER_OP:
            break
    return picked


def _layouts(tensors: list[torch.Tensor], Shard, Replicate) -> Iterator[list]:
    """Per layout, a placement for each tensor leaf (None: a 0-d tensor, kept plain as a scalar)."""
    yield [None if t.dim() == 0 else Shard(0) for t in tensors]
    first = next(i for i, t in enumerate(tensors) if t.dim() > 0)
    yield [None if t.dim() == 0 else Shard(t.dim() - 1) if i == first else Replicate() for i, t in enumerate(tensors)]


def _distribute(t: torch.Tensor, mesh, placement, ours: bool):
    if placement is None:
        return t.detach().clone().requires_grad_(t.requires_grad)
    lib = dtensor if ours else tdt
    dt = lib.distribute_tensor(t.detach().clone(), mesh, [placement], src_data_rank=None)  # the same on every rank
    return dt.requires_grad_(t.requires_grad)


def _run(op, sample, leaves: list, tree):
    inp, args, kwargs = pytree.tree_unflatten(leaves, tree)
    return op.op(inp, *args, **kwargs)


_UNINITIALIZED = {"empty", "empty_like", "empty_strided", "empty_permuted", "new_empty", "new_empty_strided"}


class _SeedUse(TorchDispatchMode):
    """Records whether any aten op that draws random numbers ran (torch tags them nondeterministic_seeded)."""

    def __init__(self) -> None:
        super().__init__()
        self.random = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.random = self.random or torch.Tag.nondeterministic_seeded in func.tags
        return func(*args, **(kwargs or {}))


def _is_random(op, sample, leaves, tree) -> bool:
    """Whether the op draws random numbers: then only shapes are compared (op_db's samples often reseed
    torch's generator, and DTensor random ops draw differently from plain torch by design)."""
    with _SeedUse() as mode:
        _run(op, sample, [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in leaves], tree)
    return mode.random


def _full(x):
    return x.full_tensor() if isinstance(x, (dtensor.DTensor, tdt.DTensor)) else x


def _same(got, expected, what: str, shapes_only: bool, plain: bool = False) -> None:
    """``plain``: ``got`` comes from a plain tensor (a 0-d scalar operand's gradient)."""
    if isinstance(expected, torch.Tensor):
        if not plain and not isinstance(got, (dtensor.DTensor, tdt.DTensor)):
            raise AssertionError(f"{what}: expected a DTensor, got {type(got).__name__}")
        full = _full(got)
        if full.shape != expected.shape or full.dtype != expected.dtype:
            raise AssertionError(f"{what}: shape/dtype {tuple(full.shape)} {full.dtype}, expected {tuple(expected.shape)} {expected.dtype}")
        if not shapes_only:
            torch.testing.assert_close(full.detach(), expected.detach(), atol=1e-6, rtol=1e-6, equal_nan=True, msg=lambda m: f"{what}: {m}")
    elif not shapes_only and got != expected and not (got != got and expected != expected):
        raise AssertionError(f"{what}: {got!r}, expected {expected!r}")


def _grads(outputs: list, inputs: list, grad_outputs: list):
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if isinstance(o, torch.Tensor) and o.requires_grad]
    wanted = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    if not pairs or not wanted:
        return []
    return torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)


def _grad_like(out, mesh, ours: bool, seed: int):
    """A random output gradient: a plain one and the same laid out as ``out`` (Partial as Replicate)."""
    _seed(seed)
    plain = torch.randn(out.shape, dtype=out.dtype)
    if not isinstance(out, (dtensor.DTensor, tdt.DTensor)):
        return plain, plain
    lib = dtensor if ours else tdt
    placements = [lib.Replicate() if p.is_partial() else p for p in out.placements]
    return plain, lib.distribute_tensor(plain.clone(), mesh, placements, src_data_rank=None)


def check_sample(op, sample, mesh, ours: bool) -> None:
    """Run one sample in every layout; raise AssertionError (mismatch) or the op's own error."""
    leaves, tree = pytree.tree_flatten((sample.input, sample.args, sample.kwargs))
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    try:
        random_op = _is_random(op, sample, leaves, tree) or op.name in _UNINITIALIZED
    except Exception as e:  # noqa: BLE001 - the op does not run on plain CPU tensors either
        raise NotApplicable(f"{type(e).__name__}: {e}") from e
    if random_op and not ours:
        raise NotApplicable("random values (torch's DTensor random ops need a CUDA-like generator)")
    differentiable = op.supports_autograd and any(t.requires_grad for t in tensors)
    Shard, Replicate = (dtensor.Shard, dtensor.Replicate) if ours else (tdt.Shard, tdt.Replicate)
    for layout in _layouts(tensors, Shard, Replicate):
        plain_in = [x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x for x in leaves]
        it = iter(layout)
        dist_in = [_distribute(x, mesh, next(it), ours) if isinstance(x, torch.Tensor) else x for x in leaves]
        _seed(0)
        try:
            expected = pytree.tree_leaves(sample.output_process_fn_grad(_run(op, sample, plain_in, tree)))
        except Exception as e:  # noqa: BLE001 - the op does not run on plain CPU tensors either
            raise NotApplicable(f"{type(e).__name__}: {e}") from e
        _seed(0)
        got = pytree.tree_leaves(sample.output_process_fn_grad(_run(op, sample, dist_in, tree)))
        if len(got) != len(expected):
            raise AssertionError(f"{len(got)} outputs, expected {len(expected)}")
        for i, (g, e) in enumerate(zip(got, expected)):
            _same(g, e, f"output {i} ({layout})", random_op)
        if differentiable and not random_op:
            _check_grads(expected, got, plain_in, dist_in, mesh, ours, layout)


def _check_grads(expected: list, got: list, plain_in: list, dist_in: list, mesh, ours: bool, layout) -> None:
    """Gradients of every input that requires grad, for the same random output gradients."""
    grads = [
        _grad_like(g, mesh, ours, 7 + i) if isinstance(g, torch.Tensor) and g.requires_grad else (None, None)
        for i, g in enumerate(got)
    ]
    expected_grads = _grads(expected, plain_in, [p for p, _ in grads])
    got_grads = _grads(got, dist_in, [d for _, d in grads])
    plain_inputs = [not isinstance(x, (dtensor.DTensor, tdt.DTensor)) for x in dist_in if isinstance(x, torch.Tensor) and x.requires_grad]
    for i, (g, e, plain) in enumerate(zip(got_grads, expected_grads, plain_inputs)):
        if e is not None or g is not None:
            _same(g, e if e is not None else torch.zeros_like(_full(g)), f"grad {i} ({layout})", False, plain)


class NotApplicable(Exception):
    """The op does not run on plain CPU tensors (CUDA-only, sparse layouts): nothing to compare."""


def check_one(op, dtype, mesh, ours: bool, seed: int) -> str:
    """The outcome of one op (see the module docstring)."""
    dispatch.fallback_ops.clear()
    dispatch._cache.clear()  # a cached fallback plan would not report itself again
    try:
        samples = _samples(op, dtype, seed)
        if not samples:
            return "n/a: no sample with a tensor input"
        for sample in samples:
            check_sample(op, sample, mesh, ours)
    except NotApplicable as e:
        return f"n/a: {str(e).splitlines()[0][:200]}"
    except AssertionError as e:
        return f"mismatch: {str(e).splitlines()[0][:300]}"
    except Exception as e:  # noqa: BLE001 - the op's own failure is the outcome
        return f"error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    if ours and dispatch.fallback_ops:
        return "fallback: " + " ".join(sorted(dispatch.fallback_ops))
    return "sharded"


def sweep(mesh, ours: bool = True, only: set[str] | None = None, part: tuple[int, int] = (0, 1)) -> dict[str, tuple[str, float]]:
    """(outcome, seconds) of every op of ``op_db`` (or of the ops named in ``only``); ``part=(k, n)``: only
    every n-th op from the k-th, to split the sweep into tests of their own."""
    before = set(dispatch.fallback_ops)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed, (op, dtype) in enumerate(ops_to_run()):
            key = op_key(op)
            if (only is None or key in only) and seed % part[1] == part[0]:
                start = time.perf_counter()
                outcome = check_one(op, dtype, mesh, ours, seed)
                out[key] = outcome, time.perf_counter() - start
    dispatch.fallback_ops.clear()
    dispatch.fallback_ops.update(before)
    dispatch._cache.clear()
    return out
