"""A small transformer (embedding, attention projections, MLP, layer norm, output head) and its
tensor-parallel plan, used by the training test and ``tools/train_demo.py``.

The code is plain PyTorch: the same module trains on one process with plain tensors and on several
ranks after ``parallelize_module`` — attention reshapes with ``-1`` heads so each rank works on the
heads its column shard holds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.attn_norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q, k, v = (proj(h).view(b, t, -1, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        attn = scores.masked_fill(causal, float("-inf")).softmax(dim=-1) @ v
        x = x + self.o(attn.transpose(1, 2).reshape(b, t, -1))
        return x + self.down(F.gelu(self.up(self.mlp_norm(x))))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def tensor_parallel_plan(colwise, rowwise, replicate, layers: int) -> dict:
    """The Megatron-style plan: q/k/v/up column-wise, o/down row-wise, a vocab-parallel embedding and a
    column-wise head gathered back to full logits. The embedding and the row-wise layers hand back
    Replicate DTensors, so the residual stream and layer norms run on DTensors; q/k/v and the MLP's
    inner activations are local column shards (each rank's heads). The style classes and the Replicate placement are
    passed in, so the same plan serves ``dtensor.parallel`` and torch's own tensor parallel."""
    plan = {"embed": rowwise(input_layouts=replicate, use_local_output=False), "head": colwise(output_layouts=replicate)}
    for i in range(layers):
        plan.update({f"blocks.{i}.{name}": colwise() for name in ("q", "k", "v", "up")})
        plan.update({f"blocks.{i}.{name}": rowwise(use_local_output=False) for name in ("o", "down")})
    return plan


def batches(steps: int, batch: int, seq: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        yield tokens[:, :-1], tokens[:, 1:]
