"""The storage seam: bytes by key under one root URL, and what the commit protocol needs of a backend.

Like zarr-python's ``Store``, a ``Storage`` is a handful of methods (read, range read, write, list,
delete) so that every backend behaves the same and one conformance suite tests them all. A backend adds
what the commit protocol (``shardstore/commit.py``) builds on: an exclusive create (a claim only one
writer can make: ``O_EXCL``/``link`` locally, ``If-None-Match: *`` on object stores), ``sync`` (what
was written is durable), and, where the backend has them, atomic renames of whole trees.

``Storage(url)`` returns the backend for the URL, as ``pathlib.Path`` returns a ``PosixPath``: a plain
path or ``file://`` URL gets ``LocalStorage`` (``os`` calls: fsync, atomic renames, no symlinks
followed), anything else ``FsspecStorage``.

Keys are relative POSIX paths (``model/w/c.0.1``). Every key is validated before use, so no key can
escape the root (``..``, absolute paths, backslashes, NUL, empty components raise ``UnsafeKeyError``).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Sequence, TypeVar

from shardstore.errors import CorruptCheckpointError, MissingChunkError, UnsafeKeyError
from shardstore.workers import map_in_turn, process_pool

__all__ = ["Storage", "Blob", "HeldLock", "as_views", "blob_nbytes", "check_key", "CURRENT", "VERSION_PREFIX", "ROOM_ALIGN", "ROOM_SLACK", "io_map"]

# Object stores replace a checkpoint by writing a new version under ``<root>/.v-<id>/`` and pointing
# ``<root>/.shardstore-current`` at it (docs/format.md §5); ``pinned`` resolves the pointer.
CURRENT = ".shardstore-current"
VERSION_PREFIX = ".v-"

# A placed read (``read_range_placed``) gets room starting at a multiple of ROOM_ALIGN bytes and holding
# ROOM_SLACK bytes more than it reads: the block-aligned window around any range fits.
ROOM_ALIGN = 4096
ROOM_SLACK = 2 * ROOM_ALIGN

_READ_THREADS = 16

T = TypeVar("T")
R = TypeVar("R")

Bytes = bytes | bytearray | memoryview
Blob = Bytes | Sequence[Bytes]  # what ``Storage.write`` stores: one buffer, or several one after another


def as_views(data: Blob) -> list[memoryview]:
    """``data``'s buffers as flat byte views, in order."""
    parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    return [memoryview(part).cast("B") for part in parts]


def blob_nbytes(data: Blob) -> int:
    return sum(len(view) for view in as_views(data))


def io_pool() -> ThreadPoolExecutor:
    """The process's threads for concurrent range reads."""
    return process_pool("shardstore-read", _READ_THREADS)


def io_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(item) for item in items]``, up to ``_READ_THREADS`` at once on ``io_pool()``, the calling
    thread among them, each taking the next item as it finishes one (``workers.map_in_turn``)."""
    return map_in_turn(io_pool(), _READ_THREADS, fn, items)


def check_key(key: str, root_url: str) -> str:
    """Return ``key`` if it is a safe relative POSIX path, else raise ``UnsafeKeyError``."""
    problem = None
    if not isinstance(key, str) or not key:
        problem = "it is empty or not a string"
    elif key.startswith("/"):
        problem = "it is absolute (leading '/')"
    elif "\\" in key or "\0" in key:
        problem = "it contains a backslash or NUL"
    elif any(part in ("", ".", "..") for part in key.split("/")):
        problem = "it has an empty, '.' or '..' component"
    if problem:
        raise UnsafeKeyError(
            f"unsafe key {key!r} under {root_url}: {problem}; expected a relative POSIX path like "
            "'model/w/c.0.1' that stays inside the checkpoint. Fix the key (state-dict keys are "
            "percent-encoded by shardstore.flatten)"
        )
    return key


def strip_trailing_slash(url: str) -> str:
    while url.endswith("/") and not url.endswith("://"):
        url = url[:-1]
    return url


def is_local_url(url: str) -> bool:
    """A plain path or a ``file://`` URL (no chained or remote protocol)."""
    return "://" not in url or (url.startswith("file://") and "::" not in url)


