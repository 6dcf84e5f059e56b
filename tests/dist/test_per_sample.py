"""Data-parallel CNN pieces on DTensors: convolution, pooling, upsampling, group norm and batch norm (with
the whole batch's statistics) keep the batch split, forward and backward, in train and eval mode, and
match the same network on full tensors (float64), running statistics included, with no fallback."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtensor
from dtensor import Replicate, Shard
from dtensor.dispatch import fallback_ops
from tests.ranks import mesh, run_ranks


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 4, 3, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.norm(self.conv1(x))), 2)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = F.avg_pool2d(self.bn(self.conv2(x)), 2, ceil_mode=True)
        x = F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _step(model, ref, m, placements, x, y):
    """One forward/backward of both models; (output placements, losses equal, grads equal)."""
    for net in (model, ref):
        net.zero_grad()
    out = model(dtensor.distribute_tensor(x, m, placements))
    loss = F.cross_entropy(out, dtensor.distribute_tensor(y, m, [p if p == Shard(0) else Replicate() for p in placements]))
    loss.backward()
    ref_loss = F.cross_entropy(ref(x), y)
    ref_loss.backward()
    grads_equal = all(
        torch.allclose(p.grad.full_tensor(), r.grad, atol=1e-10) for p, r in zip(model.parameters(), ref.parameters())
    )
    return tuple(out.placements), torch.allclose(loss.full_tensor(), ref_loss, atol=1e-12), grads_equal


def _train_step(mesh_shape, placements):
    m = mesh(mesh_shape)
    torch.manual_seed(0)
    ref = SmallCNN().double()
    model = SmallCNN().double()
    model.load_state_dict(ref.state_dict())
    dtensor.distribute_module(model, m)  # every parameter and buffer replicated
    x, y = torch.randn(6, 3, 12, 12, dtype=torch.float64), torch.randint(0, 5, (6,))
    before = set(fallback_ops)
    train = _step(model, ref, m, placements, x, y)
    stats = all(torch.allclose(model.bn.get_buffer(k).full_tensor(), ref.bn.get_buffer(k)) for k in ("running_mean", "running_var"))
    model.eval(), ref.eval()
    evaluated = _step(model, ref, m, placements, x, y)
    return train, stats, evaluated, sorted(set(fallback_ops) - before)


@pytest.mark.parametrize(
    "mesh_shape, placements, out",
    [
        ((2,), [Shard(0)], (Shard(0),)),
        ((2, 2), [Shard(0), Shard(0)], (Shard(0), Shard(0))),
        ((2, 2), [Replicate(), Shard(0)], (Replicate(), Shard(0))),
        ((2,), [Shard(1)], (Replicate(),)),  # channels split: replicated before the first convolution
    ],
)
def test_cnn_trains_data_parallel_without_gathering_the_batch(mesh_shape, placements, out):
    world = 2 * len(mesh_shape)
    train, running_stats_ok, evaluated, fallback = run_ranks(world, _train_step, mesh_shape, placements)[0]
    assert fallback == [] and running_stats_ok
    assert train == (out, True, True) and evaluated == (out, True, True)


def _bf16_batch_norm():
    m = mesh((2,))
    torch.manual_seed(1)
    x = torch.randn(6, 3, 4, 4).to(torch.bfloat16)
    weight, bias = torch.rand(3) + 0.5, torch.randn(3)
    grad = torch.randn(6, 3, 4, 4).to(torch.bfloat16)
    aten = torch.ops.aten
    dx, dgrad = dtensor.distribute_tensor(x, m, [Shard(0)]), dtensor.distribute_tensor(grad, m, [Shard(0)])
    dw, db = (dtensor.distribute_tensor(t, m, [Replicate()]) for t in (weight, bias))
    out, mean, invstd = aten.native_batch_norm(dx, dw, db, None, None, True, 0.1, 1e-5)
    ref_out, ref_mean, ref_invstd = aten.native_batch_norm(x, weight, bias, None, None, True, 0.1, 1e-5)
    grads = aten.native_batch_norm_backward(dgrad, dx, dw, None, None, mean, invstd, True, 1e-5, [True, True, True])
    ref_grads = aten.native_batch_norm_backward(grad, x, weight, None, None, ref_mean, ref_invstd, True, 1e-5, [True, True, True])
    return (
        (mean.dtype, invstd.dtype) == (ref_mean.dtype, ref_invstd.dtype),
        torch.allclose(out.full_tensor().float(), ref_out.float(), atol=2e-2),
        [(g.dtype == r.dtype, torch.allclose(g.full_tensor().float(), r.float(), rtol=2e-2, atol=5e-2)) for g, r in zip(grads, ref_grads)],
    )


def test_bf16_batch_norm_keeps_float32_statistics_like_torch():
    dtypes_ok, out_ok, grads = run_ranks(2, _bf16_batch_norm)[0]
    assert dtypes_ok and out_ok
    assert grads == [(True, True)] * 3
