"""Random ops on DTensors are mesh-invariant: one seed gives one full tensor whatever the mesh and placements.

Every case runs on the same 4-rank world (meshes (2,), (4,), (2, 2)) in one ``run_ranks`` call.
"""

import torch
import torch.nn.functional as F

import dtensor
from dtensor import Partial, Replicate, Shard
from dtensor.dispatch import fallback_ops
from tests.dist.opcheck import distribute
from tests.ranks import mesh, run_ranks

LAYOUTS = {
    (2,): [[Shard(0)], [Replicate()], [Shard(1)]],
    (4,): [[Shard(0)], [Shard(1)]],  # 10 rows on 4 ranks: 3, 3, 3, 1
    (2, 2): [[Shard(0), Shard(1)], [Replicate(), Shard(0)], [Shard(0), Shard(0)], [Shard(1), Replicate()]],
}
RANDOM_OPS = [
    "dropout", "native_dropout", "native_dropout_mask", "uniform_", "normal_", "bernoulli_", "bernoulli_p",
    "bernoulli_probs", "bernoulli_tensor", "rand_like", "randn_like", "randint_like",
]
OUR_RANDOM_OPS = {"aten.native_dropout.default", "aten.uniform_.default", "aten.normal_.default", "aten.bernoulli_.float", "aten.bernoulli_.Tensor",
                  "aten.bernoulli.p", "aten.bernoulli.default", "aten.rand_like.default", "aten.randn_like.default",
                  "aten.randint_like.low_dtype"}  # fmt: skip


def _apply(name: str, x):
    if name == "dropout":
        return F.dropout(x, 0.3, training=True)
    if name.startswith("native_dropout"):
        return torch.native_dropout(x, 0.3, True)[1 if name.endswith("mask") else 0]
    if name == "uniform_":
        return x.clone().uniform_(-2.0, 3.0)
    if name == "normal_":
        return x.clone().normal_(1.0, 2.0)
    if name == "bernoulli_":
        return x.clone().bernoulli_(0.3)
    if name == "bernoulli_p":
        return torch.bernoulli(x, 0.3)
    if name == "bernoulli_probs":
        return torch.bernoulli(x.abs() / (1 + x.abs()))
    if name == "bernoulli_tensor":
        return x.clone().bernoulli_(x.abs() / (1 + x.abs()))
    if name == "rand_like":
        return torch.rand_like(x)
    if name == "randn_like":
        return torch.randn_like(x)
    return torch.randint_like(x, 2, 10)


def _draw_all(x, reseed: bool = True) -> dict:
    """Every op on ``x``, each under seed 42: (full tensor, local tensor, placements)."""
    out = {}
    for name in RANDOM_OPS:
        if reseed:
            torch.manual_seed(42)
        y = _apply(name, x)
        out[name] = (y.full_tensor().cpu(), y.to_local().cpu(), tuple(y.placements))
    return out


def _mesh_invariance():
    torch.manual_seed(0)
    base = torch.randn(10, 6, dtype=torch.float64)
    before = set(fallback_ops)
    results = {}
    for shape, layouts in LAYOUTS.items():
        m = mesh(shape)
        for placements in layouts:
            results[(shape, tuple(placements))] = _draw_all(dtensor.distribute_tensor(base, m, placements))
    m = mesh((2, 2))
    results["partial"] = _draw_all(distribute(base, m, [Partial(), Shard(0)]))
    # repeated calls without reseeding differ; reseeding repeats
    x = dtensor.distribute_tensor(base, m, [Shard(0), Shard(1)])
    torch.manual_seed(5)
    a, b = torch.rand_like(x).full_tensor(), torch.rand_like(x).full_tensor()
    torch.manual_seed(5)
    results["repeat"] = (torch.equal(a, b), torch.equal(a, torch.rand_like(x).full_tensor()))
    # ranks outside a mesh advance the generator as its members do
    torch.manual_seed(9)
    _draw_all(dtensor.distribute_tensor(base, mesh((2,)), [Shard(0)]), reseed=False)
    results["in_step"] = torch.rand(()).item()
    results["fallback"] = sorted((set(fallback_ops) - before) & OUR_RANDOM_OPS)
    return results


