"""Writing a ``TensorSource`` in each format, and ``convert``, which streams one format into another.

zarr, dcp and torch hold a whole state dict: the source's tree (nesting, plain values) is written with
its tensors. safetensors holds tensors only: the plain values and empty containers it cannot hold are
named in ``Converted.dropped``, never left out silently (DCP keeps no empty dict: those too; and it
stores int dict keys as strings: ``Converted.str_keys`` names them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from shardstore.convert.safetensors import DEFAULT_MAX_SHARD_BYTES, write_safetensors
from shardstore.convert.sources import FORMATS, Region, TensorSource, ZarrSource, open_source, plain_entries
from shardstore.convert.torchfile import write_torch
from shardstore.errors import CheckpointExistsError
from shardstore.plan import DEFAULT_MAX_CELL_BYTES
from shardstore.storage import Storage, refuse_nested
from shardstore.writer import ArraySpec, plan_layout, write_checkpoint

__all__ = ["Converted", "convert", "write_zarr"]

_PARALLEL_SOURCES = (ZarrSource,)  # sources safe and worth reading from several threads


@dataclass(frozen=True)
class Converted:
    """What ``convert`` wrote: tensors and their bytes, the entries the target format cannot hold, and
    the int dict keys it stores as strings."""

    tensors: int
    nbytes: int
    dropped: tuple[str, ...]
    str_keys: tuple[str, ...]


def write_zarr(source: TensorSource, url: str, storage_options: dict | None = None, *, overwrite: bool = False,
               compressor: str | None = None, progress: Callable[[int], None] | None = None) -> None:
    """Write ``source`` (its tree and every tensor, under its key path) as a shardstore checkpoint, chunk by
    chunk (cells of at most ``DEFAULT_MAX_CELL_BYTES``), committed like ``save``."""
    tensors = source.tensors()
    names = {key: name for name, key in source.key_paths.items()}
    specs = [ArraySpec(source.key_paths[name], m.shape, m.dtype) for name, m in tensors.items()]
    plan = plan_layout(specs, DEFAULT_MAX_CELL_BYTES)

    def read(key, box):
        return source.read(names[key], _region(box))

    threads = 4 if isinstance(source, _PARALLEL_SOURCES) else 1
    write_checkpoint(url, plan, read, source.tree(), storage_options=storage_options,
                     overwrite=overwrite, compressor=compressor, threads=threads, progress=progress)


def _region(box) -> Region:
    return tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))


def _dcp():
    """``convert.dcp``, imported by a conversion that involves DCP: it imports torch DCP (~0.9 s),
    which every command of the ``shardstore`` tool would otherwise pay at its start."""
    from shardstore.convert import dcp  # noqa: PLC0415

    return dcp


def dropped_by(to: str, tree: dict) -> list[str]:
    """Dotted names of the entries of ``tree`` that format ``to`` cannot hold."""
    if to == "safetensors":
        return plain_entries(tree)
    return _dcp().dcp_dropped(tree) if to == "dcp" else []


def convert(
    src: str, dst: str, to: str, *, storage_options: dict | None = None, src_format: str | None = None,
    overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Callable[[int], None] | None = None,
) -> Converted:
    """Stream the checkpoint at ``src`` (format detected unless ``src_format``) into format ``to`` at
    ``dst``."""
    if to not in FORMATS:
        raise ValueError(f"unknown target format {to!r}; expected one of {FORMATS}")
    source = open_source(src, storage_options, src_format)
    if isinstance(source, ZarrSource):  # a file inside another format's directory belongs to nobody's record
        refuse_nested(dst, src)
    if to == "dcp" or (to == "safetensors" and not dst.rstrip("/").endswith(".safetensors")):
        _check_fresh_directory(dst, to, storage_options)
    if to == "zarr":
        write_zarr(source, dst, storage_options, overwrite=overwrite, progress=progress)
    elif to == "safetensors":
        write_safetensors(source, dst, storage_options, max_shard_bytes=max_shard_bytes, progress=progress)
    elif to == "dcp":
        _dcp().write_dcp(source, dst, storage_options, progress=progress)
    else:
        write_torch(source, dst, storage_options, progress=progress)
    metas, tree = source.tensors().values(), source.tree()
    str_keys = _dcp().dcp_str_keys(tree) if to == "dcp" else []
    return Converted(len(metas), sum(m.nbytes for m in metas), tuple(dropped_by(to, tree)), tuple(str_keys))


def _check_fresh_directory(url: str, to: str, storage_options: dict | None) -> None:
    """A directory target is written whole, never merged into what is there: files left from another
    checkpoint (stale shards, another index, another DCP data file), or the source's own files when DST is
    SRC, would be read with the new ones or overwritten while still being read."""
    storage = Storage(url, storage_options)
    if not storage.is_empty():
        held = storage.list()[:3]
        raise CheckpointExistsError(
            f"{url} already holds files (e.g. {held}); convert --to {to} writes a new directory and never "
            "writes into or over one. Choose a new DST, or remove this one first (if it is the source, convert "
            "to another path and move it)")
