"""Tensor parallelism: our ``parallelize_module`` against torch's on the same mesh, and the plain model.

Forward outputs and parameter gradients must match torch's tensor-parallel run and the single-process
run (float64). One ``run_ranks`` call per world size holds every case.
"""

import copy

import torch
import torch.distributed.tensor as tdt
import torch.distributed.tensor.parallel as torch_tp
import torch.nn.functional as F
from torch import nn

import dtensor
import dtensor.parallel as our_tp
from dtensor import Replicate, Shard
from tests.dist.opcheck import from_torch_placements
from tests.ranks import mesh, run_ranks


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(8, 16, dtype=torch.float64)
        self.w2 = nn.Linear(16, 8, dtype=torch.float64)

    def forward(self, x):
        return self.w2(F.gelu(self.w1(x)))


class Block(nn.Module):
    """A sequence-parallel MLP block: LayerNorm on sequence shards, then the tensor-parallel MLP."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8, dtype=torch.float64)
        self.mlp = MLP()

    def forward(self, x):
        return self.mlp(self.norm(x))


SEQUENCE_PARALLEL = {
    "": ("PrepareModuleInput", {"input_layouts": tdt.Replicate(), "desired_input_layouts": tdt.Shard(1), "use_local_output": True}),
    "norm": ("SequenceParallel", {}),
    "mlp.w1": ("ColwiseParallel", {"input_layouts": tdt.Shard(1)}),
    "mlp.w2": ("RowwiseParallel", {"output_layouts": tdt.Shard(1)}),
    "mlp": ("PrepareModuleOutput", {"output_layouts": tdt.Shard(1), "desired_output_layouts": tdt.Replicate()}),
}


def _full(t):
    return t.full_tensor() if isinstance(t, (dtensor.DTensor, tdt.DTensor)) else t


def _run(model, tp, plan, m, x):
    """Parallelize ``model`` with module ``tp`` (ours, torch's or None); forward, backward, fulls."""
    if tp is not None:
        tp.parallelize_module(model, m, {k: getattr(tp, style)(**kw) for k, (style, kw) in plan.items()})
    out = _full(model(x))
    out.pow(2).sum().backward()
    grads = {name: _full(p.grad) for name, p in model.named_parameters()}
    placements = {name: from_torch_placements(p.placements) for name, p in model.named_parameters() if hasattr(p, "placements")}
    return out.detach(), grads, placements


CASES = {
    "mlp": (MLP, {"w1": ("ColwiseParallel", {}), "w2": ("RowwiseParallel", {})}),
    "embedding_rowwise": (lambda: nn.Embedding(12, 8, dtype=torch.float64), {"": ("RowwiseParallel", {"input_layouts": tdt.Replicate()})}),
    "embedding_colwise": (lambda: nn.Embedding(12, 8, dtype=torch.float64), {"": ("ColwiseParallel", {"use_local_output": False})}),
    "sequence_parallel": (Block, SEQUENCE_PARALLEL),
    "wildcard": (lambda: nn.Sequential(MLP(), MLP()), {"*.w1": ("ColwiseParallel", {}), "*.w2": ("RowwiseParallel", {})}),
}


def _tensor_parallel():
    """Every case on a 2-rank mesh (ranks 0, 1) and on the 4-rank mesh, in one 4-rank world."""
    meshes = {world: mesh((world,)) for world in (2, 4)}  # collective: every rank builds both
    out = {}
    for world, m in meshes.items():
        if m.get_coordinate() is None:
            continue
        for name, (make, plan) in CASES.items():
            torch.manual_seed(0)  # the same model and input on every rank
            model = make()
            x = torch.randint(0, 12, (4, 5)) if "embedding" in name else torch.randn(4, 8, 8, dtype=torch.float64)
            out[(world, name)] = [_run(copy.deepcopy(model), tp, plan, m, x) for tp in (our_tp, torch_tp, None)]
    return out


def test_parallelize_module_matches_torch_tp_and_plain():
    results = run_ranks(4, _tensor_parallel)
    assert [len(r) for r in results] == [2 * len(CASES)] * 2 + [len(CASES)] * 2
    for rank_results in results:
        for (world, name), (ours, theirs, plain) in rank_results.items():
            for other in (theirs, plain):
                torch.testing.assert_close(ours[0], other[0], rtol=1e-10, atol=1e-12, msg=f"{world} ranks, {name} forward")
                assert ours[1].keys() == other[1].keys()
                for p in ours[1]:
                    torch.testing.assert_close(ours[1][p], other[1][p], rtol=1e-10, atol=1e-12, msg=f"{world} ranks, {name} grad {p}")
            assert ours[2] == theirs[2], (world, name)  # parameter placements as torch's
    placements = results[0][(2, "mlp")][0][2]
    assert placements == {"w1.weight": (Shard(0),), "w1.bias": (Shard(0),), "w2.weight": (Shard(1),), "w2.bias": (Replicate(),)}
    assert results[0][(4, "embedding_rowwise")][0][2] == {"weight": (Shard(0),)}
    assert results[0][(4, "embedding_colwise")][0][2] == {"weight": (Shard(1),)}


class WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4, dtype=torch.float64)
        self.register_buffer("scale", torch.full((4,), 2.0, dtype=torch.float64))

    def forward(self, x):
        return self.lin(x) * self.scale


