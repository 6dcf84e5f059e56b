"""DTensor behaviour beyond layout: collective counts, autograd, run_check, factories, conversions,
serialization and async redistribute."""

import io
import math

import pytest
import torch
import torch.distributed as dist
import torch.distributed.tensor as tdt
from torch.distributed.tensor.debug import CommDebugMode

import dtensor
from dtensor import DTensor, Partial, Replicate, Shard
from tests.ranks import mesh, run_ranks

c10d = torch.ops.c10d_functional
funcol_ops = torch.ops._c10d_functional


def _count(comm: CommDebugMode) -> dict[str, int]:
    return {str(k).split(".")[-1]: v for k, v in comm.get_comm_counts().items() if v}


def _collective_counts(mesh_shape):
    m = mesh(mesh_shape)
    full = torch.arange(7 * 6, dtype=torch.float32).reshape(7, 6)
    rank = dist.get_rank()
    results = {}
    transitions = {
        "S->R": ([Shard(0)], [Replicate()]),
        "P->R": ([Partial()], [Replicate()]),
        "P->S": ([Partial()], [Shard(0)]),
        "S0->S1": ([Shard(0)], [Shard(1)]),
        "R->S": ([Replicate()], [Shard(1)]),
        "R->P": ([Replicate()], [Partial()]),
    }
    for (name, (src1, dst1)), mesh_dim in [(t, d) for t in transitions.items() for d in range(m.ndim)]:
        src = [Replicate()] * m.ndim
        dst = [Replicate()] * m.ndim
        src[mesh_dim], dst[mesh_dim] = src1[0], dst1[0]
        name = f"{name}@{mesh_dim}"
        if src[mesh_dim].is_partial():
            local = dtensor.distribute_tensor(full, m, [Replicate()] * m.ndim).to_local() * (rank + 1)
            dt = DTensor.from_local(local, m, src, shape=full.shape)
        else:
            dt = dtensor.distribute_tensor(full, m, src)
        with CommDebugMode() as comm:
            dt.redistribute(placements=dst)
        results[name] = _count(comm)
    return results


@pytest.mark.parametrize("mesh_shape", [(4,), (2, 2)])
def test_each_transition_uses_the_cheapest_collective(mesh_shape):
    counts = run_ranks(math.prod(mesh_shape), _collective_counts, mesh_shape)[0]
    for mesh_dim in range(len(mesh_shape)):
        assert counts[f"S->R@{mesh_dim}"] == {"all_gather_into_tensor": 1}
        assert counts[f"P->R@{mesh_dim}"] == {"all_reduce": 1}
        assert counts[f"P->S@{mesh_dim}"] == {"reduce_scatter_tensor": 1}
        assert counts[f"S0->S1@{mesh_dim}"] == {"all_to_all_single": 1}
        assert counts[f"R->S@{mesh_dim}"] == {}
        assert counts[f"R->P@{mesh_dim}"] == {}


def _grads_match_reference(mesh_shape):
    m = mesh(mesh_shape)
    torch.manual_seed(0)
    full = torch.randn(9, 5, dtype=torch.float64)
    weights = torch.randn(9, 5, dtype=torch.float64)
    ref = full.clone().requires_grad_()
    (ref.sin() * weights).sum().backward()
    for src, dst in [
        ([Shard(0)], [Replicate()]),
        ([Shard(1)], [Shard(0)]),
        ([Replicate()], [Shard(1)]),
        ([Shard(0)], [Shard(0)]),
    ]:
        src, dst = src * m.ndim, dst * m.ndim
        local = dtensor.distribute_tensor(full, m, src).to_local().clone().requires_grad_()
        dt = DTensor.from_local(local, m, src, shape=full.shape, stride=full.stride())
        out = dt.redistribute(placements=dst).full_tensor()
        (out.sin() * weights).sum().backward()
        expected = dtensor.distribute_tensor(ref.grad, m, src).to_local()
        assert torch.allclose(local.grad, expected), (src, dst)
    return True


@pytest.mark.parametrize("mesh_shape", [(2,), (4,), (2, 2)])
def test_gradients_equal_the_single_process_reference(mesh_shape):
    assert all(run_ranks(math.prod(mesh_shape), _grads_match_reference, mesh_shape))


def _backward_placements():
    m = mesh((4,))
    full = torch.randn(8, 4)
    out = {}
    # R -> S forward: the gradient (sharded) comes back as Replicate via one all-gather
    leaf = dtensor.distribute_tensor(full, m, [Replicate()]).requires_grad_()
    sharded = leaf.redistribute(placements=[Shard(0)])
    with CommDebugMode() as comm:
        sharded.to_local().sum().backward()
    out["R->S"] = (leaf.grad.placements, _count(comm))
    # P -> R forward: Replicate gradient with no communication
    local = torch.ones(8, 4, requires_grad=True)
    partial = DTensor.from_local(local, m, [Partial()])
    replicated = partial.redistribute(placements=[Replicate()])
    with CommDebugMode() as comm:
        replicated.to_local().sum().backward()
    out["P->R"] = (_count(comm), torch.equal(local.grad, torch.ones(8, 4)))
    return out