def test_random_ops_are_mesh_invariant_replicas_agree_shards_differ():
    per_rank = run_ranks(4, _mesh_invariance)
    first = per_rank[0]
    assert first["fallback"] == []
    assert first["repeat"] == (False, True)
    assert len({r["in_step"] for r in per_rank}) == 1
    reference = first[((2,), (Shard(0),))]
    for key, drawn in first.items():
        if isinstance(key, tuple) and key[0] in LAYOUTS or key == "partial":
            for name in RANDOM_OPS:
                assert torch.equal(drawn[name][0], reference[name][0]), (key, name)
    # rank = 2 * row + col on the (2, 2) mesh: Replicate on mesh dim 0 pairs rank r with r ^ 2, on dim 1 with r ^ 1
    for placements, same, other in [((Replicate(), Shard(0)), 2, 1), ((Shard(1), Replicate()), 1, 2)]:
        locals_ = [r[((2, 2), placements)]["uniform_"][1] for r in per_rank]
        for rank in range(4):
            assert torch.equal(locals_[rank], locals_[rank ^ same]), (placements, rank)
            assert not torch.equal(locals_[rank], locals_[rank ^ other]), (placements, rank)
    for name in ("dropout", "native_dropout", "native_dropout_mask", "uniform_", "rand_like"):
        assert first[((2,), (Shard(0),))][name][2] == (Shard(0),)
        assert first[((2, 2), (Shard(0), Shard(1)))][name][2] == (Shard(0), Shard(1))
    assert first["partial"]["native_dropout"][2] == (Partial(), Shard(0))  # linear given the mask
    assert first["partial"]["native_dropout_mask"][2] == (Replicate(), Shard(0))
    assert first["partial"]["rand_like"][2] == (Replicate(), Shard(0))


def _statistics():
    m = mesh((2, 2))
    torch.manual_seed(1)
    x = dtensor.distribute_tensor(torch.ones(200, 100, dtype=torch.float64), m, [Shard(0), Shard(1)]).requires_grad_()
    out = {}
    y = F.dropout(x, 0.3, training=True)
    y.sum().backward()
    full, grad = y.full_tensor(), x.grad.full_tensor()
    out["dropout"] = ((full != 0).double().mean().item(), set(full.unique().tolist()), torch.equal(grad, full))
    y, mask = torch.native_dropout(x, 0.3, True)
    x.grad = None
    y.sum().backward()
    out["native_dropout"] = (mask.full_tensor().double().mean().item(), torch.equal(x.grad.full_tensor(), y.full_tensor()))
    out["eval_dropout"] = torch.equal(F.dropout(x, 0.3, training=False).full_tensor(), x.full_tensor())
    z = dtensor.zeros(200, 100, device_mesh=m, placements=[Shard(0), Replicate()], dtype=torch.float32)
    u = z.clone().uniform_(-1.0, 3.0).full_tensor()
    n = z.clone().normal_(1.0, 2.0).full_tensor()
    r = torch.rand_like(z).full_tensor()
    g = torch.randn_like(z).full_tensor()
    i = torch.randint_like(z, 0, 10).full_tensor()
    b = torch.bernoulli(z, 0.25).full_tensor()
    out["uniform"] = (u.min().item(), u.max().item(), u.mean().item())
    out["normal"] = (n.mean().item(), n.std().item())
    out["rand_like"] = (r.min().item(), r.max().item(), r.mean().item(), r.dtype)
    out["randn_like"] = (g.mean().item(), g.std().item())
    out["randint_like"] = (set(i.unique().tolist()), i.dtype)
    out["bernoulli"] = b.mean().item()
    return out


def test_random_op_statistics_and_dropout_gradients():
    out = run_ranks(4, _statistics)[0]
    keep, values, grad_is_mask = out["dropout"]
    assert abs(keep - 0.7) < 0.02 and values == {0.0, 1 / 0.7} and grad_is_mask
    assert abs(out["native_dropout"][0] - 0.7) < 0.02 and out["native_dropout"][1]
    assert out["eval_dropout"]
    lo, hi, mean = out["uniform"]
    assert -1 <= lo < -0.99 and 2.99 < hi < 3 and abs(mean - 1) < 0.03
    assert abs(out["normal"][0] - 1) < 0.05 and abs(out["normal"][1] - 2) < 0.05
    lo, hi, mean, dtype = out["rand_like"]
    assert 0 <= lo and hi < 1 and abs(mean - 0.5) < 0.01 and dtype == torch.float32
    assert abs(out["randn_like"][0]) < 0.03 and abs(out["randn_like"][1] - 1) < 0.03
    assert out["randint_like"] == (set(range(10)), torch.float32)
    assert abs(out["bernoulli"] - 0.25) < 0.02
