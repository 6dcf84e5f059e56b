"""End to end: a small transformer trains for 20 steps with AdamW and gradient clipping under tensor
parallelism over our DTensor (2 and 4 ranks) and data x tensor parallelism on a (2, 2) mesh; every
step's loss equals the single-process run (float64), and no op takes the replicate fallback."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

import dtensor
from dtensor import Replicate
from dtensor.dispatch import fallback_ops
from tests.ranks import device
from tools.tiny_transformer import TinyTransformer, batches, loss_fn, tensor_parallel_plan

STEPS = 20
_meshes = {}


def _mesh(dp: int, tp: int) -> DeviceMesh:
    if (dp, tp) not in _meshes:
        ranks = torch.arange(dp * tp, device="cpu").reshape(dp, tp)
        _meshes[(dp, tp)] = DeviceMesh(device(), ranks, mesh_dim_names=("dp", "tp"))
    return _meshes[(dp, tp)]


def _replicate_the_rest(model: nn.Module, mesh) -> None:
    """Parameters the plan does not shard (layer norms) become Replicate DTensors, so optimizers see one kind."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not isinstance(param, dtensor.DTensor):
                setattr(module, name, nn.Parameter(dtensor.distribute_tensor(param.data, mesh, [Replicate()])))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, dtensor.DTensor) else t


def _train(dp: int, tp: int, optimizer: str):
    from dtensor import parallel

    seen = set(fallback_ops)  # the worker pool is shared: count only this run's fallbacks
    torch.manual_seed(0)
    reference = TinyTransformer().double()
    model = copy.deepcopy(reference)
    mesh = _mesh(dp, tp)
    tp_mesh = mesh["tp"]
    parallel.parallelize_module(model, tp_mesh, tensor_parallel_plan(parallel.ColwiseParallel, parallel.RowwiseParallel, Replicate(), 2))
    _replicate_the_rest(model, tp_mesh)
    make_opt = {
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
        "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True),
    }[optimizer]
    opt, ref_opt = make_opt(model.parameters()), make_opt(reference.parameters())
    dp_rank = mesh.get_local_rank("dp")
    losses, ref_losses = [], []
    for tokens, targets in list(batches(1, batch=4, seq=8, vocab=64)) * STEPS:  # one batch, memorised
        loss = loss_fn(model(tokens.chunk(dp)[dp_rank]), targets.chunk(dp)[dp_rank])
        loss.backward()
        if dp > 1:  # data parallel: average gradients and the loss over the dp group
            for p in model.parameters():
                dist.all_reduce(_local(p.grad), group=mesh.get_group("dp"))
                _local(p.grad).div_(dp)
            loss = loss.detach().clone()
            dist.all_reduce(loss, group=mesh.get_group("dp"))
            loss /= dp
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        ref_loss = loss_fn(reference(tokens), targets)
        ref_loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        ref_opt.step()
        ref_opt.zero_grad()
        losses.append(float(loss))
        ref_losses.append(float(ref_loss))
    return losses, ref_losses, sorted(fallback_ops - seen)


@pytest.mark.parametrize(
    "dp,tp,optimizer", [(1, 2, "adamw"), (1, 4, "adamw"), (2, 2, "adamw"), (1, 2, "adamw_fused"), (1, 2, "sgd")]
)
def test_training_matches_the_single_process_run(dp, tp, optimizer):
    from tests.ranks import run_ranks

    results = run_ranks(dp * tp, _train, dp, tp, optimizer, timeout=300)
    losses, ref_losses, fell_back = results[0]
    assert all(r[0] == losses for r in results)  # every rank saw the same loss
    assert len(losses) == STEPS and losses[-1] < losses[0]
    for step, (a, b) in enumerate(zip(losses, ref_losses)):
        assert abs(a - b) < 1e-5, f"step {step}: {a} vs single-process {b}"
    assert fell_back == [], f"ops took the replicate fallback: {fell_back}"
