"""Matrix products on DTensors: results equal the op on full tensors, placements equal torch's DTensor's.

Cases are drawn (seeded, the same on every rank) over operand shapes, including uneven and empty shards,
and over input placements; many cases share one ``run_ranks`` call.
"""

import random

import torch

from dtensor import Partial, Replicate, Shard
from dtensor.debug import CommDebugMode
from tests.dist.opcheck import check_op, seeded_mesh, distribute
from tests.ranks import mesh, run_ranks

f64 = torch.float64





def _rand(*shape):
    return torch.randn(*shape, dtype=f64)


def _case(rng: random.Random):
    """(name, fn, inputs) of one product with random sizes."""
    m, k, n, b = rng.choice([3, 5, 8]), rng.choice([4, 5, 7]), rng.choice([2, 6, 8]), rng.choice([3, 4])
    kind = rng.choice(["mm", "addmm", "bmm", "baddbmm", "dot", "mv"])
    if kind == "mm":
        return kind, torch.mm, [_rand(m, k), _rand(k, n)]
    if kind == "addmm":
        return kind, torch.addmm, [_rand(*rng.choice([(n,), (m, n), (1, n)])), _rand(m, k), _rand(k, n)]
    if kind == "bmm":
        return kind, torch.bmm, [_rand(b, m, k), _rand(b, k, n)]
    if kind == "baddbmm":
        return kind, torch.baddbmm, [_rand(b, m, n), _rand(b, m, k), _rand(b, k, n)]
    if kind == "dot":
        return kind, torch.dot, [_rand(k), _rand(k)]
    return kind, torch.mv, [_rand(m, k), _rand(k)]


def _placements(rng: random.Random, ndim: int, mesh_ndim: int):
    choices = [Replicate(), Partial("sum")] + [Shard(d) for d in range(ndim)]
    return [rng.choice(choices) for _ in range(mesh_ndim)]


def _random_products(mesh_shape, count: int, seed: int):
    m, rng = seeded_mesh(mesh_shape, seed)
    if m is None:
        return []
    out = []
    for _ in range(count):
        kind, fn, inputs = _case(rng)
        placements = [_placements(rng, x.dim(), len(mesh_shape)) for x in inputs]
        record = check_op(m, fn, inputs, placements)  # asserts equal results and no fallback
        out.append((kind, [tuple(x.shape) for x in inputs], placements, record["placements"], record["torch"]))
    return out


def _mismatches(results):
    return [r for r in results if r[4] is not None and r[3] != r[4]]


def test_random_products_on_1d_meshes_match_full_tensors_and_torch():
    for mesh_shape in [(2,), (4,)]:
        results = run_ranks(4, _random_products, mesh_shape, 60, 1)[0]
        assert len(results) == 60
        assert not _mismatches(results), _mismatches(results)


def test_random_products_on_2d_mesh_match_full_tensors():
    results = run_ranks(4, _random_products, (2, 2), 60, 1)[0]
    assert len(results) == 60
    # Placements may differ from torch's where torch's cost model prices a multi-dim redistribution
    # differently or has no linearity strategy (dot); at most a minority, never a wrong result.
    assert len(_mismatches(results)) <= 10, _mismatches(results)


def _tensor_parallel():
    """The layouts of Megatron-style linears (``F.linear`` = ``addmm(b, x, w.t())``), on 1-D and 2-D meshes."""
    torch.manual_seed(0)
    x, wt, b = _rand(6, 8), _rand(8, 10), _rand(10)
    R, P, S0, S1 = Replicate(), Partial(), Shard(0), Shard(1)
    cases = {
        # colwise: w Shard(0) -> w.t() Shard(1); bias Shard(0); output sharded on features
        "colwise": ((4,), torch.addmm, [b, x, wt], [[S0], [R], [S1]]),
        # rowwise: input sharded on features, w Shard(1) -> w.t() Shard(0): a pending sum
        "rowwise": ((4,), torch.mm, [x, wt], [[S1], [S0]]),
        "rowwise_bias": ((2,), torch.addmm, [b, x, wt], [[R], [S1], [S0]]),
        "sequence_parallel_in": ((2,), torch.mm, [x, wt], [[S0], [R]]),
        "partial_input": ((2,), torch.mm, [x, wt], [[P], [R]]),
        "dp_tp_colwise": ((2, 2), torch.addmm, [b, x, wt], [[R, S0], [S0, R], [R, S1]]),
        "dp_tp_rowwise": ((2, 2), torch.mm, [x, wt], [[S0, S1], [R, S0]]),
        "batched_heads": ((2, 2), torch.bmm, [_rand(4, 6, 8), _rand(4, 8, 5)], [[S0, R], [S0, R]]),
    }
    out = {}
    for name, (mesh_shape, fn, inputs, placements) in cases.items():
        m = mesh(mesh_shape)
        if m.get_coordinate() is not None:
            record = check_op(m, fn, inputs, placements)
            out[name] = (record["placements"], record["torch"])
    return out


def test_tensor_parallel_layouts_match_torch():
    out = run_ranks(4, _tensor_parallel)[0]
    R, P, S0, S1 = Replicate(), Partial(), Shard(0), Shard(1)
    expected = {
        "colwise": (S1,), "rowwise": (P,), "rowwise_bias": (P,), "sequence_parallel_in": (S0,),
        "partial_input": (P,), "dp_tp_colwise": (S0, S1), "dp_tp_rowwise": (S0, P), "batched_heads": (S0, R),
    }
    for name, (ours, theirs) in out.items():
        assert ours == [expected[name]], (name, ours)
        assert theirs == ours, (name, ours, theirs)


def _comm_counts():
    m = mesh((4,))
    torch.manual_seed(0)
    x, wt, b = _rand(6, 8), _rand(8, 10), _rand(10)
    counts = {}
    for name, fn, inputs, placements in [
        ("colwise", torch.addmm, [b, x, wt], [[Shard(0)], [Replicate()], [Shard(1)]]),
        ("rowwise", torch.mm, [x, wt], [[Shard(1)], [Shard(0)]]),
        ("rowwise_bias", torch.addmm, [b, x, wt], [[Replicate()], [Shard(1)], [Shard(0)]]),
        ("gather_weight", torch.mm, [x, wt], [[Shard(0)], [Shard(0)]]),  # one all-gather: the mode sees collectives
    ]:
        dts = [distribute(t, m, p) for t, p in zip(inputs, placements)]
        with CommDebugMode() as comm:
            fn(*dts)
        counts[name] = comm.get_total_counts()
    return counts


def test_tensor_parallel_products_communicate_nothing():
    assert run_ranks(4, _comm_counts)[0] == {"colwise": 0, "rowwise": 0, "rowwise_bias": 0, "gather_weight": 1}