def refuse_nested(dst: str, src: str) -> None:
    """Refuse a destination that lies inside a source checkpoint (``ck/sub`` of ``ck``): written there, its
    files become files the source's root record does not name, so the source could then never be overwritten or
    deleted as a whole (and a directory target would list the source's own files as its)."""
    inner, outer = (_comparable(url) for url in (dst, src))
    if inner.startswith(outer.rstrip("/") + "/"):
        raise ValueError(f"the destination {dst} lies inside the source {src}; write it beside the source, not into it")


def _comparable(url: str) -> str:
    if is_local_url(url):
        return os.path.realpath(url.removeprefix("file://"))
    return strip_trailing_slash(url)


class HeldLock:
    """A lock ``Storage.lock`` handed out; ``release`` removes it. A context manager too."""

    def held(self) -> bool:
        """Whether the lock file is still the one this holder locked (nobody removed or replaced it)."""
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> "HeldLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Storage:
    """Bytes by key under one root URL. ``Storage(url, storage_options)`` picks the backend.

    ``durable`` (default True): ``sync`` makes everything written so far survive a power cut. With
    False, ``sync`` does nothing (scratch checkpoints, tests that do not need it).
    """

    can_rename_trees = False  # whole trees move atomically (local filesystems)

    def __new__(cls, url: str = "", storage_options: dict[str, Any] | None = None, *, durable: bool = True):
        if cls is Storage:
            if is_local_url(url):
                from shardstore.storage.local import LocalStorage as cls  # noqa: N813 - the backend class
            else:
                from shardstore.storage.remote import FsspecStorage as cls  # noqa: N813
        return super().__new__(cls)

    url: str  # the root URL, as given (without a trailing slash)
    _root: str  # the root as the backend names it (a resolved local path, an fsspec path)
    durable: bool

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def _path(self, key: str) -> str:
        """The backend path of ``key`` under the root, once the key is known to be safe."""
        return f"{self._root}/{check_key(key, self.url)}"

    def key_url(self, key: str) -> str:
        """The full URL of ``key``, for messages."""
        return f"{self.url}/{key}"

    def _missing(self, key: str) -> MissingChunkError:
        return MissingChunkError(
            f"object {self.key_url(key)} does not exist: expected it under {self.url} (a complete save "
            "writes every object its metadata names); the checkpoint is damaged or the key is wrong — "
            "load an earlier checkpoint or re-run the save"
        )

    # -- reads (backends implement read_range, read_range_into, exists, size, list, is_empty) ---------

    def read(self, key: str) -> bytearray:
        """The whole object at ``key``."""
        return self.read_range(key, 0, None)

    def read_range(self, key: str, start: int, stop: int | None) -> bytearray:
        """Bytes ``[start, stop)`` of ``key``; a negative ``start`` with ``stop=None`` is a suffix.

        Raises ``CorruptCheckpointError`` when the object is shorter than the range: a truncated object
        must never pass as data.
        """
        raise NotImplementedError

    def read_suffix(self, key: str, nbytes: int) -> tuple[int, bytearray]:
        """The size of the object at ``key`` and its last ``nbytes`` bytes (all of it, when shorter): a
        shard index and the size that bounds its entries, in one open of a local file."""
        size = self.size(key)
        return size, self.read_range(key, max(0, size - nbytes), size)

    def read_range_into(self, key: str, start: int, out: bytearray | memoryview) -> memoryview:
        """Fill ``out`` with bytes ``[start, start + len(out))`` of ``key``; returns ``out`` as bytes.

        Reading into one reused buffer is much faster than into fresh memory (page faults), and the
        result stays writable, so a tensor can view it.
        """
        raise NotImplementedError

    def _check_length(self, key: str, start: int, stop: int | None, got: int) -> None:
        """``got`` bytes arrived for range ``[start, stop)`` (a suffix when ``start < 0``)."""
        expected = -start if start < 0 else (None if stop is None else stop - start)
        if expected is not None and got != expected:
            raise CorruptCheckpointError(
                f"object {self.key_url(key)} is truncated: expected {expected} bytes at range "
                f"[{start}, {stop}), got {got}; the save was cut short or the object was "
                "overwritten — load an earlier checkpoint or re-run the save"
            )

    def read_ranges(self, requests: list[tuple[str, int, int | None]]) -> list[bytearray]:
        """Many ``read_range`` calls at once, concurrently, results in request order."""
        return io_map(lambda r: self.read_range(*r), requests)

    def read_ranges_into(self, requests: list[tuple[str, int, int]], out: bytearray | memoryview) -> list[memoryview]:
        """Many ranges at once, concurrently, packed one after another into ``out``; views in order."""
        view = memoryview(out).cast("B")
        jobs, pos = [], 0
        for key, start, stop in requests:
            jobs.append((key, start, view[pos : pos + stop - start]))
            pos += stop - start
        if pos > len(view):
            raise ValueError(f"read_ranges_into: {pos} bytes requested, the buffer holds {len(view)}")
        return io_map(lambda job: self.read_range_into(*job), jobs)

    def read_range_scattered(self, key: str, start: int, views: list[memoryview]) -> None:
        """Fill ``views`` one after another with the bytes of ``key`` from ``start``: one ranged read whose
        parts land in separate buffers (a target tensor's memory, a checksum slot). Local files scatter in
        the kernel (``preadv``); other backends fetch the range and copy its parts out."""
        data = memoryview(self.read_range(key, start, start + sum(len(v) for v in views)))
        pos = 0
        for view in views:
            view[:] = data[pos : pos + len(view)]
            pos += len(view)

    def read_scattered(self, requests: list[tuple[str, int, list[memoryview]]]) -> None:
        """Many ``read_range_scattered`` calls at once, concurrently."""
        io_map(lambda r: self.read_range_scattered(*r), requests)

    def read_range_placed(self, key: str, start: int, stop: int, room: memoryview) -> memoryview:
        """Bytes ``[start, stop)`` of ``key`` read into ``room`` wherever in it suits the backend; returns
        the view of ``room`` holding them. ``room`` starts at a multiple of ``ROOM_ALIGN`` and holds
        ``ROOM_SLACK`` bytes more than the range. Why: a local file read around the page cache
        (``O_DIRECT``) reads whole blocks, so it can only land in place where the room around the bytes
        is its to fill; into an exact buffer it goes through a bounce buffer and a copy."""
        return self.read_range_into(key, start, memoryview(room).cast("B")[: stop - start])

    def read_placed(self, requests: list[tuple[str, int, int, memoryview]]) -> list[memoryview]:
        """Many ``read_range_placed`` calls at once, concurrently; their views in request order."""
        return io_map(lambda r: self.read_range_placed(*r), requests)

    def pinned(self) -> "Storage":
        """A read-only view of the checkpoint now at the root that a concurrent commit cannot change under
        it, where the backend can (local trees); else this storage itself."""
        return self

    def private(self) -> "Storage":
        """A view for a tree that only this save writes and nobody reads before it is committed (a
        staging tree): a backend may then skip what protects concurrent readers; else this storage."""
        return self

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def size(self, key: str) -> int:
        """Size of the object at ``key`` in bytes."""
        raise NotImplementedError

    def fingerprint(self, key: str) -> str:
        """A token that changes when the object at ``key`` is replaced, from metadata alone (one stat or
        HEAD, no data read), so an open checkpoint can notice cheaply that another save committed. On S3
        (ETag: the MD5 of the bytes; LastModified: whole seconds) a rewrite with identical bytes within a
        second keeps it; every commit writes a root record with its own commit id, so commits differ."""
        raise NotImplementedError

    def modified(self, key: str) -> float | None:
        """When the object at ``key`` was last written (POSIX seconds), from metadata alone; None where
        the backend does not say."""
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (recursive), relative to the root, sorted."""
        raise NotImplementedError

    def list_names(self, prefix: str) -> list[str]:
        """Names of the entries directly under the root that start with ``prefix`` (one level)."""
        raise NotImplementedError

    def is_empty(self) -> bool:
        """True when nothing at all is stored under the root."""
        raise NotImplementedError

    # -- writes --------------------------------------------------------------------------------------

    def write(self, key: str, data: Blob) -> None:
        """Store ``data`` under ``key`` atomically (readers see the old object, the new one, or none).
        Durable once ``sync`` returns. Several buffers are stored one after another (a small tensor's
        bytes and its shard index, never copied together first)."""
        raise NotImplementedError

    def write_parts(self, key: str, parts: Iterable[bytes | bytearray | memoryview]) -> None:
        """Store the concatenation of ``parts`` under ``key`` as ``write`` does, taking one part at a time
        (an object bigger than memory, written from a generator)."""
        raise NotImplementedError

    def create_exclusive(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` only if nothing is there (``FileExistsError`` otherwise), atomically
        and durably: of writers racing for one key, exactly one succeeds."""
        raise NotImplementedError

    def sync(self) -> None:
        """Make every object written through this ``Storage`` so far, and its name, durable."""
        raise NotImplementedError

    def lock(self, key: str, timeout: float) -> "HeldLock":
        """Hold an exclusive lock named ``key`` (created, and removed on release); waits up to ``timeout``
        seconds for another holder, then raises ``TimeoutError``. Locally a lock dies with its process
        (``flock``), so a killed save never leaves one that blocks."""
        raise NotImplementedError

    def age(self) -> float:
        """Seconds since the root's entries last changed (how long ago a tree was last written to); only
        backends that rename trees need it (sweeping dead staging trees)."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error, so cleanup can be retried."""
        raise NotImplementedError

    def delete_prefix(self, prefix: str = "") -> None:
        """Remove every object under ``prefix`` (all of the root when ``prefix`` is empty)."""
        raise NotImplementedError

    # -- derived storages and whole trees (the commit protocol) ---------------------------------------

    def child(self, prefix: str) -> "Storage":
        """A ``Storage`` rooted at ``prefix`` under this one."""
        return self._derived(self._path(prefix), self.key_url(prefix))

    def _derived(self, root: str, url: str) -> "Storage":
        """A storage of the same backend (and connection) rooted at ``root``, named ``url``."""
        raise NotImplementedError

    def parent(self) -> "Storage":
        """The ``Storage`` of the directory (or prefix) holding this root; ``name`` is this root in it."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        """The last component of the root (``step-100`` for ``.../run/step-100``)."""
        name = self.url.rstrip("/").rsplit("/", 1)[-1]
        if not name or name.endswith(":"):
            raise UnsafeKeyError(f"{self.url} is a filesystem or bucket root: a checkpoint needs a directory of its own")
        return name

    def rename_tree(self, dest: "Storage", *, exchange: bool = False) -> None:
        """Move this whole tree to ``dest`` atomically (backends with ``can_rename_trees``); this
        storage's next ``sync()`` makes the move durable, so a caller can tell a failed move from a
        move made that failed to reach the disk.

        Without ``exchange``, ``dest`` must be absent or an empty directory (``OSError`` otherwise);
        with it, ``dest`` must exist and the two trees trade places in one step.
        """
        raise NotImplementedError(f"{self.url}: this backend cannot rename whole trees atomically")

    def copy_to(self, key: str, dest: "Storage") -> None:
        """Copy one object to the same key under ``dest`` (server-side where the backend can)."""
        raise NotImplementedError

    def link_from(self, source: "Storage", key: str) -> None:
        """Store at ``key`` the object ``source`` holds at ``key`` without moving its bytes through this
        process where the backend can: a hard link on local disks, a server-side copy on object stores
        (an incremental save reuses an unchanged object of the previous checkpoint this way). Each
        checkpoint stays self-contained: deleting ``source`` later leaves this object intact."""
        source.copy_to(key, self)
