"""``F.scaled_dot_product_attention`` on CPU with heads (and batch) sharded: forward and backward equal
the plain run, the output stays sharded, and the fused CPU kernels never take the replicate fallback."""

import torch
import torch.nn.functional as F

import dtensor
from dtensor import Replicate, Shard
from dtensor.dispatch import fallback_ops
from tests.ranks import mesh, run_ranks

CASES = {
    # name: (mesh shape, placements of q/k/v, k/v heads, sdpa kwargs, mask shape or None, mask placements)
    "causal": ((2,), [Shard(1)], 4, {"is_causal": True}, None, None),
    "head_mask": ((2,), [Shard(1)], 4, {}, (1, 4, 5, 5), [Shard(1)]),
    "broadcast_mask": ((2,), [Shard(1)], 4, {}, (5, 5), [Replicate()]),
    "gqa": ((2,), [Shard(1)], 2, {"enable_gqa": True, "is_causal": True}, None, None),
    "batch_and_heads": ((2, 2), [Shard(0), Shard(1)], 4, {"scale": 0.3}, None, None),
}


def _attention(q, k, v, mask, kwargs):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)


def _case(shape, placements, kv_heads, kwargs, mask_shape, mask_placements):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    k, v = (torch.randn(2, kv_heads, 5, 8, dtype=torch.float64) for _ in range(2))
    mask = torch.randn(mask_shape, dtype=torch.float64) if mask_shape else None
    weight = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    plain = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = _attention(*plain, mask, kwargs)
    (expected * weight).sum().backward()

    m = mesh(shape)
    ours = [dtensor.distribute_tensor(t, m, placements).requires_grad_() for t in (q, k, v)]
    dmask = dtensor.distribute_tensor(mask, m, mask_placements) if mask is not None else None
    out = _attention(*ours, dmask, kwargs)
    (out.full_tensor() * weight).sum().backward()
    return {
        "placements": tuple(out.placements),
        "forward": torch.allclose(out.full_tensor(), expected, rtol=1e-10, atol=1e-12),
        "grads": [torch.allclose(o.grad.full_tensor(), p.grad, rtol=1e-10, atol=1e-12) for o, p in zip(ours, plain)],
        "grad_placements": [tuple(o.grad.placements) for o in ours],
    }


def _all_cases():
    before = set(fallback_ops)
    mesh((2,)), mesh((2, 2))  # collective: every rank builds both
    out = {}
    for name, case in CASES.items():
        if mesh(case[0]).get_coordinate() is not None:
            out[name] = _case(*case)
    out["fallback"] = sorted(op for op in set(fallback_ops) - before if "scaled_dot_product" in op)
    return out


def test_sdpa_with_sharded_heads_matches_the_plain_run_without_fallback():
    results = run_ranks(4, _all_cases)
    for rank, out in enumerate(results):
        assert out["fallback"] == [], rank
        for name, (shape, placements, *_rest) in CASES.items():
            if name not in out:
                continue
            case = out[name]
            assert case["forward"] and case["grads"] == [True] * 3, (rank, name, case)
            assert case["placements"] == tuple(placements), (name, case["placements"])
            assert case["grad_placements"] == [tuple(placements)] * 3, (name, case["grad_placements"])
    assert set(results[0]) == set(CASES) | {"fallback"} and set(results[3]) == {"batch_and_heads", "fallback"}
