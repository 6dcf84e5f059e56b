"""The edges of dispatch on real gloo ranks: ops torch tags pointwise without a table entry, a number added
to a pending reduction, ops whose output shape depends on the data, plain tensors beside DTensors (autograd's own
zero gradients, ``implicit_replication``), ``local_map``, and the mse and cross-entropy losses with plain
targets. Results are compared with the same code on full tensors (float64)."""

import random

import pytest
import torch
import torch.nn.functional as F

from dtensor import DTensor, Partial, Replicate, Shard
from dtensor.experimental import implicit_replication, local_map
from tests.dist.opcheck import check_op, distribute
from tests.ranks import mesh, run_ranks

aten = torch.ops.aten

# Pointwise ops that only torch's pointwise tag covers (no entry in dtensor/ops/pointwise.py's table).
TAGGED = {
    "add_scalar": lambda x, y: aten.add.Scalar(x, 1.5),
    "sub_scalar_": lambda x, y: aten.sub_.Scalar(x.clone(), 0.5),
    "rsub": lambda x, y: 2.0 - x,
    "fmod": torch.fmod,
    "remainder": torch.remainder,
    "leaky_relu": lambda x, y: F.leaky_relu(x, 0.1),
    "hardtanh": lambda x, y: F.hardtanh(x),
    "softplus": lambda x, y: F.softplus(x),
    "logaddexp": torch.logaddexp,
    "copysign": torch.copysign,
    "xlogy": lambda x, y: torch.xlogy(x, y.abs()),
    "frexp": lambda x, y: torch.frexp(x),
    "bitwise_or_": lambda x, y: (x > 0).bitwise_or_(y > 0),
}


def _tagged(mesh_shape):
    m = mesh(mesh_shape)
    rng = random.Random(len(mesh_shape))
    torch.manual_seed(0)
    differ = []
    for name, fn in TAGGED.items():
        shape = rng.choice([(5, 4), (8, 6)])
        x, y = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64) + 0.1
        placements = [[rng.choice([Shard(0), Shard(1), Replicate()]) for _ in mesh_shape] for _ in range(2)]
        record = check_op(m, fn, [x, y], placements)
        if record["torch"] is not None and record["torch"] != record["placements"]:
            differ.append((name, placements, record["placements"], record["torch"]))
    return differ


@pytest.mark.parametrize("mesh_shape", [(2,), (2, 2)])
def test_ops_tagged_pointwise_need_no_table_entry(mesh_shape):
    assert run_ranks(len(mesh_shape) * 2, _tagged, mesh_shape)[0] == []


def _scalar_on_pending():
    m = mesh((2, 2))
    torch.manual_seed(1)
    x = torch.randn(6, 8, dtype=torch.float64)
    out = {}
    for kind in ("sum", "avg", "max"):
        rec = check_op(m, lambda t: aten.add.Scalar(t, 0.25), [x], [[Partial(kind), Shard(0)]], compare_with_torch=False)
        out[kind] = rec["placements"]
    inplace = distribute(x, m, [Partial("avg"), Partial("avg")])
    aten.sub_.Scalar(inplace, 3.0)
    out["inplace"] = (inplace.placements, torch.allclose(inplace.full_tensor(), x - 3.0))
    try:
        aten.sub_.Scalar(distribute(x, m, [Partial("sum"), Replicate()]), 3.0)
        out["inplace sum"] = "ran"
    except RuntimeError as e:
        out["inplace sum"] = "in-place" in str(e)
    # an RMS norm over the sharded hidden dim: mean() pends, add_(eps) keeps it pending, rsqrt resolves it
    rms = lambda t: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True).add_(1e-6))  # noqa: E731
    out["rms"] = check_op(m, rms, [x], [[Shard(1), Shard(0)]], compare_with_torch=False)["placements"]
    out["rms_module"] = check_op(m, lambda t: F.rms_norm(t, (8,)), [x], [[Shard(1), Replicate()]], compare_with_torch=False)["placements"]
    return out


