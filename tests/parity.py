"""Running one scenario on our DTensor and on torch's, and comparing what came out.

A scenario is a module-level function ``scenario(lib, *args)`` written once against the shared API
(``lib.distribute_tensor``, ``lib.Shard``, ``lib.DTensor.from_local`` ...), where ``lib`` is ``dtensor``
or ``torch.distributed.tensor``. ``both(scenario, *args)`` runs it with each library on the same rank;
``assert_same`` walks both results and compares every leaf: DTensors by global value (``full_tensor``),
shape, stride, dtype and placements; plain tensors by value; anything else by ``==``. Comm counts come
from each library's ``CommDebugMode`` (``comm_counts``).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch.distributed.tensor as tdt
from torch.utils import _pytree as pytree

import dtensor
from dtensor.debug import CommDebugMode
from dtensor.dispatch import fallback_ops
from tests.ranks import run_ranks

LIBS = {"ours": dtensor, "torch": tdt}


def both(scenario: Callable, *args) -> tuple[Any, Any]:
    """``scenario(dtensor, *args)`` and ``scenario(torch.distributed.tensor, *args)`` (torch's advice muted)."""
    ours = scenario(dtensor, *args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = scenario(tdt, *args)
    return ours, theirs


def comm_counts(lib, fn: Callable, *args) -> tuple[Any, dict[str, int]]:
    """``fn(*args)`` and the collectives it issued, by name, counted by the library's ``CommDebugMode``."""
    mode = CommDebugMode() if lib is dtensor else tdt.debug.CommDebugMode()
    with mode:
        out = fn(*args)
    return out, {str(k).split(".")[-1]: v for k, v in mode.get_comm_counts().items()}


def placement_names(placements) -> tuple[str, ...]:
    """Placements of either library as comparable text (``Shard(dim=0)``, ``Replicate()``, ``Partial(sum)``)."""
    return tuple(f"Shard({p.dim})" if p.is_shard() else "Replicate" if p.is_replicate() else f"Partial({p.reduce_op})" for p in placements)


def describe(x) -> Any:
    """A leaf as plain data: DTensors become (full value, shape, stride, dtype, placements)."""
    if isinstance(x, (dtensor.DTensor, tdt.DTensor)):
        return ("DTensor", x.full_tensor(), tuple(x.shape), tuple(x.stride()), x.dtype, placement_names(x.placements))
    if isinstance(x, (dtensor.Placement, tdt.Placement)):
        return placement_names([x])[0]
    return x


def assert_same(ours, theirs, *, atol: float = 0.0, what: str = "result") -> None:
    """Every leaf of ``ours`` equals the same leaf of ``theirs`` (tensors within ``atol``)."""
    a, b = pytree.tree_leaves(ours), pytree.tree_leaves(theirs)
    assert len(a) == len(b), f"{what}: {len(a)} leaves, torch's DTensor gives {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        _assert_leaf(describe(x), describe(y), atol, f"{what}[{i}]")


def _assert_leaf(x, y, atol: float, where: str) -> None:
    if isinstance(x, tuple) and x[:1] == ("DTensor",):
        assert isinstance(y, tuple) and y[:1] == ("DTensor",), f"{where}: a DTensor, torch's DTensor gives {y!r}"
        assert x[2:] == y[2:], f"{where}: (shape, stride, dtype, placements) {x[2:]}, torch's DTensor {y[2:]}"
        x, y = x[1], y[1]
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.shape == y.shape and x.dtype == y.dtype, f"{where}: {x!r} vs {y!r}"
        assert torch.allclose(x, y, atol=atol, rtol=0, equal_nan=True), f"{where}: values differ\n{x}\n{y}"
    else:
        assert x == y, f"{where}: {x!r}, torch's DTensor gives {y!r}"


def _no_fallback(body, *args):
    """``body(*args)`` on every rank, plus the ops that fell back while it ran (must be none)."""
    seen = set(fallback_ops)
    out = body(*args)
    return out, sorted(fallback_ops - seen)


def run_without_fallback(body, *args, world: int = 2) -> list:
    """``body(*args)`` on ``world`` ranks (``run_ranks``), asserting no op took the replicate fallback;
    the per-rank results."""
    results = run_ranks(world, _no_fallback, body, *args)
    for out, fell_back in results:
        assert fell_back == [], f"ops took the replicate fallback: {fell_back}"
    return [out for out, _ in results]


def raised(fn: Callable) -> Exception:
    """The error ``fn()`` raises (an AssertionError when it raises none): scenarios return it, so its
    type can be compared with the one torch's DTensor raises."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return e
    raise AssertionError("no error raised")
