"""Compare two checkpoints (any format ``shardstore.convert`` reads) tensor by tensor: keys only in one,
shapes and dtypes that differ, and for the rest the max absolute and relative difference, streamed in
blocks of rows so memory stays bounded whatever the tensor size. Plain values (a step count, config) are
compared too, where both formats hold them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from shardstore.convert.sources import TensorMeta, TensorSource, plain_values, row_blocks

__all__ = ["TensorDiff", "ValueDiff", "diff_sources", "diff_values", "BLOCK_BYTES"]

BLOCK_BYTES = 64 << 20  # rows of one tensor compared at a time


@dataclass(frozen=True)
class TensorDiff:
    """How tensor ``name`` differs: ``status`` is ``same`` (bit for bit), ``values`` (max_abs/max_rel
    say how much), ``dtype``, ``shape``, ``only_a`` or ``only_b``."""

    name: str
    status: str
    a: TensorMeta | None
    b: TensorMeta | None
    max_abs: float = 0.0
    max_rel: float = 0.0

    def to_json(self) -> dict:
        def meta(m):
            return None if m is None else {"shape": list(m.shape), "dtype": str(m.dtype).removeprefix("torch.")}
        return {"key": self.name, "status": self.status, "a": meta(self.a), "b": meta(self.b),
                "max_abs": self.max_abs, "max_rel": self.max_rel}


@dataclass(frozen=True)
class ValueDiff:
    """A plain entry that differs: ``status`` is ``value``, ``only_a`` or ``only_b``; ``a``/``b`` its reprs."""

    name: str
    status: str
    a: str | None
    b: str | None

    def to_json(self) -> dict:
        return {"key": self.name, "status": self.status, "a": self.a, "b": self.b}


def diff_values(a: TensorSource, b: TensorSource) -> list[ValueDiff]:
    """The plain entries that differ, by dotted name (A's order, then B's extra ones); none when either
    format holds tensors only (safetensors), whose lack of values is no difference."""
    if not (a.holds_values and b.holds_values):
        return []
    va, vb = dict(plain_values(a.tree())), dict(plain_values(b.tree()))
    out = []
    for name in [*va, *(n for n in vb if n not in va)]:
        if va.get(name) != vb.get(name):
            status = "only_b" if name not in va else "only_a" if name not in vb else "value"
            out.append(ValueDiff(name, status, va.get(name), vb.get(name)))
    return out


def diff_sources(a: TensorSource, b: TensorSource, progress: Callable[[int], None] | None = None) -> list[TensorDiff]:
    """Every tensor of either source and how it differs, A's order first, then B's extra keys (named as
    A names them where both hold it). ``progress(n)`` gets the bytes of A compared, block by block."""
    ta, tb = a.tensors(), b.tensors()
    out = []
    for name_a, name_b in _pairs(a, b):
        ma, mb = ta.get(name_a), tb.get(name_b)
        name = name_a if name_a is not None else name_b
        if ma is None or mb is None:
            out.append(TensorDiff(name, "only_a" if mb is None else "only_b", ma, mb))
        elif ma.shape != mb.shape:
            out.append(TensorDiff(name, "shape", ma, mb))
        elif ma.dtype != mb.dtype:
            out.append(TensorDiff(name, "dtype", ma, mb))
        else:
            out.append(_compare(name, name_b, a, b, ma, mb, progress))
    return out


def _pairs(a: TensorSource, b: TensorSource) -> list[tuple[str | None, str | None]]:
    """Each tensor of A with the one of B it is compared to (None: the other has none), A's order first.

    By key path first, then by name: a name is made unique within one checkpoint only (``a.b`` beside
    ``a -> b`` names the second by its node path ``a/b``), so where only one side holds both, pairing by
    name alone compared ``a -> b`` with the other side's ``a.b``. Names still pair what key paths cannot
    across formats (a flat ``"l.w"`` key against a nested ``l -> w``)."""
    by_path = {key: name for name, key in b.key_paths.items()}
    pairs = {name: by_path.get(key) for name, key in a.key_paths.items()}
    taken = set(pairs.values())
    left = {name for name in b.key_paths if name not in taken}
    for name, other in pairs.items():
        if other is None and name in left:
            pairs[name] = name
            left.discard(name)
    return [*pairs.items(), *((None, name) for name in b.key_paths if name in left)]


def _compare(name: str, name_b: str, a: TensorSource, b: TensorSource, ma: TensorMeta, mb: TensorMeta, progress) -> TensorDiff:
    same, max_abs, max_rel = True, 0.0, 0.0
    for rows in row_blocks(ma, BLOCK_BYTES):
        region = None if rows is None else (rows,)
        x, y = a.read(name, region), b.read(name_b, region)
        if progress is not None:
            progress(x.numel() * x.element_size())
        if _bitwise_equal(x, y):
            continue
        same = False
        block_abs, block_rel = _differences(x, y)
        max_abs, max_rel = max(max_abs, block_abs), max(max_rel, block_rel)
    return TensorDiff(name, "same" if same else "values", ma, mb, max_abs, max_rel)


def _bitwise_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    x, y = x.contiguous(), y.contiguous()
    if x.dtype == torch.bool or x.dim() == 0:
        return torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
    return torch.equal(x.view(torch.uint8), y.view(torch.uint8))


def _differences(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Max |x - y| and max |x - y| / max(|x|, |y|) (0 where both are 0; NaN where only one is NaN)."""
    wide = torch.complex128 if x.is_complex() else torch.float64
    x, y = x.to(wide), y.to(wide)
    both_nan = torch.isnan(x) & torch.isnan(y)
    delta = torch.where(both_nan, 0.0, (x - y).abs())
    scale = torch.maximum(x.abs(), y.abs())
    rel = torch.where(delta == 0, 0.0, delta / scale)
    return float(delta.max()), float(rel.max())