def test_a_number_added_to_a_pending_reduction():
    """Out of place the reduction is carried out first, as torch's (reduce-scattered onto the other
    dim); in place, torch refuses, and we shift every term of an average, max or min (a sum would count
    the number once per term), as an RMS norm's add_(eps) over a sharded hidden dim needs."""
    out = run_ranks(4, _scalar_on_pending)[0]
    for kind in ("sum", "avg", "max"):
        assert out[kind] == [(Shard(1), Shard(0))], (kind, out[kind])
    assert out["inplace"] == ((Partial("avg"), Partial("avg")), True)
    assert out["inplace sum"] is True
    assert out["rms"] == [(Shard(1), Shard(0))]
    assert out["rms_module"] == [(Shard(1), Replicate())]


def _data_dependent():
    m = mesh((2,))
    torch.manual_seed(2)
    x = torch.randn(7, 3, dtype=torch.float64)
    out = {}
    for name, fn in {
        "masked_select": lambda t: t.masked_select(t > 0),
        "bool_index": lambda t: t[t[:, 0] > 0],
        "nonzero": lambda t: (t > 0).nonzero(),
        "unique": lambda t: torch.unique((t * 2).round()),
    }.items():
        rec = check_op(m, fn, [x], [[Shard(0)]], allow_fallback=True, compare_with_torch=False)
        out[name] = rec["placements"]
    dx = distribute(x, m, [Shard(1)])
    out["allclose"] = (torch.allclose(dx, dx), torch.allclose(dx, dx + 1))
    return out


def _promotion_and_outputs():
    m = mesh((2,))
    rank = torch.distributed.get_rank()
    out = {}
    ints = DTensor.from_local(torch.tensor([1, 2]) * (rank + 1), m, [Partial("sum")])  # full value [3, 6]
    shifted = ints + 0.5  # a float number on an int pending sum: every rank must promote alike
    out["promoted"] = (shifted.dtype, shifted.full_tensor().tolist())
    x = distribute(torch.arange(6), m, [Shard(0)])
    out["cache_by_type"] = [(x * 2).dtype, (x * 2.0).dtype, (x * True).dtype]
    z = torch.tensor([1 + 1j, 2 - 1j, 3j, -1], dtype=torch.complex128)
    out["complex_var"] = torch.allclose(distribute(z, m, [Shard(0)]).var().full_tensor(), z.var())
    full = torch.randn(6, 4, dtype=torch.float64)
    mantissa, exponent = distribute(torch.zeros(6, 4, dtype=torch.float64), m, [Shard(0)]), distribute(torch.zeros(6, 4, dtype=torch.int32), m, [Shard(0)])
    torch.frexp(distribute(full, m, [Replicate()]), out=(mantissa, exponent))  # out= tensors keep their layout
    expected = torch.frexp(full)
    out["frexp_out"] = (mantissa.placements, torch.equal(mantissa.full_tensor(), expected.mantissa), torch.equal(exponent.full_tensor(), expected.exponent))
    return out


def test_numbers_promote_alike_and_out_tensors_are_written_in_place():
    out = run_ranks(2, _promotion_and_outputs)[0]
    assert out["promoted"] == (torch.float32, [3.5, 6.5])
    assert out["cache_by_type"] == [torch.int64, torch.float32, torch.int64]
    assert out["complex_var"]
    assert out["frexp_out"] == ((Shard(0),), True, True)


