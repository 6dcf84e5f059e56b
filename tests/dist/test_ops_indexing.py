"""gather / scatter / scatter_add / index_select / index_add / ``x[idx]`` / ``index_put`` on real gloo ranks: results equal
the op on full tensors (float64), no fallback, other dims stay sharded; placements equal torch's DTensor's
except where ours stay sharded and torch's are replicated (as ``opcheck.stays_more_sharded``), or where both are split
on a mesh dim but along different tensor dims (a tie torch breaks by its cost model, ours by operand
order: e.g. a gather from a row-split source with a column-split index)."""

import torch

from dtensor import Partial, Replicate, Shard
from dtensor.dispatch import fallback_ops
from tests.dist.opcheck import check_case, distribute, seeded_mesh
from tests.ranks import run_ranks


def _index(shape, dim, size, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, size, shape, generator=g)


def _cases(rng):
    """(name, fn, inputs, which inputs get random placements) with shapes drawn per case."""
    n, c = rng.choice([4, 5, 6]), rng.choice([3, 4, 6])
    x = torch.randn(n, c, dtype=torch.float64)
    src = torch.randn(n, c, dtype=torch.float64)
    idx = _index((n, c), 1, c, rng.randrange(1000))
    rows = _index((3,), 0, n, rng.randrange(1000))
    source = torch.randn(3, c, dtype=torch.float64)
    g = torch.Generator().manual_seed(rng.randrange(1000))
    unique_rows, unique_cols = torch.randperm(n, generator=g)[:3], torch.randperm(c, generator=g)[:2]
    return [
        ("gather", lambda a, i: torch.gather(a, 1, i), [x, idx]),
        ("scatter", lambda a, i, s: torch.scatter(a, 1, i, s), [x, idx, src]),
        ("scatter_value", lambda a, i: torch.scatter(a, 1, i, 2.5), [x, idx]),
        ("scatter_add", lambda a, i, s: torch.scatter_add(a, 1, i, s), [x, idx, src]),
        ("scatter_add_", lambda a, i, s: a.clone().scatter_add_(1, i, s), [x, idx, src]),
        ("index_select", lambda a, i: a.index_select(0, i), [x, rows]),
        ("index_add", lambda a, i, s: a.index_add(0, i, s, alpha=0.5), [x, rows, source]),
        ("getitem_rows", lambda a, i: a[i], [x, rows]),
        ("index_fill", lambda a, i: a.index_fill(0, i, -1.0), [x, rows]),
        ("getitem_cols", lambda a, i: a[:, i], [x, _index((2, 2), 0, c, rng.randrange(1000))]),
        ("index_put", lambda a, i, v: a.index_put((i,), v), [x, unique_rows, source]),
        ("index_put_accumulate", lambda a, i, v: a.index_put((i,), v, accumulate=True), [x, rows, source]),
        ("setitem_cols_", _set_columns, [x, unique_cols, torch.randn(n, 2, dtype=torch.float64)]),
    ]


def _set_columns(a, cols, values):
    out = a.clone()
    out[:, cols] = values  # index_put_ with indices (None, cols)
    return out


def _random(mesh_shape, count, seed):
    m, rng = seeded_mesh(mesh_shape, seed)
    if m is None:
        return []
    out = []
    for _ in range(count):
        for name, fn, inputs in _cases(rng):
            placements = [
                [rng.choice([Replicate()] + [Shard(d) for d in range(x.dim())] + ([Partial()] if x.is_floating_point() else []))
                 for _ in mesh_shape]
                for x in inputs
            ]
            if name.endswith("_"):  # in place: a target split along the scattered dim (or pending) cannot stay
                placements[0] = [rng.choice([Replicate(), Shard(0)]) for _ in mesh_shape]
            record = check_case(name, m, fn, inputs, placements)
            out.append((name, placements[0], record["placements"], record["torch"]))
    return out


def _acceptable(placements, ours, theirs) -> bool:
    """Per differing mesh dim: both split (along different tensor dims), or as ``stays_more_sharded``
    allows: torch's replicated, or the input was not split there."""
    return all(
        (a.is_shard() and b.is_shard()) or b == Replicate() or not placements[m].is_shard()
        for o, t in zip(ours, theirs) for m, (a, b) in enumerate(zip(o, t)) if a != b
    )


def test_indexing_ops_match_full_tensors_and_keep_other_dims_sharded():
    for mesh_shape in [(2,), (4,), (2, 2)]:
        results = run_ranks(4, _random, mesh_shape, 3, 7 + len(mesh_shape))[0]
        differ = [r for r in results if r[3] is not None and r[2] != r[3] and not _acceptable(*r[1:])]
        assert not differ, "\n".join(map(str, differ))
        kept = [r for r in results if r[1][0] == Shard(0) and r[0] in ("gather", "scatter", "scatter_add")]
        assert not kept or any(r[2][0][0] == Shard(0) for r in kept)  # a row split survives gather/scatter


def _gradients():
    before = set(fallback_ops)  # (a reused worker process keeps what earlier tests fell back on)
    m, _ = seeded_mesh((2,), 3)
    x = torch.randn(6, 4, dtype=torch.float64)
    rows, idx = torch.tensor([0, 5, 2, 5]), torch.randint(0, 4, (6, 3))
    out = {}
    for name, fn, placements in [
        ("index_select", lambda t: t.index_select(0, distribute(rows, m, [Replicate()])), [Shard(1)]),
        ("gather", lambda t: t.gather(1, distribute(idx, m, [Shard(0)])), [Shard(0)]),
        ("getitem", lambda t: t[distribute(rows, m, [Replicate()])], [Shard(1)]),  # backward: index_put
    ]:
        leaf = distribute(x, m, placements).requires_grad_()
        (fn(leaf) ** 2).sum().backward()
        ref = x.clone().requires_grad_()
        plain = {"index_select": lambda t: t.index_select(0, rows), "gather": lambda t: t.gather(1, idx),
                 "getitem": lambda t: t[rows]}[name]
        (plain(ref) ** 2).sum().backward()
        out[name] = (tuple(leaf.grad.placements), torch.allclose(leaf.grad.full_tensor(), ref.grad))
    return out, sorted(set(fallback_ops) - before)


def test_gradients_of_gather_index_select_and_indexing_stay_sharded():
    out, fallbacks = run_ranks(2, _gradients)[0]
    assert out["index_select"] == ((Shard(1),), True)
    assert out["gather"] == ((Shard(0),), True)
    assert out["getitem"] == ((Shard(1),), True) and not fallbacks, fallbacks


def _integer_pending_sum():
    """An integer Partial(sum) x: a replicated v made a term of the sum would be divided (turned float)."""
    from dtensor import DTensor

    m, _ = seeded_mesh((2,), 5)
    full, rows, values = torch.arange(24).reshape(6, 4), torch.tensor([1, 4]), torch.full((2, 4), 7)
    x = DTensor.from_local(full if torch.distributed.get_rank() == 0 else torch.zeros_like(full), m, [Partial()])
    r, v = distribute(rows, m, [Replicate()]), distribute(values, m, [Replicate()])
    return [torch.equal(x.index_put((r,), v, accumulate=acc).full_tensor(), full.index_put((rows,), values, accumulate=acc))
            for acc in (False, True)]


def test_index_put_of_an_integer_pending_sum():
    assert run_ranks(2, _integer_pending_sum)[0] == [True, True]
