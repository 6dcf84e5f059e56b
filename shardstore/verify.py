"""Check a whole checkpoint without loading it: the root record, every array's ``zarr.json``, and every
inner chunk's crc32c in every shard object, objects checked concurrently.

A load stops at the first bad chunk; ``verify`` goes on and reports each bad one by tensor name, outer
chunk (the object) and inner chunk index, so the damage can be judged (and a whole checkpoint is
checked in one pass). Memory stays bounded: every worker reads one inner chunk at a time into its own
reused buffer.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from shardstore import format as fmt
from shardstore.codec import ArrayLayout, decode_inner_chunk
from shardstore.errors import CorruptCheckpointError
from shardstore.object_check import read_index
from shardstore.format import object_key
from shardstore.flatten import display_names, node_path
from shardstore.storage import Storage

__all__ = ["BadChunk", "VerifyReport", "verify"]

DEFAULT_THREADS = 8


@dataclass(frozen=True)
class BadChunk:
    """One damaged or missing piece: ``cell`` is the outer chunk (one object; None when the array's
    metadata itself is bad), ``inner`` the inner chunk in it (None when the whole object is bad)."""

    name: str
    object_url: str
    cell: tuple[int, ...] | None
    inner: int | None
    problem: str

    def to_json(self) -> dict:
        cell = None if self.cell is None else list(self.cell)
        return {"key": self.name, "object": self.object_url, "chunk": cell, "inner_chunk": self.inner, "problem": self.problem}


@dataclass(frozen=True)
class VerifyReport:
    url: str
    tensors: int
    objects: int
    inner_chunks: int  # verified good
    nbytes: int  # bytes read and checked
    bad: tuple[BadChunk, ...]

    @property
    def ok(self) -> bool:
        return not self.bad

    def to_json(self) -> dict:
        return {"url": self.url, "ok": self.ok, "tensors": self.tensors, "objects": self.objects,
                "inner_chunks": self.inner_chunks, "nbytes": self.nbytes, "bad": [b.to_json() for b in self.bad]}


@dataclass(frozen=True)
class _Object:
    name: str
    key: str
    cell: tuple[int, ...]
    layout: ArrayLayout


@dataclass(frozen=True)
class _Checked:
    chunks: int
    nbytes: int
    bad: tuple[BadChunk, ...]


def verify(
    url: str,
    storage_options: dict | None = None,
    *,
    threads: int = DEFAULT_THREADS,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Verify the checkpoint at ``url``. A missing or invalid root record raises (``CheckpointNotFoundError``,
    ``IncompleteCheckpointError``, ``CorruptCheckpointError``): there is nothing to check chunks against.
    Everything below it is reported, not raised. ``progress(n)`` is called with each object's size."""
    storage = Storage(url, storage_options).pinned()
    root = fmt.read_root(storage)
    names = display_names(root.key_paths()[path] for path in root.tensors)
    records = {name: root.tensors[node_path(key)] for name, key in names.items()}
    bad = [b for name, record in records.items() for b in _check_array(storage, name, record)]
    broken = {b.name for b in bad}
    layouts = {name: r.layout for name, r in records.items() if name not in broken}
    objects = [_Object(name, object_key(records[name].path, layout, cell), cell, layout)
               for name, layout in layouts.items() for cell in layout.chunk_coords()]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(lambda o: _check_object(storage, o, progress), objects))
    bad += [b for r in results for b in r.bad]
    return VerifyReport(url, len(records), len(objects), sum(r.chunks for r in results),
                        sum(r.nbytes for r in results), tuple(bad))


def _check_array(storage: Storage, name: str, record: fmt.TensorRecord) -> list[BadChunk]:
    """The array's own ``zarr.json`` must agree with the root record (else its chunks are not checked)."""
    try:
        fmt.check_arrays(storage, [record])
    except (CorruptCheckpointError, OSError) as exc:
        return [BadChunk(name, storage.key_url(fmt.node_key(record.path)), None, None, str(exc))]
    return []


def _check_object(storage: Storage, obj: _Object, progress: Callable[[int], None] | None) -> _Checked:
    """Every stored inner chunk's crc32c; an inner chunk inside the array that is not stored is bad too."""
    where = storage.key_url(obj.key)
    try:
        ranges = read_index(storage, obj.layout, obj.key, obj.cell, obj.name)
    except (CorruptCheckpointError, OSError) as exc:
        return _Checked(0, 0, (BadChunk(obj.name, where, obj.cell, None, str(exc)),))
    buffer = bytearray(max((r.nbytes for r in ranges if r is not None), default=0))
    bad, chunks, nbytes = [], 0, 0
    for i, (r, box) in enumerate(zip(ranges, obj.layout.inner_boxes(obj.cell))):
        problem = _check_inner(storage, obj, i, r, box, buffer)
        if problem:
            bad.append(BadChunk(obj.name, where, obj.cell, i, problem))
        elif r is not None:
            chunks, nbytes = chunks + 1, nbytes + r.nbytes
    if progress is not None:
        progress(nbytes)
    return _Checked(chunks, nbytes, tuple(bad))


def _check_inner(storage: Storage, obj: _Object, i: int, r, box, buffer: bytearray) -> str | None:
    where = f"{storage.key_url(obj.key)} inner chunk {i} of {obj.name!r}"
    if r is None:
        return None if box is None else f"{where} is not stored, but it lies inside the array"
    try:
        raw = storage.read_range_into(obj.key, r.offset, memoryview(buffer)[: r.nbytes])
        decode_inner_chunk(obj.layout, raw, where)
    except (CorruptCheckpointError, OSError) as exc:
        return str(exc)
    return None
