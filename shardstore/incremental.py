"""Incremental saves: a cell whose values and layout equal the previous checkpoint's is linked, not rewritten.

Fine-tuning keeps most weights frozen, so most cells of step N hold exactly the values of step N-1. A save
asked to be incremental records, for every shard object it stores, a BLAKE3 digest of the cell's raw
values together with its layout (``digests.CellHasher``) and the object's size, in
``shardstore.digests.json`` at the checkpoint root (written by rank 0 before the root marker, so a
complete checkpoint has its digests). The next incremental save hashes each cell *before encoding it*:
where the previous checkpoint recorded the same digest under the same key (and still holds an object of
the recorded size), the object is stored with ``Storage.link_from`` (a hard link locally, a server-side
copy on object stores) and the cell is never encoded, checksummed or written; only the changed cells go
on to ``cell_writer.write_cells``.

Hashing the values rather than the encoded object is what makes this cheap: the unchanged bulk of the
state costs one pass of BLAKE3 (several GiB/s, the GIL released) instead of encoding, crc32c and a
second hash. Where the cells' memory stays put for the whole save, a thread hashes a few cells ahead, so
the changed cells are encoded and written while the next ones are hashed. Every checkpoint stays
self-contained: a hard link is a second name of the same file, and objects are never modified in place
after commit.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Callable, Iterable, Iterator, TypeVar

import torch

from shardstore.digests import CellHasher, StoredObject, read_digests
from shardstore.cell_writer import WriteStats, layout_of
from shardstore.format import object_key
from shardstore.plan import GlobalSavePlan, WriteTask
from shardstore.storage import Blob, Storage, blob_nbytes

__all__ = ["IncrementalWriter", "check_incremental"]

T = TypeVar("T")
R = TypeVar("R")

Cells = Iterable[tuple[WriteTask, torch.Tensor]]
_HASH_AHEAD = 2  # cells hashed ahead of the one being linked or encoded (a CUDA cell: a host copy each)
_LINKERS = 8  # links made at once (on object stores each is a server-side copy, a round trip or more)


def check_incremental(incremental: object) -> None:
    """``incremental`` is False (no hashing), True (record digests) or the URL of an earlier checkpoint."""
    if not isinstance(incremental, (bool, str)):
        raise TypeError(f"incremental must be False, True or the URL of an earlier checkpoint, got {incremental!r}")


class IncrementalWriter:
    """One rank's side of an incremental save: ``changed`` hashes each cell, links the unchanged ones from
    ``previous`` and hands on the rest to be encoded and written through ``put``; ``objects`` then holds
    the digest and size of every object this rank stored, for the digests file."""

    def __init__(self, previous: Storage | None = None, previous_objects: dict[str, StoredObject] | None = None) -> None:
        self.previous = previous
        self.previous_objects = dict(previous_objects or {})
        self.objects: dict[str, StoredObject] = {}
        self.linked = 0
        self.linked_bytes = 0
        self._hasher = CellHasher()
        self._digests: dict[str, str] = {}  # of the cells handed on, until ``put`` stores them
        self._lock = threading.Lock()  # ``put`` runs on the writer threads

    @classmethod
    def for_save(cls, incremental: bool | str, storage_options: dict | None) -> "IncrementalWriter | None":
        """What stores a save's objects: None (plain writes) unless it is incremental; a writer linking
        from the checkpoint at ``incremental`` when that is a URL."""
        if incremental is False:
            return None
        if incremental is True:
            return cls()
        previous = Storage(incremental, storage_options).pinned()  # on a bucket: the version now current
        return cls(previous, read_digests(previous))

    def changed(self, dest: Storage, plan: GlobalSavePlan, cells: Cells, compressor: str | None,
                stable_cells: bool = False) -> Cells:
        """The cells whose objects must be written; every other one is linked into ``dest`` on the way.

        ``stable_cells``: every cell's values stay put until the save ends (the caller's own tensors, or
        staging memory that no later wave reuses). Cells are then hashed on a thread of their own, up to
        ``_HASH_AHEAD`` ahead of the one being linked or encoded, so hashing goes on while changed cells
        are encoded and written. Otherwise each cell is hashed before the next is asked for, so ``cells``
        may hand out staging memory that is reused once the next cell is asked for.
        """
        arrays = {a.key: a for a in plan.arrays}
        layouts = {a.key: layout_of(a, compressor) for a in plan.arrays}

        def hashed(cell: tuple[WriteTask, torch.Tensor]) -> tuple[WriteTask, torch.Tensor, str, str]:
            task, data = cell
            data = data.cpu()  # a CUDA cell is copied once: hashed here, encoded from the same copy
            key = object_key(arrays[task.key].node, layouts[task.key], task.cell)
            return task, data, key, self._hasher.digest(layouts[task.key], task.cell, data)

        linking: list[tuple[WriteTask, torch.Tensor, str, str, Future]] = []
        with ThreadPoolExecutor(_LINKERS, thread_name_prefix="shardstore-link") as links:
            for task, data, key, digest in _map_ahead(hashed, cells, _HASH_AHEAD if stable_cells else 0):
                old = self._recorded(key, digest)
                if old is None:
                    yield self._handed_on(task, data, key, digest)
                elif stable_cells:  # link on the pool; a cell whose old object is gone is written at the end
                    linking.append((task, data, key, digest, links.submit(self._link, dest, key, old)))
                elif not self._link(dest, key, old):
                    yield self._handed_on(task, data, key, digest)
            for task, data, key, digest, linked in linking:
                if not linked.result():
                    yield self._handed_on(task, data, key, digest)

    def _handed_on(self, task: WriteTask, data: torch.Tensor, key: str, digest: str) -> tuple[WriteTask, torch.Tensor]:
        with self._lock:
            self._digests[key] = digest
        return task, data

    def _link(self, dest: Storage, key: str, old: StoredObject) -> bool:
        """Link the previous checkpoint's object under ``key`` into ``dest`` if it is still there with the
        recorded size (a server-side copy on object stores, so several run at once); whether it was. One
        gone by the time it is linked (its step deleted by hand while this save runs) is written instead."""
        try:
            if self.previous.size(key) != old.nbytes:
                return False
            dest.link_from(self.previous, key)
        except FileNotFoundError:  # a MissingChunkError too
            return False
        self._record(key, old, linked=True)
        return True

    def put(self, dest: Storage, key: str, blob: Blob) -> None:
        """Write one changed object (``cell_writer.write_cells`` calls this from its writer threads)."""
        dest.write(key, blob)
        with self._lock:
            digest = self._digests.pop(key)
        self._record(key, StoredObject(digest, blob_nbytes(blob)), linked=False)

    def account(self, written: WriteStats) -> WriteStats:
        """``write_cells``' stats of the changed objects, with the linked ones added."""
        return replace(written, nbytes=written.nbytes + self.linked_bytes, objects=written.objects + self.linked,
                       linked=self.linked, linked_bytes=self.linked_bytes)

    def _record(self, key: str, stored: StoredObject, linked: bool) -> None:
        with self._lock:
            self.objects[key] = stored
            self.linked += linked
            self.linked_bytes += stored.nbytes if linked else 0

    def _recorded(self, key: str, digest: str) -> StoredObject | None:
        """What the previous checkpoint recorded under ``key`` if it held these very values in this very
        layout (the same digest); else None."""
        old = self.previous_objects.get(key)
        return old if self.previous is not None and old is not None and old.digest == digest else None


def _map_ahead(fn: Callable[[T], R], items: Iterable[T], ahead: int) -> Iterator[R]:
    """``fn`` over ``items`` in order, up to ``ahead`` results computed ahead of the one handed out, on one
    thread of their own; with ``ahead=0`` on this thread, each item before the next is taken."""
    if ahead == 0:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(1, thread_name_prefix="shardstore-hash")
    pending: deque[Future] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
