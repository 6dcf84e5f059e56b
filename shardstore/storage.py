"""Bytes by key under one root URL: the only module of shardstore that imports fsspec.

Like zarr-python's ``Store``, a ``Storage`` is a handful of methods (read, range read, write, list,
delete) so that every backend fsspec knows (a local path, ``file://``, ``memory://``, ``s3://``...)
behaves the same and one conformance suite tests them all.

Keys are relative POSIX paths (``model/w/c/0/1``). Every key is validated before use, so no key can
escape the root (``..``, absolute paths, backslashes, NUL, empty components raise ``UnsafeKeyError``).

Writes never leave a half-written object under its real name: on a local or other rename-capable
filesystem the bytes go to ``<key>.tmp-<uuid>`` and are then renamed over the key; on object stores a
single PUT is already atomic. Local reads go straight into a ``bytearray`` (one copy from the page
cache, and writable, so a tensor can view it without another copy).
"""

from __future__ import annotations

import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from shardstore.errors import CorruptCheckpointError, MissingChunkError, UnsafeKeyError

__all__ = ["Storage", "check_key"]

# Protocols whose single PUT is atomic: no temporary object and rename needed.
_ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})
_READ_THREADS = 16
# What fsspec backends report in ``info`` that changes when an object is replaced (s3fs, gcsfs, adlfs, memory).
_FINGERPRINT_FIELDS = ("size", "ETag", "etag", "generation", "LastModified", "last_modified", "mtime", "created")
_read_pool: tuple[int, ThreadPoolExecutor] | None = None


def _pool() -> ThreadPoolExecutor:
    """One pool per process for concurrent range reads (a forked child gets its own, not dead threads)."""
    global _read_pool
    if _read_pool is None or _read_pool[0] != os.getpid():
        _read_pool = (os.getpid(), ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="shardstore-read"))
    return _read_pool[1]


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
            "'model/w/c/0/1' that stays inside the checkpoint. Fix the key (state-dict keys are "
            "percent-encoded by shardstore.flatten)"
        )
    return key


def _strip_trailing_slash(url: str) -> str:
    while url.endswith("/") and not url.endswith("://"):
        url = url[:-1]
    return url


