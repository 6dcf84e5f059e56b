"""The dispatch machinery itself: rules run on local shards, the cache holds, the fallback warns."""

import torch

from dtensor import Partial, Shard
from dtensor.dispatch import _cache
from tests.dist.opcheck import check_op
from tests.ranks import mesh, run_ranks


def _add(a, b):
    return a + b


def _scale_partial(a):
    return a * 3.0


def _smoke():
    m = mesh((2,))
    torch.manual_seed(0)  # inputs must be the same on every rank
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    out = {}
    out["add"] = check_op(m, _add, [x, y], [[Shard(0)], [Shard(0)]])
    out["scale_partial"] = check_op(m, _scale_partial, [x], [[Partial()]])
    size = len(_cache)
    check_op(m, _add, [x, y], [[Shard(0)], [Shard(0)]])
    out["cached"] = len(_cache) == size
    rot90 = lambda t: torch.rot90(t, 1, [0, 1])  # noqa: E731 - an op with no rule
    out["fallback"] = check_op(m, rot90, [x], [[Shard(1)]], allow_fallback=True, compare_with_torch=False)["fallback"]
    return out


def test_rules_run_on_local_shards_and_are_cached():
    out = run_ranks(2, _smoke)[0]
    assert out["add"]["placements"] == [(Shard(0),)] and out["add"]["torch"] == [(Shard(0),)]
    assert out["scale_partial"]["placements"] == [(Partial(),)]
    assert out["cached"]
    assert out["fallback"] == ["aten.rot90.default"]