def test_backward_moves_gradients_to_the_input_layout():
    out = run_ranks(4, _backward_placements)[0]
    assert out["R->S"] == ((Replicate(),), {"all_gather_into_tensor": 1})
    assert out["P->R"] == ({}, True)


def _run_check(bad: bool):
    m = mesh((4,))
    rank = dist.get_rank()
    rows = [3, 3, 3, 1] if not bad else [2, 3, 3, 2]
    local = torch.full((rows[rank], 2), float(rank))
    dt = DTensor.from_local(local, m, [Shard(0)], run_check=True)
    return tuple(dt.shape)


def test_run_check_accepts_chunk_layout_and_infers_the_shape():
    assert run_ranks(4, _run_check, False) == [(10, 2)] * 4


def test_run_check_rejects_shards_torch_would_silently_mis_assemble():
    with pytest.raises(AssertionError, match="torch.chunk layout"):
        run_ranks(4, _run_check, True)


def _factories(mesh_shape, placements):
    m = mesh(mesh_shape)
    out = {}
    z = dtensor.zeros(10, 3, device_mesh=m, placements=placements)
    o = dtensor.ones((10, 3), device_mesh=m, placements=placements, dtype=torch.float64)
    f = dtensor.full((10, 3), 2.5, device_mesh=m, placements=placements)
    out["local_shapes"] = [tuple(t.to_local().shape) for t in (z, o, f)]
    out["fulls"] = [z.full_tensor().sum().item(), o.full_tensor().sum().item(), f.full_tensor().sum().item()]
    torch.manual_seed(123)
    r = dtensor.rand(10, 3, device_mesh=m, placements=placements)
    n = dtensor.randn(10, 3, device_mesh=m, placements=placements)
    out["rand_full"] = r.full_tensor()
    out["randn_full"] = n.full_tensor()
    out["rand_local"] = r.to_local()
    return out


def test_factories_allocate_only_the_local_shard():
    results = run_ranks(4, _factories, (4,), [Shard(0)])
    assert [r["local_shapes"] for r in results] == [[(3, 3)] * 3] * 3 + [[(1, 3)] * 3]
    assert results[0]["fulls"] == [0.0, 30.0, 75.0]


def test_random_factories_are_mesh_invariant_and_reproducible():
    a = run_ranks(4, _factories, (4,), [Shard(0)])
    b = run_ranks(4, _factories, (2, 2), [Replicate(), Shard(1)])
    c = run_ranks(2, _factories, (2,), [Replicate()])
    for key in ("rand_full", "randn_full"):
        assert torch.equal(a[0][key], b[0][key]) and torch.equal(a[0][key], c[0][key])
        assert torch.equal(a[0][key], a[3][key])
    assert not torch.equal(a[0]["rand_local"], a[1]["rand_local"])  # shards differ
    assert torch.equal(c[0]["rand_local"], c[1]["rand_local"])  # replicas agree
    values = a[0]["rand_full"]
    assert 0 <= values.min() and values.max() < 1 and 0.3 < values.mean() < 0.7
    assert abs(a[0]["randn_full"].mean()) < 0.5


def _conversion_and_serialization():
    m = mesh((2,))
    full = torch.arange(12.0).reshape(4, 3)
    ours = dtensor.distribute_tensor(full, m, [Shard(1)])
    theirs = ours.to_torch()
    back = dtensor.from_torch(theirs)
    shares = theirs.to_local().data_ptr() == ours.to_local().data_ptr() == back.to_local().data_ptr()
    buf = io.BytesIO()
    torch.save({"w": ours}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["w"]
    return (
        type(theirs) is tdt.DTensor,
        shares,
        back.placements == (Shard(1),),
        torch.equal(theirs.full_tensor(), full),
        type(loaded) is DTensor and loaded.placements == (Shard(1),) and torch.equal(loaded.full_tensor(), full),
    )


def test_conversion_with_torch_is_zero_copy_and_save_load_round_trips():
    for result in run_ranks(2, _conversion_and_serialization):
        assert result == (True, True, True, True, True)


def _async_redistribute():
    m = mesh((4,))
    full = torch.randn(16, 8)
    dt = dtensor.distribute_tensor(full, m, [Shard(0)])
    pending = dt.redistribute(placements=[Replicate()], async_op=True)
    return torch.equal(pending.to_local() + 0, full)


def test_async_redistribute_is_correct_when_used():
    assert all(run_ranks(4, _async_redistribute))


def _compiled():
    m = mesh((2,))
    dt = dtensor.distribute_tensor(torch.arange(8.0).reshape(4, 2), m, [Shard(0)])

    def f(x):
        return x.to_local() * 2

    compiled = torch.compile(f, backend="eager")
    return torch.equal(compiled(dt), dt.to_local() * 2)


def test_survives_torch_compile_tracing():
    assert all(run_ranks(2, _compiled))
