"""``FsspecStorage``: any other fsspec URL (``memory://``, ``s3://``, ``gs://``, ``az://``...); the only
module of shardstore that imports fsspec.

Object stores have no directories and no renames, but a single PUT is atomic and, once answered,
durable; an exclusive create is a conditional PUT (``If-None-Match: *`` on S3 and Azure,
``ifGenerationMatch=0`` on GCS: fsspec's ``mode="create"``). Every request is retried on transient
errors (``retry.py``); the client libraries upload large objects in parts (s3fs: multipart above
``2 * chunksize``, 50 MiB parts by default, settable through ``storage_options``).
Backends that are neither (another fsspec filesystem with rename support) write through a temporary
object renamed over the key.
"""

from __future__ import annotations

import datetime
import time
import uuid
from typing import Any, Iterable

from fsspec.core import split_protocol, url_to_fs

from shardstore.errors import CorruptCheckpointError, MissingChunkError, UnsafeKeyError
from shardstore.storage.base import CURRENT, VERSION_PREFIX, Blob, HeldLock, Storage, as_views, strip_trailing_slash
from shardstore.storage.retry import retrying

__all__ = ["FsspecStorage"]

# Protocols whose single PUT is atomic: no temporary object and rename needed.
_ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})
# What fsspec backends report in ``info`` that changes when an object is replaced (s3fs, gcsfs, adlfs, memory).
_TIME_FIELDS = ("LastModified", "last_modified", "mtime", "updated", "created")
_FINGERPRINT_FIELDS = ("size", "ETag", "etag", "generation", "LastModified", "last_modified", "mtime", "created")


def _seconds(stamp: Any) -> float | None:
    """A backend's time stamp (a datetime, an ISO string, or POSIX seconds) as POSIX seconds."""
    if isinstance(stamp, str):
        stamp = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    if isinstance(stamp, datetime.datetime):
        return stamp.timestamp()
    return None if stamp is None else float(stamp)


def _filesystem(url: str, options: dict[str, Any]) -> tuple[Any, str]:
    """The fsspec filesystem and root path of ``url``. A ``gs://`` URL with an ``endpoint_url`` (an
    emulator, a private endpoint) gets gcsfs's plain client. Why: gcsfs's default client first asks
    Google's storage-control API for the bucket's layout, which such endpoints do not serve; that
    lookup times out after 60 s and is not remembered, so every call waited a minute."""
    if split_protocol(url)[0] in ("gs", "gcs") and options.get("endpoint_url"):
        from gcsfs.core import GCSFileSystem

        fs = GCSFileSystem(**options)
        return fs, fs._strip_protocol(url)
    return url_to_fs(url, **options)


class _ObjectLock(HeldLock):
    def __init__(self, storage: "FsspecStorage", key: str) -> None:
        self.storage, self.key, self.released = storage, key, False

    def held(self) -> bool:
        return not self.released and self.storage.exists(self.key)

    def release(self) -> None:
        if not self.released:
            self.storage.delete(self.key)
            self.released = True


