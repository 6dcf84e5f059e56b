"""Reductions on DTensors: results equal the op on full tensors; placements equal torch's DTensor's where
both mean the same thing; a p-norm costs one small all-reduce, not an all-gather.

Cases are drawn (seeded, the same on every rank) over 3-d shapes with uneven and empty shards and over
input placements, many per ``run_ranks`` call. Known, intended differences from torch (see
``dtensor/ops/reductions.py``): a norm over a sharded dim is already reduced, Replicate
(torch: a pending ``_NormPartial``); torch's DTensor is not asked about empty shards
(it can hang on them) nor about ``prod``/``all``/``any`` (its ``Partial("product")`` has no counterpart
here; it leaves ``any`` a pending sum of bools, where ours replicates the reduced dims).
"""

import math

import pytest
import torch

from dtensor import Partial, Replicate, Shard, collectives
from dtensor.placements import local_box, mesh_coordinates
from tests.dist.opcheck import check_op, seeded_mesh, distribute
from dtensor.debug import CommDebugMode
from tests.ranks import mesh, run_ranks

OPS = {
    "sum": lambda x: x.sum(),
    "sum_dim": lambda x: x.sum(1),
    "sum_keepdim": lambda x: x.sum((0, 2), keepdim=True),
    "sum_bool": lambda x: (x > 0).sum(0),
    "amax": lambda x: x.amax(0),
    "amin": lambda x: x.amin((0, 1)),
    "max": lambda x: x.max(),
    "min": lambda x: x.min(),
    "max_dim": lambda x: x.max(1),
    "min_dim": lambda x: x.min(0, keepdim=True),
    "argmax": lambda x: x.argmax(0),
    "argmin": lambda x: x.argmin(),
    "var": lambda x: x.var(0),
    "var_all": lambda x: x.var(correction=0),
    "std": lambda x: x.std((0, 1), keepdim=True),
    "var_mean": lambda x: torch.var_mean(x, (0, 2)),
    "std_mean": lambda x: torch.std_mean(x, 1, keepdim=True, correction=2),
    "nansum": lambda x: x.nansum(1),
    "count_nonzero": lambda x: (x > 0).count_nonzero((0, 2)),
    "logsumexp": lambda x: x.logsumexp(1),
    "median": lambda x: x.median(),
    "median_dim": lambda x: x.median(2),
    "kthvalue": lambda x: x.kthvalue(1, 0),
    "aminmax": lambda x: torch.aminmax(x, dim=1),
    "trace": lambda x: x[0].trace(),
    "any": lambda x: (x > 1).any(1),
    "prod": lambda x: x.prod(1),
    "all": lambda x: (x > -3).all(),
    "mean": lambda x: x.mean(),
    "mean_dim": lambda x: x.mean(0),
    "mean_keepdim": lambda x: x.mean((1, 2), keepdim=True),
    "norm": lambda x: torch.linalg.vector_norm(x),
    "norm_1_dim": lambda x: torch.linalg.vector_norm(x, 1, dim=0),
    "norm_inf": lambda x: torch.linalg.vector_norm(x, math.inf),
    "norm_3_keepdim": lambda x: torch.linalg.vector_norm(x, 3, dim=(0, 2), keepdim=True),
    "torch_norm": lambda x: torch.norm(x),
    "foreach_norm": lambda x: torch._foreach_norm([x, x[0], x.sum(0)]),
}
_NO_TORCH = {"prod", "all", "any"}
_NORMS = {"norm", "norm_1_dim", "norm_inf", "norm_3_keepdim", "torch_norm", "foreach_norm"}
_KEEPS_PARTIAL_SUM = {"sum", "sum_dim", "sum_keepdim"}


def _has_empty_shard(shape, mesh_shape, placements) -> bool:
    return any(
        0 in local_box(shape, mesh_shape, placements, c).sizes for c in mesh_coordinates(mesh_shape)
    ) and 0 not in shape


def _compare_with_torch(name, shape, mesh_shape, placements) -> bool:
    if name in _NO_TORCH or _has_empty_shard(shape, mesh_shape, placements):
        return False
    return name in _KEEPS_PARTIAL_SUM or not any(p.is_partial() for p in placements)


def _random_reductions(mesh_shape, names, count: int, seed: int):
    m, rng = seeded_mesh(mesh_shape, seed)
    if m is None:
        return []
    out = []
    for name in names:
        for _ in range(count):
            shape = tuple(rng.choice([1, 3, 4, 5, 7]) for _ in range(3))
            x = torch.randn(*shape, dtype=torch.float64)
            placements = [rng.choice([Replicate(), Partial(), Shard(0), Shard(1), Shard(2)]) for _ in mesh_shape]
            compare = _compare_with_torch(name, shape, mesh_shape, placements)
            record = check_op(m, OPS[name], [x], [placements], compare_with_torch=compare)
            out.append((name, shape, placements, record["placements"], record["torch"]))
    return out


def _differences(results):
    bad = []
    for name, shape, placements, ours, theirs in results:
        if theirs is None:
            continue
        if name in _NORMS:  # torch's _NormPartial is a norm still to combine; ours is combined
            theirs = [tuple(Replicate() if p.is_partial() else p for p in t) for t in theirs]
        if ours != theirs:
            bad.append((name, shape, placements, ours, theirs))
    return bad


