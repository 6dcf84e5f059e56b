"""Acceptance: a Llama-style model (tests/llama_model.py) trained with torchtitan's tensor-parallel plan
for a few AdamW steps on our DTensor and on torch's DTensor from the same weights and batches: the losses
are equal step by step (float64 to 1e-10; bf16 exactly) and no op takes our replicate fallback."""

import pytest
import torch
import torch.nn.functional as F

import dtensor.experimental  # noqa: F401 - lib.experimental.local_map
import torch.distributed.tensor.experimental  # noqa: F401
from dtensor.dispatch import fallback_ops
from tests.llama_model import Llama, causal_sdpa, tensor_parallel_plan, upcast
from tests.parity import both
from tests.ranks import mesh, run_ranks

STEPS, LAYERS, VOCAB, SEQ = 4, 2, 32, 8


def _parallel(lib):
    if lib.__name__ == "dtensor":
        import dtensor.parallel as parallel
    else:
        import torch.distributed.tensor.parallel as parallel
    return parallel


def _replicate_the_rest(lib, model, m) -> None:
    """Parameters the plan leaves plain become Replicate DTensors, so AdamW sees one kind of tensor."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not isinstance(param, lib.DTensor):
                module.register_parameter(name, torch.nn.Parameter(lib.distribute_tensor(param.data, m, [lib.Replicate()])))


def _train(lib, world: int, dtype: torch.dtype) -> list[float]:
    parallel = _parallel(lib)
    m = mesh((world,))
    torch.manual_seed(0)
    model = Llama(causal_sdpa(lib), dtype, vocab=VOCAB, layers=LAYERS, seq=SEQ)
    parallel.parallelize_module(model, m, tensor_parallel_plan(lib, parallel, LAYERS))
    _replicate_the_rest(lib, model, m)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1))
    losses = []
    for _ in range(STEPS):
        with parallel.loss_parallel():
            pred = model(tokens[:, :-1])
            loss = F.cross_entropy(upcast(pred.flatten(0, 1)), tokens[:, 1:].flatten(0, 1))
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad()
        losses.append(loss.full_tensor().item())
    return losses


def _case(world: int, dtype: torch.dtype):
    seen = set(fallback_ops)
    ours, theirs = both(_train, world, dtype)
    return ours, theirs, sorted(fallback_ops - seen)


@pytest.mark.parametrize("world,dtype", [(2, torch.float64), (4, torch.float64), (2, torch.bfloat16)])
def test_llama_trains_like_torch_dtensor(world, dtype):
    ours, theirs, fell_back = run_ranks(world, _case, world, dtype, timeout=300)[0]
    assert fell_back == [], f"ops took the replicate fallback: {fell_back}"
    assert len(ours) == STEPS and ours[-1] < ours[0]
    tolerance = 1e-10 if dtype == torch.float64 else 0.0
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert abs(a - b) <= tolerance, f"step {step}: loss {a}, torch's DTensor {b}"