class FsspecStorage(Storage):
    """Bytes by key under one fsspec URL."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, *, durable: bool = True) -> None:
        fs, root = _filesystem(url, storage_options or {})
        self._setup(fs, root, strip_trailing_slash(url), durable)

    def _setup(self, fs: Any, root: str, url: str, durable: bool) -> None:
        self._fs = fs
        self._root = root.rstrip("/")
        self.url = url
        self.durable = durable
        protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        self._atomic_put = bool(protocols & _ATOMIC_PUT_PROTOCOLS)

    def _derived(self, root: str, url: str) -> "FsspecStorage":
        other = FsspecStorage.__new__(FsspecStorage)
        other._setup(self._fs, root, url, self.durable)
        return other

    # -- reads ---------------------------------------------------------------------------------------

    def read_range(self, key: str, start: int, stop: int | None) -> bytearray:
        lo, hi = start, stop
        if start < 0:  # a suffix: not every object store takes suffix ranges (Azure does not)
            lo = max(0, self.size(key) + start)
        elif stop is not None and stop <= start:  # object stores answer an empty range with everything
            self.size(key)
            return bytearray()
        data = bytearray(self._fetch(key, lo, hi))
        self._check_length(key, start, stop, len(data))
        return data

    def read_range_into(self, key: str, start: int, out: bytearray | memoryview) -> memoryview:
        view = memoryview(out).cast("B")
        data = self._fetch(key, start, start + len(view))
        view[: len(data)] = data
        self._check_length(key, start, start + len(view), len(data))
        return view

    def _fetch(self, key: str, start: int, stop: int | None) -> bytes:
        """One ranged GET of just ``[start, stop)``."""
        path = self._path(key)
        return self._retry(f"reading {self.key_url(key)}", lambda: self._fs.cat_file(path, start=start, end=stop), key)

    def _retry(self, what: str, call, key: str | None = None):
        """``call()`` with retries on transient errors; a missing ``key`` is reported as such."""
        try:
            return retrying(what, call)
        except FileNotFoundError:
            if key is None:
                raise
            raise self._missing(key) from None
        except TypeError as exc:  # s3fs hands storage options to its client only at the first request
            if "unexpected keyword argument" not in str(exc):
                raise
            scheme = self.url.split("://", 1)[0]
            raise ValueError(f"{what}: the {scheme}:// filesystem refused a storage option ({exc}); "
                             "check the storage_options (-o KEY=VALUE) for a misspelt name") from exc

    def pinned(self) -> "FsspecStorage":
        """The version ``.shardstore-current`` points at (a checkpoint replaced on an object store), else
        this storage: a version is never rewritten, only deleted once another one is current."""
        try:
            name = self.read(CURRENT).decode(errors="replace")
        except MissingChunkError:
            return self
        if not name.startswith(VERSION_PREFIX) or "/" in name:
            raise CorruptCheckpointError(
                f"{self.key_url(CURRENT)} holds {name[:80]!r}, expected the name of a version like "
                f"'{VERSION_PREFIX}<id>' under {self.url}; the checkpoint's pointer is damaged — re-run the save")
        return self.child(name)

    def exists(self, key: str) -> bool:
        path = self._path(key)
        return self._retry(f"looking up {self.key_url(key)}", lambda: self._fs.isfile(path))

    def size(self, key: str) -> int:
        path = self._path(key)
        return int(self._retry(f"looking up {self.key_url(key)}", lambda: self._fs.size(path), key))

    def fingerprint(self, key: str) -> str:
        """What the backend reports of size, etag, generation and modification time (fresh, not cached)."""
        path = self._path(key)
        self._fs.invalidate_cache(path)
        info = self._retry(f"looking up {self.key_url(key)}", lambda: self._fs.info(path), key)
        return repr([(k, str(info[k])) for k in _FINGERPRINT_FIELDS if k in info])

    def modified(self, key: str) -> float | None:
        path = self._path(key)
        self._fs.invalidate_cache(path)  # fresh, not what an earlier listing saw
        info = self._retry(f"looking up {self.key_url(key)}", lambda: self._fs.info(path), key)
        return _seconds(next((info[k] for k in _TIME_FIELDS if info.get(k) is not None), None))

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self._root
        start = len(self._root) + 1
        return sorted(p[start:] for p in self._retry(f"listing {self.url}", lambda: self._fs.find(base)))

    def list_names(self, prefix: str) -> list[str]:
        try:
            entries = self._ls()
        except FileNotFoundError:
            return []
        names = (e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
        return sorted(n for n in names if n.startswith(prefix))

    def is_empty(self) -> bool:
        try:
            return not self._ls()
        except FileNotFoundError:
            return True

    def _ls(self) -> list[str]:
        self._fs.invalidate_cache(self._root)
        return self._retry(f"listing {self.url}", lambda: self._fs.ls(self._root or "/", detail=False))

    # -- writes --------------------------------------------------------------------------------------

    def write(self, key: str, data: Blob) -> None:
        path = self._path(key)
        # Object store clients (botocore) refuse memoryview bodies; one copy is cheap next to a PUT.
        body = data if isinstance(data, (bytes, bytearray)) else b"".join(as_views(data))
        if self._atomic_put:
            self._retry(f"writing {self.key_url(key)}", lambda: self._fs.pipe_file(path, body))
            return
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            self._fs.pipe_file(tmp, body)
            self._fs.mv(tmp, path)
        except BaseException:
            if self._fs.exists(tmp):
                self._fs.rm_file(tmp)
            raise

    def write_parts(self, key: str, parts: Iterable[bytes | bytearray | memoryview]) -> None:
        """One streamed upload (a multipart upload on object stores: the object appears whole, or not at
        all, when it completes)."""
        path = self._path(key)
        target = path if self._atomic_put else f"{path}.tmp-{uuid.uuid4().hex}"
        with self._fs.open(target, "wb") as f:
            for part in parts:
                f.write(part)
        if target != path:
            self._fs.mv(target, path)

    def create_exclusive(self, key: str, data: bytes) -> None:
        """One conditional PUT: ``If-None-Match: *`` (S3, Azure), ``ifGenerationMatch=0`` (GCS), which
        is what fsspec's ``mode="create"`` sends on each. A retry after a reply was lost may find the
        object its own lost try created: it is ours when it holds our (unique) bytes."""
        path, body, tries = self._path(key), bytes(data), []

        def create() -> None:
            tries.append(1)
            self._fs.pipe_file(path, body, mode="create")

        try:
            self._retry(f"creating {self.key_url(key)}", create)
        except FileExistsError:
            if len(tries) == 1 or self.read(key) != body:
                raise

    def lock(self, key: str, timeout: float) -> "_ObjectLock":
        """An exclusively created object. Unlike a local lock it outlives a killed holder
        (``commit_lock.unlock``, ``shardstore unlock``, removes such a one)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.create_exclusive(key, uuid.uuid4().hex.encode())  # unique: see create_exclusive
                return _ObjectLock(self, key)
            except FileExistsError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{self.key_url(key)} is held by another save") from None
                time.sleep(0.01)

    def sync(self) -> None:
        """A finished PUT is already durable on object stores; ``memory://`` has nothing to sync."""

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            self._retry(f"deleting {self.key_url(key)}", lambda: self._fs.rm_file(path))
        except FileNotFoundError:
            pass

    def delete_prefix(self, prefix: str = "") -> None:
        base = self._path(prefix) if prefix else (self._root or "/")
        if self._retry(f"looking up {self.url}", lambda: self._fs.exists(base)):
            self._retry(f"deleting {self.url}/{prefix}", lambda: self._fs.rm(base, recursive=True))

    # -- derived storages ------------------------------------------------------------------------------

    def parent(self) -> "FsspecStorage":
        """The prefix holding this root. A bucket (container) has none: its commit lock ``<url>.lock``
        would have to be another bucket, so a checkpoint there is refused before anything is written."""
        name = self.name
        root = self._root[: -len(name) - 1]
        if not root and not self._fs.root_marker:  # s3fs, gcsfs, adlfs: the root is a bucket itself
            raise UnsafeKeyError(
                f"{self.url} is a bucket root: a checkpoint needs a prefix of its own (its commit lock "
                f"{self.url}.lock sits beside it); save to {self.url}/<name>")
        return self._derived(root, self.url[: -len(name) - 1])

    def copy_to(self, key: str, dest: "Storage") -> None:
        """A server-side copy, where both are one store reached with the same options: fsspec's equality
        (its instance token), not identity, since ``skip_instance_cache=True`` gives every ``Storage``
        an instance of its own."""
        if not isinstance(dest, FsspecStorage) or dest._fs != self._fs:
            raise NotImplementedError(f"copy from {self.url} to {dest.url} crosses filesystems")
        try:
            self._fs.copy(self._path(key), dest._path(key))
        except FileNotFoundError:
            raise self._missing(key) from None