def _writes_into_views():
    """In-place writes into views: where the view is of the local shard, they land (as in plain torch);
    where it had to be made of a redistributed copy, they are refused rather than silently lost."""
    m = mesh((2,))
    full = torch.arange(12.0).reshape(4, 3)
    landed = {}
    for name, placements, write in [
        ("column of Shard(0)", [Shard(0)], lambda t: t[:, 1].fill_(100.0)),
        ("row of Replicate", [Replicate()], lambda t: t.__setitem__(1, 100.0)),
        ("rows of Shard(1)", [Shard(1)], lambda t: t[1:3].mul_(0.0)),
    ]:
        d, expected = distribute(full.clone(), m, placements), full.clone()
        write(d)
        write(expected)
        landed[name] = torch.equal(d.full_tensor(), expected) and d.placements == tuple(placements)
    refused = {}
    for name, placements, write in [
        ("d[1] = v on Shard(0)", [Shard(0)], lambda t: t.__setitem__(1, 100.0)),
        ("d[-1] = v on Shard(0)", [Shard(0)], lambda t: t.__setitem__(-1, 100.0)),
        ("d[:, 1] = v on Shard(1)", [Shard(1)], lambda t: t.__setitem__((slice(None), 1), 100.0)),
        ("d[1].add_ on Shard(0)", [Shard(0)], lambda t: t[1].add_(5.0)),
    ]:
        d = distribute(full.clone(), m, placements)
        try:
            write(d)
            refused[name] = "no error"
        except RuntimeError as exc:
            refused[name] = "would change a copy and leave the tensor as it was" in str(exc) and torch.equal(d.full_tensor(), full)
    return landed, refused


def test_in_place_writes_into_views_land_or_are_refused_never_lost():
    landed, refused = run_ranks(2, _writes_into_views)[0]
    assert all(landed.values()), landed
    assert all(v is True for v in refused.values()), refused


def test_ops_with_data_dependent_shapes_run_replicated():
    out = run_ranks(2, _data_dependent)[0]
    for name in ("masked_select", "bool_index", "nonzero"):
        assert out[name] == [(Replicate(),)], name
    assert out["unique"][0] == (Replicate(),)
    assert out["allclose"] == (True, False)


def _plain_tensors():
    m = mesh((2,))
    torch.manual_seed(3)
    x = torch.randn(6, 4, dtype=torch.float64)
    bias = torch.randn(4, dtype=torch.float64)
    dx = distribute(x, m, [Shard(0)])
    out = {}
    try:
        dx + bias
    except RuntimeError as e:
        out["refused"] = str(e)
    with implicit_replication():
        y = dx + bias
    out["implicit"] = (y.placements, torch.allclose(y.full_tensor(), x + bias))
    # autograd's own plain zeros: the gradient of an unused split/unbind output
    for name, fn in {
        "split": lambda t: (t.split(2, dim=1)[0] * 2).sum(),
        "unbind": lambda t: (t.unbind(1)[2] ** 2).sum(),
        "chunk_max": lambda t: t.chunk(2, dim=0)[1].max(dim=1).values.sum(),
    }.items():
        leaf = distribute(x, m, [Shard(0)]).requires_grad_()
        fn(leaf).backward()
        ref = x.clone().requires_grad_()
        fn(ref).backward()
        out[name] = torch.allclose(leaf.grad.full_tensor(), ref.grad)
    return out


def test_plain_tensors_beside_dtensors():
    out = run_ranks(2, _plain_tensors)[0]
    assert "aten.add.Tensor" in out["refused"] and "implicit_replication" in out["refused"]
    assert out["implicit"] == ((Shard(0),), True)
    assert out["split"] and out["unbind"] and out["chunk_max"]


def _local_map_case():
    m = mesh((2,))
    torch.manual_seed(4)
    x = torch.randn(6, 4, dtype=torch.float64)
    leaf = distribute(x, m, [Shard(0)]).requires_grad_()

    @local_map(out_placements=[Shard(0)], in_placements=([Shard(0)],), device_mesh=m)
    def row_softmax(t):
        assert type(t) is torch.Tensor and t.shape[0] == 3
        return t.softmax(-1)

    y = row_softmax(leaf)
    weights = distribute(torch.arange(24.0, dtype=torch.float64).reshape(6, 4), m, [Shard(0)])
    (y * weights).sum().backward()
    ref = x.clone().requires_grad_()
    (ref.softmax(-1) * torch.arange(24.0, dtype=torch.float64).reshape(6, 4)).sum().backward()
    out = {"value": torch.allclose(y.full_tensor(), x.softmax(-1)), "grad": torch.allclose(leaf.grad.full_tensor(), ref.grad)}
    moved = local_map(lambda t: t * 2, [Replicate()], ([Replicate()],), redistribute_inputs=True)(distribute(x, m, [Shard(0)]))
    out["moved"] = (moved.placements, torch.allclose(moved.full_tensor(), x * 2))
    try:
        local_map(lambda t: t, [Replicate()], ([Replicate()],))(distribute(x, m, [Shard(0)]))
    except ValueError as e:
        out["mismatch"] = str(e)
    return out


