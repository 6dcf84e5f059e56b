"""Ops that raised on our DTensor where torch's DTensor computes them: matmul of a 1-D by a 2-D tensor
(an in-place ``squeeze_`` of a Partial result), size-0 ``mm``/``linear``, in-place view ops, and
``quantile`` with a one-element plain tensor. Results, placements and strides equal torch's DTensor
(1-D @ 2-D, ``squeeze_``, ``quantile``, ``t_``: the plain result, since torch's DTensor leaves the
wrapper's shape unchanged by an in-place squeeze and has no rule for ``unsqueeze_``, ``t_``); no fallback."""

import torch
import torch.nn.functional as F

from dtensor.dispatch import fallback_ops
from tests.parity import assert_same, both
from tests.ranks import mesh, run_ranks


def _ops(lib, v: torch.Tensor, a: torch.Tensor, empty: torch.Tensor):
    m, S, R = mesh((2,)), lib.Shard, lib.Replicate
    x = lib.distribute_tensor(a, m, [S(0)])
    return (
        lib.distribute_tensor(empty, m, [S(1)]) @ x,
        F.linear(lib.distribute_tensor(empty, m, [R()]), lib.distribute_tensor(a.T.contiguous(), m, [S(0)])),
    )


def _case():
    seen = set(fallback_ops)
    torch.manual_seed(5)
    v, a, empty = torch.randn(4, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64), torch.randn(0, 4, dtype=torch.float64)
    assert_same(*both(_ops, v, a, empty), atol=1e-12, what="ops")
    import dtensor

    # torch's DTensor computes v @ a but keeps the shape (1, 6): its squeeze_ leaves the wrapper unchanged
    vm = dtensor.distribute_tensor(v, mesh((2,)), [dtensor.Shard(0)]) @ dtensor.distribute_tensor(a, mesh((2,)), [dtensor.Shard(0)])
    assert vm.shape == (6,) and vm.placements == (dtensor.Partial(),) and torch.allclose(vm.full_tensor(), v @ a)
    squeezed = dtensor.distribute_tensor(a.unsqueeze(1).clone(), mesh((2,)), [dtensor.Shard(0)])
    squeezed.squeeze_(1)  # torch's DTensor leaves the shape (4, 1, 6)
    assert squeezed.shape == (4, 6) and squeezed.stride() == (6, 1) and torch.equal(squeezed.full_tensor(), a)
    t = dtensor.distribute_tensor(a.clone(), mesh((2,)), [dtensor.Shard(1)])
    t.t_()  # torch's DTensor has no rule for t_
    assert t.shape == (6, 4) and t.placements == (dtensor.Shard(0),) and torch.equal(t.full_tensor(), a.T)
    q = torch.quantile(dtensor.distribute_tensor(a, mesh((2,)), [dtensor.Shard(0)]), torch.tensor([0.25], dtype=torch.float64))
    assert torch.allclose(q.full_tensor(), torch.quantile(a, torch.tensor([0.25], dtype=torch.float64)))
    return sorted(fallback_ops - seen)


def test_ops_torch_computes_run_sharded_and_equal_torch():
    assert run_ranks(2, _case) == [[], []]
