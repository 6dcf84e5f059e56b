"""``torch.save`` files of (nested) state dicts: read with ``weights_only=True`` and ``mmap=True`` (tensors
stay in the file's pages until read, so memory stays bounded), written with ``torch.save`` (which needs
every tensor in memory at once: the format has no streaming writer). Local paths only."""

from __future__ import annotations

from typing import Any

import torch

from shardstore.convert.dcp import local_path
from shardstore.convert.sources import Region, TensorMeta, TensorSource, apply_region

__all__ = ["TorchSource", "write_torch"]


class TorchSource:
    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self.url = url
        loaded = torch.load(local_path(url, "torch.save"), map_location="cpu", weights_only=True, mmap=True)
        self._tensors: dict[str, torch.Tensor] = {}
        _collect(loaded, "", self._tensors)

    def tensors(self) -> dict[str, TensorMeta]:
        return {name: TensorMeta(tuple(t.shape), t.dtype) for name, t in self._tensors.items()}

    def read(self, name: str, region: Region | None = None) -> torch.Tensor:
        return apply_region(self._tensors[name], region).clone()


def _collect(value: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Tensors of nested dicts and lists under dotted names (``model.layers.0.w``); other values are
    not tensors and are left out."""
    if isinstance(value, torch.Tensor):
        out[prefix] = value
    elif isinstance(value, dict):
        for key, item in value.items():
            _collect(item, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _collect(item, f"{prefix}.{i}" if prefix else str(i), out)


def write_torch(source: TensorSource, url: str, storage_options: dict | None = None, *, progress=None) -> None:
    """``torch.save`` a flat dict {dotted name: tensor} of ``source`` at ``url``."""
    tensors = {name: source.read(name) for name in source.tensors()}
    torch.save(tensors, local_path(url, "torch.save"))
    if progress is not None:
        progress(sum(t.numel() * t.element_size() for t in tensors.values()))
