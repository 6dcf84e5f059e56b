"""``loss_parallel``: cross-entropy on vocab-sharded logits equals torch's DTensor under torch's
``loss_parallel`` (loss value and placements, logits gradient and placements), with no fallback."""

import pytest
import torch
import torch.nn.functional as F

from dtensor.dispatch import fallback_ops
from tests.parity import assert_same, both
from tests.ranks import mesh, run_ranks


def _loss_parallel_of(lib):
    if lib.__name__ == "dtensor":
        from dtensor.parallel import loss_parallel
    else:
        from torch.distributed.tensor.parallel import loss_parallel
    return loss_parallel


def _cross_entropy(lib, world: int, logits: torch.Tensor, targets: torch.Tensor, reduction: str):
    x = lib.distribute_tensor(logits.clone().requires_grad_(), mesh((world,)), [lib.Shard(1)])
    with _loss_parallel_of(lib)():
        loss = F.cross_entropy(x, targets, reduction=reduction, ignore_index=3)
        loss.sum().backward()
    return loss, x.grad


def _case(world: int, reduction: str):
    seen = set(fallback_ops)
    torch.manual_seed(3)
    logits = torch.randn(12, 10, dtype=torch.float64)  # 10 classes: uneven on 4 ranks (3, 3, 3, 1)
    targets = torch.randint(0, 10, (12,))
    ours, theirs = both(_cross_entropy, world, logits, targets, reduction)
    assert_same(ours, theirs, atol=1e-12, what=f"cross_entropy({reduction})")
    return sorted(fallback_ops - seen)


@pytest.mark.parametrize("world,reduction", [(2, "mean"), (2, "none"), (4, "mean"), (4, "sum")])
def test_cross_entropy_under_loss_parallel_matches_torch(world, reduction):
    assert run_ranks(world, _case, world, reduction) == [[]] * world


def _smoothed(world: int, ignore: bool):
    """cross_entropy with label smoothing on class-sharded logits (torch masks the ignored targets'
    smoothing term in place: a masked_fill_ of 0 on a pending sum), loss and gradient against plain torch."""
    import dtensor

    g = torch.Generator().manual_seed(3)
    logits, targets = torch.randn(6, 7, generator=g, dtype=torch.float64), torch.tensor([0, 4, 2, 6, 1, 3])
    if ignore:
        targets[2] = -100
    d = dtensor.distribute_tensor(logits, mesh((world,)), [dtensor.Shard(1)]).detach().requires_grad_()
    t = dtensor.distribute_tensor(targets, mesh((world,)), [dtensor.Replicate()])
    loss = F.cross_entropy(d, t, label_smoothing=0.2)
    loss.backward()
    plain = logits.clone().requires_grad_()
    expected = F.cross_entropy(plain, targets, label_smoothing=0.2)
    expected.backward()
    return torch.allclose(loss.full_tensor(), expected) and torch.allclose(d.grad.full_tensor(), plain.grad)


@pytest.mark.parametrize("ignore", [False, True])
def test_label_smoothing_on_class_sharded_logits_matches_plain_torch(ignore):
    assert all(run_ranks(2, _smoothed, 2, ignore))