class Storage:
    """Bytes by key under one root URL, through fsspec."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        fs, root = url_to_fs(url, **(storage_options or {}))
        self._setup(fs, root, _strip_trailing_slash(url))

    def _setup(self, fs: Any, root: str, url: str) -> None:
        self._fs = fs
        self._root = root.rstrip("/")
        self._url = url
        self._local = isinstance(fs, LocalFileSystem)
        protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        self._atomic_put = bool(protocols & _ATOMIC_PUT_PROTOCOLS)

    @classmethod
    def _derived(cls, parent: "Storage", root: str, url: str) -> "Storage":
        child = cls.__new__(cls)
        child._setup(parent._fs, root, url)
        return child

    def __repr__(self) -> str:
        return f"Storage({self._url!r})"

    @property
    def url(self) -> str:
        """The root URL, as given (without a trailing slash)."""
        return self._url

    @property
    def is_local(self) -> bool:
        """True on a local filesystem, where directories rename atomically."""
        return self._local

    def key_url(self, key: str) -> str:
        """The full URL of ``key``, for messages."""
        return f"{self._url}/{key}"

    def _path(self, key: str) -> str:
        return f"{self._root}/{check_key(key, self._url)}"

    def _missing(self, key: str) -> MissingChunkError:
        return MissingChunkError(
            f"object {self.key_url(key)} does not exist: expected it under {self._url} (a complete save "
            "writes every object its metadata names); the checkpoint is damaged or the key is wrong — "
            "load an earlier checkpoint or re-run the save"
        )

    # -- reads ---------------------------------------------------------------------------------------

    def read(self, key: str) -> bytearray:
        """The whole object at ``key``."""
        return self.read_range(key, 0, None)

    def read_range(self, key: str, start: int, stop: int | None) -> bytearray:
        """Bytes ``[start, stop)`` of ``key``; a negative ``start`` with ``stop=None`` is a suffix.

        Raises ``CorruptCheckpointError`` when the object is shorter than the range: a truncated object
        must never pass as data.
        """
        path = self._path(key)
        try:
            if self._local:
                data = _read_local(path, start, stop)
            else:
                data = bytearray(self._fs.cat_file(path, start=start, end=stop))
        except FileNotFoundError:
            raise self._missing(key) from None
        expected = -start if start < 0 else (None if stop is None else stop - start)
        self._check_length(key, start, stop, expected, len(data))
        return data

    def read_range_into(self, key: str, start: int, out: bytearray | memoryview) -> memoryview:
        """Fill ``out`` with bytes ``[start, start + len(out))`` of ``key``; returns ``out`` as bytes.

        Reading into one reused buffer is much faster than into fresh memory (see FACTS.md), and the
        result stays writable, so a tensor can view it.
        """
        view = memoryview(out).cast("B")
        path = self._path(key)
        try:
            if self._local:
                got = _readinto_local(path, start, view)
            else:
                data = self._fs.cat_file(path, start=start, end=start + len(view))
                got = len(data)
                view[:got] = data
        except FileNotFoundError:
            raise self._missing(key) from None
        self._check_length(key, start, start + len(view), len(view), got)
        return view

    def _check_length(self, key: str, start: int, stop: int | None, expected: int | None, got: int) -> None:
        if expected is not None and got != expected:
            raise CorruptCheckpointError(
                f"object {self.key_url(key)} is truncated: expected {expected} bytes at range "
                f"[{start}, {stop}), got {got}; the save was cut short or the object was "
                "overwritten — load an earlier checkpoint or re-run the save"
            )

    def read_ranges(self, requests: list[tuple[str, int, int | None]]) -> list[bytearray]:
        """Many ``read_range`` calls at once, concurrently, results in request order."""
        if len(requests) <= 1:
            return [self.read_range(*r) for r in requests]
        return list(_pool().map(lambda r: self.read_range(*r), requests))

    def read_ranges_into(
        self, requests: list[tuple[str, int, int]], out: bytearray | memoryview
    ) -> list[memoryview]:
        """Many ranges at once, concurrently, packed one after another into ``out``; views in order."""
        view = memoryview(out).cast("B")
        jobs, pos = [], 0
        for key, start, stop in requests:
            jobs.append((key, start, view[pos : pos + stop - start]))
            pos += stop - start
        if pos > len(view):
            raise ValueError(f"read_ranges_into: {pos} bytes requested, the buffer holds {len(view)}")
        return list(_pool().map(lambda job: self.read_range_into(*job), jobs))

    def exists(self, key: str) -> bool:
        return self._fs.isfile(self._path(key))

    def size(self, key: str) -> int:
        """Size of the object at ``key`` in bytes."""
        path = self._path(key)
        try:
            return int(self._fs.size(path))
        except FileNotFoundError:
            raise self._missing(key) from None

    def fingerprint(self, key: str) -> str:
        """A token that changes when the object at ``key`` is replaced, from metadata alone (one stat or
        HEAD, no data read): size, mtime and inode locally (writes rename a new inode in), else whatever
        the backend reports of size, etag, generation and modification time."""
        path = self._path(key)
        try:
            if self._local:
                st = os.stat(path)
                return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
            self._fs.invalidate_cache(path)
            info = self._fs.info(path)
        except FileNotFoundError:
            raise self._missing(key) from None
        return repr([(k, str(info[k])) for k in _FINGERPRINT_FIELDS if k in info])

    def list(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (recursive), relative to the root, sorted."""
        base = self._path(prefix) if prefix else self._root
        start = len(self._root) + 1
        return sorted(p[start:] for p in self._fs.find(base))

    def is_empty(self) -> bool:
        """True when nothing at all is stored under the root (cheaper than ``list``: one level)."""
        try:
            return not self._fs.ls(self._root or "/", detail=False)
        except FileNotFoundError:
            return True

    # -- writes --------------------------------------------------------------------------------------

    def write(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` under ``key`` atomically (readers see the old object, the new one, or none)."""
        path = self._path(key)
        if self._atomic_put:
            # Object store clients (botocore) refuse memoryview bodies; one copy is cheap next to a PUT.
            self._fs.pipe_file(path, data if isinstance(data, (bytes, bytearray)) else bytes(data))
            return
        self._make_parent(path)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            self._fs.pipe_file(tmp, data)
            self._fs.mv(tmp, path)
        except BaseException:
            if self._fs.exists(tmp):
                self._fs.rm_file(tmp)
            raise

    def _make_parent(self, path: str) -> None:
        """Local filesystems need the directory before the file; object stores have no directories."""
        if self._local:
            os.makedirs(os.path.dirname(path), exist_ok=True)

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error, so cleanup can be retried."""
        path = self._path(key)
        try:
            self._fs.rm_file(path)
        except FileNotFoundError:
            pass

    def delete_prefix(self, prefix: str = "") -> None:
        """Remove every object under ``prefix`` (all of the root when ``prefix`` is empty)."""
        base = self._path(prefix) if prefix else (self._root or "/")
        if self._fs.exists(base):
            self._fs.rm(base, recursive=True)

    # -- derived storages (used by the commit protocol in shardstore.format) -------------------------

    def child(self, prefix: str) -> "Storage":
        """A ``Storage`` rooted at ``prefix`` under this one."""
        return Storage._derived(self, self._path(prefix), self.key_url(prefix))

    def sibling(self, suffix: str) -> "Storage":
        """A ``Storage`` whose root is this root's name plus ``suffix`` (``<url>.staging-<id>``)."""
        check_key(suffix, self._url)
        if "/" in suffix or not self._root.strip("/"):
            raise UnsafeKeyError(f"cannot make a sibling of {self._url} with suffix {suffix!r}")
        return Storage._derived(self, self._root + suffix, self._url + suffix)

    def rename_to(self, dest: "Storage") -> None:
        """Move the whole tree to ``dest`` in one atomic rename (local filesystems only).

        ``dest`` must not exist: a rename onto an existing directory would nest instead of replace.
        """
        if not (self._local and dest._fs is self._fs):
            raise NotImplementedError(f"atomic rename of {self._url} needs a local filesystem")
        if self._fs.exists(dest._root):
            raise FileExistsError(f"cannot rename {self._url} to {dest.url}: the destination exists")
        os.rename(self._root, dest._root)

    def copy_to(self, key: str, dest: "Storage") -> None:
        """Copy one object to the same key under ``dest`` (server-side where the backend can)."""
        if dest._fs is not self._fs:
            raise NotImplementedError(f"copy from {self._url} to {dest.url} crosses filesystems")
        target = dest._path(key)
        dest._make_parent(target)
        try:
            self._fs.copy(self._path(key), target)
        except FileNotFoundError:
            raise self._missing(key) from None


def _read_local(path: str, start: int, stop: int | None) -> bytearray:
    """Read ``[start, stop)`` of a local file (clipped to its size) into a new ``bytearray``."""
    size = os.stat(path).st_size
    lo = max(0, size + start) if start < 0 else min(start, size)
    hi = size if stop is None else min(max(stop, lo), size)
    buf = bytearray(hi - lo)
    got = _readinto_local(path, lo, memoryview(buf))
    return buf if got == len(buf) else buf[:got]


def _readinto_local(path: str, start: int, view: memoryview) -> int:
    """Read up to ``len(view)`` bytes at ``start`` straight into ``view``; returns the count read."""
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        done = 0
        while done < len(view):
            n = f.readinto(view[done:])
            if not n:
                break
            done += n
        return done