def test_local_map_runs_on_shards_with_gradients():
    out = run_ranks(2, _local_map_case)[0]
    assert out["value"] and out["grad"]
    assert out["moved"] == ((Replicate(),), True)
    assert "redistribute_inputs" in out["mismatch"]


def _losses():
    m = mesh((2,))
    torch.manual_seed(5)
    x, target = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    classes = torch.randint(0, 5, (6,))
    weight = torch.rand(5, dtype=torch.float64) + 0.5
    out = {}
    cases = {
        "mse_mean": lambda z, t: F.mse_loss(z, t),
        "mse_sum": lambda z, t: F.mse_loss(z, t, reduction="sum"),
        "mse_none": lambda z, t: F.mse_loss(z, t, reduction="none").sum(),
    }
    for name, fn in cases.items():
        for placements in ([Shard(0)], [Shard(1)], [Replicate()]):
            leaf = distribute(x, m, placements).requires_grad_()
            loss = fn(leaf, distribute(target, m, placements))
            loss.backward()
            ref = x.clone().requires_grad_()
            fn(ref, target).backward()
            out[(name, str(placements))] = torch.allclose(loss.full_tensor(), fn(x, target)) and torch.allclose(
                leaf.grad.full_tensor(), ref.grad
            )
    # cross entropy with plain targets and class weights (the full tensors on every rank), vocab-sharded logits
    for name, kwargs in {"plain": {}, "weighted": {"weight": weight}}.items():
        leaf = distribute(x, m, [Shard(1)]).requires_grad_()
        loss = F.cross_entropy(leaf, classes, **kwargs)
        loss.backward()
        ref = x.clone().requires_grad_()
        F.cross_entropy(ref, classes, **kwargs).backward()
        out[("ce", name)] = torch.allclose(loss.full_tensor(), F.cross_entropy(x, classes, **kwargs)) and torch.allclose(
            leaf.grad.full_tensor(), ref.grad
        )
    leaf = distribute(x, m, [Shard(0)]).requires_grad_()
    with implicit_replication():  # label smoothing masks with the plain targets inside torch's composite
        loss = F.cross_entropy(leaf, classes, label_smoothing=0.1)
        loss.backward()
    ref = x.clone().requires_grad_()
    F.cross_entropy(ref, classes, label_smoothing=0.1).backward()
    out[("ce", "smoothing")] = torch.allclose(loss.full_tensor(), F.cross_entropy(x, classes, label_smoothing=0.1)) and torch.allclose(
        leaf.grad.full_tensor(), ref.grad
    )
    return out


def test_losses_with_plain_targets_and_any_layout():
    out = run_ranks(2, _losses)[0]
    assert all(out.values()), [k for k, v in out.items() if not v]


