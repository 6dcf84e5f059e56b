"""Local copies of remote files, for the libraries that read and write only by path.

torch DCP's ``FileSystemReader``/``FileSystemWriter`` and ``torch.load(mmap=True)``/``torch.save`` take
filesystem paths. A URL of any other store (``s3://``, ``memory://``) is therefore read from a temporary
local copy and written to a temporary local file or directory that is then uploaded, all through the
storage seam (``Storage``), in blocks, so memory stays one block whatever the file size. Disk use is the
size of what is copied. A local target is written beside its path under a temporary name and renamed into
place once complete, so a failed or killed convert never leaves a half-written file or directory at the
destination (nor truncates a file there: the destination may be the source itself).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from typing import Iterator

from shardstore.convert.sources import split_url
from shardstore.storage import Storage
from shardstore.storage.base import is_local_url

__all__ = ["LocalCopy", "local_target", "fresh_directory", "BLOCK_BYTES"]

BLOCK_BYTES = 16 << 20


class LocalCopy:
    """The file or directory at ``url`` as a local ``path``: the path itself for a local URL, else a
    temporary copy removed when this object is (or at exit)."""

    def __init__(self, url: str, storage_options: dict | None, *, directory: bool) -> None:
        self._tmp: tempfile.TemporaryDirectory | None = None
        if is_local_url(url):
            self.path = url.removeprefix("file://")
            return
        self._tmp = tempfile.TemporaryDirectory(prefix="shardstore-copy-")
        if directory:
            self.path = self._tmp.name
            _download(Storage(url, storage_options), self.path)
        else:
            parent, name = split_url(url)
            self.path = os.path.join(self._tmp.name, name)
            _download_file(Storage(parent, storage_options), name, self.path)


def _download(storage: Storage, directory: str) -> None:
    for key in storage.list():
        path = os.path.join(directory, *key.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _download_file(storage, key, path)


def _download_file(storage: Storage, key: str, path: str) -> None:
    size = storage.size(key)
    with open(path, "wb") as f:
        for start in range(0, size, BLOCK_BYTES):
            f.write(storage.read_range(key, start, min(size, start + BLOCK_BYTES)))


@contextmanager
def local_target(url: str, storage_options: dict | None, *, directory: bool, last: str | None = None) -> Iterator[str]:
    """A local path to write the file or directory meant for ``url``, put in place when the block ends
    without an error: for a local URL a temporary sibling renamed over it (a directory target must not exist
    or be empty: ``convert`` checks first), for a remote URL a temporary one uploaded (``last``, a file name,
    is uploaded after every other file: the one whose presence tells readers the rest is there)."""
    if is_local_url(url):
        with _sibling(url.removeprefix("file://"), directory) as path:
            yield path
        return
    with tempfile.TemporaryDirectory(prefix="shardstore-out-") as tmp:
        if directory:
            yield tmp
            _upload(tmp, Storage(url, storage_options), last)
        else:
            parent, name = split_url(url)
            path = os.path.join(tmp, name)
            yield path
            Storage(parent, storage_options).write_parts(name, _blocks(path))


@contextmanager
def fresh_directory(url: str, storage_options: dict | None) -> Iterator[str]:
    """The URL to write a new directory meant for ``url`` through the storage seam: a temporary local
    sibling renamed into place once complete, or the remote URL itself (object stores have no renames)."""
    if not is_local_url(url):
        yield url
        return
    with _sibling(url.removeprefix("file://"), True) as path:
        yield path


@contextmanager
def _sibling(path: str, directory: bool) -> Iterator[str]:
    """A fresh ``<path>.converting-<hex>`` beside ``path``, renamed over it when the block ends without an
    error (a file flushed to disk first), removed when it raises."""
    path = os.path.abspath(path.rstrip("/") or "/")
    tmp = f"{path}.converting-{uuid.uuid4().hex[:16]}"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if directory:
        os.mkdir(tmp)
    try:
        yield tmp
        if not directory:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)  # over an empty directory too
    except BaseException:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def _upload(directory: str, storage: Storage, last: str | None) -> None:
    keys = sorted(os.path.relpath(os.path.join(d, f), directory).replace(os.sep, "/")
                  for d, _, files in os.walk(directory) for f in files)
    for key in sorted(keys, key=lambda k: k == last):
        storage.write_parts(key, _blocks(os.path.join(directory, *key.split("/"))))


def _blocks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(BLOCK_BYTES):
            yield block