def _distribute_module():
    m = mesh((2,))
    if m.get_coordinate() is None:
        return None
    torch.manual_seed(0)
    plain = WithBuffer()
    x = torch.randn(3, 4, dtype=torch.float64)
    replicated = dtensor.distribute_module(copy.deepcopy(plain), m)
    tensors = dict(replicated.named_parameters()) | dict(replicated.named_buffers())
    out = {"default": {k: (type(v).__name__, tuple(v.placements), isinstance(v, nn.Parameter)) for k, v in tensors.items()}}
    calls = []

    def partition_fn(name, module, mesh_):
        calls.append(("partition", name, type(module).__name__))
        if isinstance(module, nn.Linear):
            weight = dtensor.distribute_tensor(module.weight, mesh_, [Shard(0)])
            module.register_parameter("weight", nn.Parameter(weight))

    def input_fn(module, inputs, mesh_):
        calls.append(("input", type(inputs[0]).__name__))
        return dtensor.distribute_tensor(inputs[0], mesh_, [Replicate()])

    def output_fn(module, outputs, mesh_):
        calls.append(("output", type(outputs).__name__))
        return outputs.full_tensor()

    custom = dtensor.distribute_module(copy.deepcopy(plain), m, partition_fn, input_fn, output_fn)
    got = custom(x)
    out["calls"] = calls
    out["custom"] = {k: tuple(v.placements) for k, v in custom.named_parameters()}
    by_default = replicated(dtensor.distribute_tensor(x, m, [Replicate()])).full_tensor()
    out["equal"] = torch.allclose(got, plain(x), rtol=1e-12) and torch.allclose(by_default, plain(x), rtol=1e-12)
    try:
        dtensor.distribute_module(custom, m)
    except RuntimeError as e:
        out["twice"] = str(e)
    return out


def test_distribute_module_replicates_by_default_and_calls_the_hooks():
    out = run_ranks(4, _distribute_module)[0]
    assert out["default"] == {
        "lin.weight": ("DTensor", (Replicate(),), True),
        "lin.bias": ("DTensor", (Replicate(),), True),
        "scale": ("DTensor", (Replicate(),), False),
    }
    assert out["calls"] == [
        ("partition", "", "WithBuffer"),
        ("partition", "lin", "Linear"),
        ("input", "Tensor"),
        ("output", "DTensor"),
    ]
    assert out["custom"] == {"lin.weight": (Shard(0),), "lin.bias": (Replicate(),)}
    assert out["equal"]
    assert "already applied" in out["twice"]