def _losses_of_partial_sums():
    """Losses whose prediction is a pending sum (``Partial``: a row-parallel matmul before its
    all-reduce) against sharded or replicated targets, checked against plain tensors. torch 2.13's
    DTensor gets these wrong (checked on this mesh): mse and huber give wrong gradients with a
    ``Shard(0)`` target and a wrong loss too with ``Shard(1)``, bce_with_logits a wrong loss with
    ``Shard(1)``: a difference of a pending sum and a shard needs the sum reduced first."""
    m = mesh((2,))
    torch.manual_seed(9)
    a, b = torch.randn(6, 4, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    targets = {"regression": torch.randn(6, 5, dtype=torch.float64), "probability": torch.rand(6, 5, dtype=torch.float64)}
    cases = {
        "mse": (lambda z, t: F.mse_loss(z, t), "regression"),
        "huber": (lambda z, t: F.huber_loss(z, t, delta=0.5), "regression"),
        "smooth_l1": (lambda z, t: F.smooth_l1_loss(z, t, beta=0.5, reduction="sum"), "regression"),
        "bce_with_logits": (lambda z, t: F.binary_cross_entropy_with_logits(z, t), "probability"),
    }
    out = {}
    for name, (fn, kind) in cases.items():
        target = targets[kind]
        ra, rb = a.clone().requires_grad_(), b.clone().requires_grad_()
        expected = fn(ra @ rb, target)
        expected.backward()
        for target_at in ([Shard(0)], [Shard(1)], [Replicate()]):
            da = distribute(a, m, [Shard(1)]).requires_grad_()
            db = distribute(b, m, [Shard(0)]).requires_grad_()
            z = da @ db
            assert z.placements == (Partial(),)
            loss = fn(z, distribute(target, m, target_at))
            loss.backward()
            out[(name, str(target_at))] = (torch.allclose(loss.full_tensor(), expected)
                                           and torch.allclose(da.grad.full_tensor(), ra.grad)
                                           and torch.allclose(db.grad.full_tensor(), rb.grad))
    return out


def test_losses_of_a_pending_sum_have_the_gradients_of_plain_tensors():
    for out in run_ranks(2, _losses_of_partial_sums):
        assert all(out.values()), [k for k, v in out.items() if not v]


def _norms_with_an_empty_shard():
    """3 rows over 4 shards: one rank holds none. Its max (or min) of nothing must not join the result
    (torch 2.13's DTensor raises there: "cannot compute the inf norm on an empty tensor")."""
    m = mesh((2, 2))
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = {}
    for at in ([Shard(0), Shard(0)], [Shard(0), Shard(1)], [Replicate(), Shard(0)]):
        for order in (float("inf"), -float("inf"), 2, 1):
            d, ref = distribute(x, m, at).requires_grad_(), x.clone().requires_grad_()
            norm, expected = torch.linalg.vector_norm(d, ord=order), torch.linalg.vector_norm(ref, ord=order)
            norm.backward()
            expected.backward()
            out[(str(at), order)] = torch.allclose(norm.full_tensor(), expected) and torch.allclose(d.grad.full_tensor(), ref.grad)
    return out


def test_vector_norms_with_a_rank_holding_no_rows():
    for out in run_ranks(4, _norms_with_an_empty_shard):
        assert all(out.values()), [k for k, v in out.items() if not v]


def _attention_of_pending_reductions():
    """Queries, keys and values that are pending averages or sums: reduced before the softmax, which is
    not linear."""
    m = mesh((2,))
    q, k, v = torch.randn(3, 2, 2, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = F.scaled_dot_product_attention(q, k, v)
    out = {}
    for op, part in (("avg", 1.0), ("sum", 0.5)):  # every rank's part: the value itself, or half of it
        pending = [DTensor.from_local(t * part, m, [Partial(op)], run_check=False) for t in (q, k, v)]
        out[op] = torch.allclose(F.scaled_dot_product_attention(*pending).full_tensor(), expected)
    return out


def test_attention_of_pending_reductions():
    assert run_ranks(2, _attention_of_pending_reductions) == [{"avg": True, "sum": True}] * 2


def _unbind_backward_of_a_vector():
    """The backward of a 1-D tensor's ``unbind`` stacks autograd's plain 0-d zeros with the one 0-d
    gradient: a join of scalars whole on every rank, not an op without a rule (it fell back, warning)."""
    from dtensor.dispatch import fallback_ops

    m = mesh((2,))
    x = torch.arange(5.0, dtype=torch.float64)
    out = {}
    for at in ([Shard(0)], [Replicate()]):
        leaf = distribute(x, m, at).requires_grad_()
        fallback_ops.discard("aten.stack.default")  # a worker records each op once: forget an earlier test's
        (torch.unbind(leaf, 0)[1] * 3).backward()
        out[str(at)] = ("aten.stack.default" in fallback_ops, leaf.grad.full_tensor().tolist())
    return out


def test_the_backward_of_unbinding_a_vector_needs_no_fallback():
    expected = [0.0, 3.0, 0.0, 0.0, 0.0]
    assert run_ranks(2, _unbind_backward_of_a_vector) == [{"[Shard(dim=0)]": (False, expected), "[Replicate()]": (False, expected)}] * 2
