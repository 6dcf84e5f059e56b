"""A small Llama-style model and its tensor-parallel plan, written as real clients write them.

It uses the ops that torchtitan's llama3 and pytorch/examples' tensor-parallel Llama use: rotary
embedding through complex numbers (``view_as_complex``, a multiply by complex frequencies,
``view_as_real``), RMSNorm with a float upcast and ``type_as``, SwiGLU, ``scaled_dot_product_attention``
and a vocab-sharded cross-entropy under ``loss_parallel``. The code is library-neutral: the plan and the
SDPA wrapper take the DTensor library (``dtensor`` or ``torch.distributed.tensor``) as an argument, so the
same scenario runs on ours and on torch's.

The attention projections keep DTensor outputs (``use_local_output=False``): rotary runs on heads-sharded
DTensors, which is where a lost conjugate bit used to corrupt the gradients. torch's DTensor has no rule
for the CPU SDPA kernel, so attention itself runs through the library's ``local_map`` on each rank's heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Llama's ``x.float()``, except that float64 stays float64 (the exact comparison runs in float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rotary_frequencies(head_dim: int, seq: int, dtype: torch.dtype, theta: float = 10000.0) -> torch.Tensor:
    """Complex ``e^{i·pos·freq}``, shape (seq, head_dim / 2), as Llama's ``precompute_freqs_cis``."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64)[: head_dim // 2] / head_dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), freqs).to(upcast(torch.empty(0, dtype=dtype)).dtype)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary(xq: torch.Tensor, xk: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's ``apply_rotary_emb``: pairs of features as complex numbers, rotated by ``freqs``."""
    xq_ = torch.view_as_complex(upcast(xq).reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(upcast(xk).reshape(*xk.shape[:-1], -1, 2))
    freqs = freqs.view(1, xq_.shape[1], 1, xq_.shape[-1])
    xq_out = torch.view_as_real(xq_ * freqs).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(upcast(x)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, sdpa) -> None:
        super().__init__()
        self.heads, self.head_dim, self.sdpa = heads, dim // heads, sdpa
        self.wq, self.wk, self.wv = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        bs, seq, _ = x.shape
        xq, xk, xv = (w(x).view(bs, seq, self.heads, self.head_dim) for w in (self.wq, self.wk, self.wv))
        xq, xk = apply_rotary(xq, xk, freqs)
        out = self.sdpa(xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2))
        return self.wo(out.transpose(1, 2).reshape(bs, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, sdpa) -> None:
        super().__init__()
        self.attention_norm, self.ffn_norm = RMSNorm(dim), RMSNorm(dim)
        self.attention = Attention(dim, heads, sdpa)
        self.feed_forward = FeedForward(dim, 2 * dim)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    def __init__(self, sdpa, dtype: torch.dtype, vocab: int = 32, dim: int = 16, heads: int = 4, layers: int = 2, seq: int = 8) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, heads, sdpa) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)
        self.to(dtype)  # before the complex buffer: Module.to(dtype) would drop its imaginary part
        self.register_buffer("freqs_cis", rotary_frequencies(dim // heads, seq, dtype), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, self.freqs_cis)
        return self.output(self.norm(h))


def causal_sdpa(lib):
    """SDPA on each rank's heads (dim 1 of (batch, heads, seq, head_dim)) through ``lib``'s ``local_map``."""
    heads = [lib.Shard(1)]
    return lib.experimental.local_map(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        out_placements=heads, in_placements=(heads, heads, heads), redistribute_inputs=True,
    )


def tensor_parallel_plan(lib, parallel, layers: int) -> dict:
    """torchtitan's llama3 ``apply_tp`` plan (sequence parallel norms, vocab-sharded loss), with the
    attention projections' outputs left as DTensors."""
    R, S = lib.Replicate(), lib.Shard
    plan = {
        "tok_embeddings": parallel.RowwiseParallel(input_layouts=R, output_layouts=S(1)),
        "norm": parallel.SequenceParallel(),
        "output": parallel.ColwiseParallel(input_layouts=S(1), output_layouts=S(-1), use_local_output=False),
    }
    for i in range(layers):
        plan |= {
            f"layers.{i}.attention_norm": parallel.SequenceParallel(),
            f"layers.{i}.attention": parallel.PrepareModuleInput(input_layouts=(S(1), R), desired_input_layouts=(R, R)),
            f"layers.{i}.attention.wq": parallel.ColwiseParallel(use_local_output=False),
            f"layers.{i}.attention.wk": parallel.ColwiseParallel(use_local_output=False),
            f"layers.{i}.attention.wv": parallel.ColwiseParallel(use_local_output=False),
            f"layers.{i}.attention.wo": parallel.RowwiseParallel(output_layouts=S(1)),
            f"layers.{i}.ffn_norm": parallel.SequenceParallel(),
            f"layers.{i}.feed_forward": parallel.PrepareModuleInput(input_layouts=(S(1),), desired_input_layouts=(R,)),
            f"layers.{i}.feed_forward.w1": parallel.ColwiseParallel(),
            f"layers.{i}.feed_forward.w2": parallel.RowwiseParallel(output_layouts=S(1)),
            f"layers.{i}.feed_forward.w3": parallel.ColwiseParallel(),
        }
    return plan
