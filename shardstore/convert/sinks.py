"""Writing a ``TensorSource`` in each format, and ``convert``, which streams one format into another."""

from __future__ import annotations

from typing import Callable

from shardstore.convert.dcp import write_dcp
from shardstore.convert.safetensors import DEFAULT_MAX_SHARD_BYTES, write_safetensors
from shardstore.convert.sources import FORMATS, Region, TensorSource, ZarrSource, open_source
from shardstore.convert.torchfile import write_torch
from shardstore.plan import DEFAULT_MAX_CELL_BYTES
from shardstore.writer import ArraySpec, plan_layout, tree_of, write_checkpoint

__all__ = ["convert", "write_zarr"]

_PARALLEL_SOURCES = (ZarrSource,)  # sources safe and worth reading from several threads


def write_zarr(source: TensorSource, url: str, storage_options: dict | None = None, *, overwrite: bool = False,
               compressor: str | None = None, progress: Callable[[int], None] | None = None) -> None:
    """Write every tensor of ``source`` as a shardstore checkpoint, one key per dotted name, chunk by chunk
    (cells of at most ``DEFAULT_MAX_CELL_BYTES``), committed like ``save``."""
    tensors = source.tensors()
    plan = plan_layout([ArraySpec((name,), m.shape, m.dtype) for name, m in tensors.items()], DEFAULT_MAX_CELL_BYTES)

    def read(key, box):
        return source.read(key[0], _region(box))

    threads = 4 if isinstance(source, _PARALLEL_SOURCES) else 1
    write_checkpoint(url, plan, read, tree_of([(name,) for name in tensors]), storage_options=storage_options,
                     overwrite=overwrite, compressor=compressor, threads=threads, progress=progress)


def _region(box) -> Region:
    return tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))


def convert(
    src: str, dst: str, to: str, *, storage_options: dict | None = None, src_format: str | None = None,
    overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Callable[[int], None] | None = None,
) -> TensorSource:
    """Stream the checkpoint at ``src`` (format detected unless ``src_format``) into format ``to`` at
    ``dst``; returns the source read."""
    if to not in FORMATS:
        raise ValueError(f"unknown target format {to!r}; expected one of {FORMATS}")
    source = open_source(src, storage_options, src_format)
    if to == "zarr":
        write_zarr(source, dst, storage_options, overwrite=overwrite, progress=progress)
    elif to == "safetensors":
        write_safetensors(source, dst, storage_options, max_shard_bytes=max_shard_bytes, progress=progress)
    elif to == "dcp":
        write_dcp(source, dst, storage_options, progress=progress)
    else:
        write_torch(source, dst, storage_options, progress=progress)
    return source
