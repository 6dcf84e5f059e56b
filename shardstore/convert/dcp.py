"""torch DCP checkpoint directories (``torch.distributed.checkpoint``), read and written with DCP itself
from one process, on local paths.

Reading loads one tensor at a time (``dcp.load`` of a one-entry state dict): DCP reads whole saved items,
so memory is one tensor, and the last one read is kept for the next region of it. Writing hands DCP a
state dict of meta tensors (shapes and dtypes only) and a planner that fetches each tensor from the source
only when DCP writes it, so the source is never held whole.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from shardstore.convert.sources import Region, TensorMeta, TensorSource, apply_region
from shardstore.storage.base import is_local_url

__all__ = ["DcpSource", "write_dcp"]


def local_path(url: str, what: str) -> str:
    """The filesystem path of a local URL; DCP and torch.load read only local files here."""
    if not is_local_url(url):
        raise ValueError(f"{url}: {what} checkpoints are read and written on local paths only; copy it locally first")
    return url.removeprefix("file://")


@contextmanager
def _one_process():
    """DCP warns that it assumes one process when no process group exists: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        yield


class DcpSource:
    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self.url = url
        self._path = local_path(url, "torch DCP")
        metadata = dcp.FileSystemReader(self._path).read_metadata().state_dict_metadata
        self._tensors = {k: TensorMeta(tuple(m.size), m.properties.dtype)
                         for k, m in metadata.items() if isinstance(m, TensorStorageMetadata)}
        self._last: tuple[str, torch.Tensor] | None = None

    def tensors(self) -> dict[str, TensorMeta]:
        return dict(self._tensors)

    def read(self, name: str, region: Region | None = None) -> torch.Tensor:
        if self._last is None or self._last[0] != name:
            self._last = None  # drop the previous tensor before reading the next
            meta = self._tensors[name]
            out = {name: torch.empty(meta.shape, dtype=meta.dtype)}
            with _one_process():
                dcp.load(out, storage_reader=dcp.FileSystemReader(self._path))
            self._last = (name, out[name])
        return apply_region(self._last[1], region)


class _FetchingPlanner(DefaultSavePlanner):
    """Looks each tensor up in the source only when DCP writes it (the state dict holds meta tensors)."""

    def __init__(self, source: TensorSource) -> None:
        super().__init__()
        self._source = source

    def lookup_object(self, index):
        return self._source.read(index.fqn)


def write_dcp(source: TensorSource, url: str, storage_options: dict | None = None, *, progress=None) -> None:
    """Write every tensor of ``source`` as a DCP checkpoint directory at ``url`` (keys are dotted names)."""
    path = local_path(url, "torch DCP")
    shapes = {name: torch.empty(m.shape, dtype=m.dtype, device="meta") for name, m in source.tensors().items()}
    with _one_process():
        dcp.save(shapes, storage_writer=dcp.FileSystemWriter(path, thread_count=1), planner=_FetchingPlanner(source))
    if progress is not None:
        progress(sum(m.nbytes for m in source.tensors().values()))
