"""``torch.save`` files of (nested) state dicts: read with ``weights_only=True`` and ``mmap=True`` (tensors
stay in the file's pages until read, so memory stays bounded; a legacy non-zip file is read whole), written with ``torch.save`` (which needs
every tensor in memory at once: the format has no streaming writer). Nesting and plain values are kept
both ways (dict keys, str or int, included; tuple subclasses such as ``torch.Size`` come back as
tuples). A URL of another store goes through a local copy (``localfiles``)."""

from __future__ import annotations

import pickle
import re

import torch

from shardstore.convert.localfiles import LocalCopy, local_target
from shardstore.convert.sources import IndexedSource, Region, TensorMeta, TensorSource, apply_region, flatten_loaded
from shardstore.errors import UnsupportedInputError
from shardstore.flatten import unflatten
from shardstore.inputs import check_sources

__all__ = ["TorchSource", "write_torch", "unpickling_problem"]


def unpickling_problem(exc: Exception) -> str:
    """The gist of a ``weights_only`` refusal: the class it would have had to import. torch words it
    "Unsupported global: GLOBAL x.y" for a class it merely does not allow, and "unsupported GLOBAL x.y whose
    module x is blocked" for one of a module it blocks (``os``, ``subprocess``); its first line advises
    ``weights_only=False``, which would run that code, so it is never shown alone when a name is found."""
    found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", str(exc))
    if found:
        return f"it pickles {found.group(1)}"
    return re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class TorchSource(IndexedSource):
    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self._copy = LocalCopy(url, storage_options, directory=False)
        try:
            loaded = _load(self._copy.path)
        except (pickle.UnpicklingError, RuntimeError) as exc:
            raise UnsupportedInputError(
                f"torch.save file {url} cannot be read with torch.load(weights_only=True) ({unpickling_problem(exc)}): "
                "shardstore reads only tensors and plain values (no pickled code). Check that it is a torch.save "
                "file, or name the format with --from") from exc
        items, tree = flatten_loaded(loaded, url, "torch.save file")
        try:
            check_sources(items)  # as a save checks them, before any output is written
        except UnsupportedInputError as exc:
            raise UnsupportedInputError(f"torch.save file {url}: {exc}") from exc
        super().__init__(url, tree, {key: TensorMeta.of(t) for key, t in items.items()})
        self._tensors = {name: items[key] for name, key in self.key_paths.items()}

    def read(self, name: str, region: Region | None = None) -> torch.Tensor:
        return apply_region(self._tensors[name], region).clone()


def _load(path: str):
    """``torch.load`` with ``weights_only``, mapping the file where it can: a legacy (non-zip) file, which
    ``mmap`` refuses, is read into memory whole."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap can only be used with files saved with" not in str(exc):
            raise
    return torch.load(path, map_location="cpu", weights_only=True)


def write_torch(source: TensorSource, url: str, storage_options: dict | None = None, *, progress=None) -> None:
    """``torch.save`` the state dict of ``source`` (its tree, every tensor read) at ``url``."""
    tensors = {key: source.read(name) for name, key in source.key_paths.items()}
    with local_target(url, storage_options, directory=False) as path:
        torch.save(unflatten(source.tree(), tensors), path)
    if progress is not None:
        progress(sum(t.numel() * t.element_size() for t in tensors.values()))