def test_random_reductions_match_full_tensors_and_torch():
    for mesh_shape in [(2,), (4,), (2, 2)]:
        results = run_ranks(4, _random_reductions, mesh_shape, list(OPS), 3, 2)[0]
        assert len(results) == 3 * len(OPS)
        assert not _differences(results), _differences(results)


def _means_and_partials():
    m = mesh((4,))
    torch.manual_seed(0)
    x = torch.randn(5, 6, dtype=torch.float64)  # 5 rows on 4 ranks: 2, 2, 1, 0
    R, P, S0 = Replicate(), Partial(), Shard(0)
    cases = {  # (fn, placements, ask torch: not where a shard is empty)
        "mean_uneven": (lambda t: t.mean(0), [S0], False),
        "mean_all_empty_shard": (lambda t: t.mean(), [S0], False),
        "mean_kept_dim": (lambda t: t.mean(1), [S0], False),
        "sum_of_partial": (lambda t: t.sum(1), [P], True),
        "amax_of_partial": (lambda t: t.amax(1), [P], True),
        "amax_empty_shard": (lambda t: t.amax(0), [S0], False),
        "max_all_empty_shard": (lambda t: t.max(), [S0], False),
        "norm_inf_empty_shard": (lambda t: t.norm(math.inf), [S0], False),
        "norm_dim_kept_shard": (lambda t: t.norm(dim=1), [S0], False),
        "replicated": (lambda t: t.sum(0), [R], True),
    }
    return {
        name: check_op(m, fn, [x], [p], compare_with_torch=ask)["placements"]
        for name, (fn, p, ask) in cases.items()
    }


def test_means_partials_and_empty_shards():
    out = run_ranks(4, _means_and_partials)[0]
    R, P, S0 = Replicate(), Partial(), Shard(0)
    assert out == {
        "mean_uneven": [(R,)],  # a mean of uneven pieces is not the mean of their means: gathered
        "mean_all_empty_shard": [(R,)],
        "mean_kept_dim": [(S0,)],
        "sum_of_partial": [(P,)],
        "amax_of_partial": [(R,)],
        "amax_empty_shard": [(Partial("max"),)],
        "max_all_empty_shard": [(Partial("max"),)],
        "norm_inf_empty_shard": [(R,)],
        "norm_dim_kept_shard": [(S0,)],
        "replicated": [(R,)],
    }


def _count(comm) -> dict[str, int]:
    return {str(k).split(".")[-1]: v for k, v in comm.get_comm_counts().items() if v}


class _AllReduceShapes:
    """Records the shape of every tensor ``dtensor.collectives.all_reduce`` is given."""

    def __enter__(self):
        self.shapes, self._original = [], collectives.all_reduce

        def recording(tensor, *args):
            self.shapes.append(tuple(tensor.shape))
            return self._original(tensor, *args)

        collectives.all_reduce = recording
        return self

    def __exit__(self, *exc):
        collectives.all_reduce = self._original


def _norm_communication():
    m = mesh((4,))
    torch.manual_seed(0)
    x = distribute(torch.randn(9, 5, dtype=torch.float64), m, [Shard(0)])
    layouts = [((7, 3), Shard(0)), ((6,), Shard(0)), ((4, 8), Shard(1))]
    grads = [distribute(torch.randn(*s, dtype=torch.float64), m, [p]) for s, p in layouts]
    counts = {}
    with CommDebugMode() as comm, _AllReduceShapes() as reduced:
        torch.linalg.vector_norm(x)
    counts["vector_norm"] = _count(comm)
    counts["vector_norm_shapes"] = reduced.shapes
    with CommDebugMode() as comm, _AllReduceShapes() as reduced:
        norms = torch._foreach_norm(grads)
    counts["foreach_norm"] = _count(comm)
    counts["foreach_norm_shapes"] = reduced.shapes
    counts["foreach_values"] = [n.full_tensor().item() for n in norms]
    counts["foreach_expected"] = [g.full_tensor().norm().item() for g in grads]
    with CommDebugMode() as comm, _AllReduceShapes() as reduced:
        var = x.var(0)
    counts["var"], counts["var_shapes"] = _count(comm), reduced.shapes
    counts["var_close"] = torch.allclose(var.full_tensor(), x.full_tensor().var(0), rtol=1e-12, atol=0)
    return counts


def test_norm_of_sharded_tensors_is_one_scalar_all_reduce():
    out = run_ranks(4, _norm_communication)[0]
    assert out["vector_norm"] == {"all_reduce": 1}
    assert out["foreach_norm"] == {"all_reduce": 1}  # every tensor's scalar in one collective
    assert out["vector_norm_shapes"] == [(1,)]  # one number, not the tensor
    assert out["foreach_norm_shapes"] == [(3,)]  # three scalars
    assert out["foreach_values"] == pytest.approx(out["foreach_expected"], rel=1e-12)
    # a variance over the sharded dim: the sums, then the deviations, each of the output's size
    assert out["var"] == {"all_reduce": 2} and out["var_shapes"] == [(1, 5), (1, 5)] and out["var_close"]
