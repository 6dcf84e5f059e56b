"""``LocalStorage``: a directory on a local (or network-mounted POSIX) filesystem, through ``os`` calls.

Why not fsspec's ``LocalFileSystem``: a checkpoint needs what it does not offer: fsync of files and
directories (a returned save survives a power cut), exclusive creates, atomic renames of whole trees
that never replace a non-empty directory (and, on Linux, atomic exchange of two trees), and reads that
never follow a symlink nor block on a FIFO planted in a checkpoint.

Writes go to ``<key>.tmp-<uuid>``, then are renamed over the key (never rewritten in place, so an object
hard-linked into a later checkpoint by ``link_from`` cannot change through either name). In a
``private`` tree (a save's staging tree: nobody reads it before its commit) a new key is created
exclusively and written in place, which spares a rename per object; a key that exists already still
gets a temporary and a rename. When durable,
objects of ``_SYNC_AT_WRITE`` bytes or more written through the page cache are fsync'd by the writing
thread before the rename (their flush overlaps other writes). Every other object (small ones, and big
ones written with ``O_DIRECT``, whose bytes have passed the page cache: only a tail under one block and
the inode wait in memory, and a device's write cache may still hold the rest unless the head went
``O_DSYNC``: ``DirectIO.write_head``) and every directory whose entries changed (a rename landed in it, a
sub-directory was created in it) are remembered and made durable by ``sync()``: one ``syncfs`` of the
filesystem when there are many (a save of a thousand small tensors makes thousands of files and
directories, and one flush of the filesystem costs a fraction of an fsync each: an fsync per 1 MiB
object was half of such a save), else an fsync each; those of ``_WRITEBACK_FROM`` bytes or more start
their write-back as they are written, so that flush finds less left to do.
Reads open each object with ``O_NOFOLLOW`` after checking every directory on the way is a real
directory, and refuse anything but a regular file. A read of 1 MiB or more that the page cache does not
hold goes around it with ``O_DIRECT`` (``direct_io`` says why); smaller ones ask for exactly their bytes.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import threading
import time
import uuid
import weakref
from typing import Any, Callable, Iterable

from shardstore.errors import CorruptCheckpointError, UnsafeKeyError
from shardstore.storage import posix
from shardstore.storage.base import Blob, Storage, as_views, check_key, io_map, strip_trailing_slash
from shardstore.storage.direct_io import DirectIO

__all__ = ["LocalStorage"]

_SYNC_AT_WRITE = 1 << 20  # smaller objects (and bigger ones written with O_DIRECT) are made durable by sync()
_WRITEBACK_FROM = 64 << 10  # objects left to sync() from this size start their write-back at once: the
# final syncfs of a 1000-tensor save (64 KiB-1 MiB each) then took 0.32 s instead of 0.48 (of 1.1 s)
_SYNCFS_FROM = 64  # files and directories pending in sync() from which one syncfs replaces their fsyncs


class LocalStorage(Storage):
    """A checkpoint directory on a local filesystem."""

    can_rename_trees = True

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, *, durable: bool = True) -> None:
        if storage_options:
            raise ValueError(f"{url}: storage_options {sorted(storage_options)} do not apply to a local path (they "
                             "are fsspec options of remote URLs such as s3://); drop them for this one")
        url = strip_trailing_slash(url)
        path = url[len("file://"):] if url.startswith("file://") else url
        # A symlinked root (``latest -> step-100``) is the user's choice: resolve it once, here.
        self._setup(os.path.realpath(path), url, durable)

    def _setup(self, root: str, url: str, durable: bool) -> None:
        self._root = root
        self.url = url
        self.durable = durable
        self._dirty: set[str] = set()  # directories whose entries changed since the last sync
        self._unsynced: set[str] = set()  # files renamed into place since the last sync, not yet fsync'd
        self._checked_dirs: set[str] = set()  # directories known to be real (not symlinks), for reads
        self._made_dirs: set[str] = set()  # directories known to exist, for writes (created or found)
        self._lock = threading.Lock()
        self._direct = DirectIO()  # whether, and how, bytes go around the page cache
        self._pin: int | None = None  # an open directory: reads resolve from it (``pinned``)
        self._private = False  # new keys are written in place (``private``)

    def _derived(self, root: str, url: str) -> "LocalStorage":
        other = LocalStorage.__new__(LocalStorage)
        other._setup(root, url, self.durable)
        return other

    # -- reads ---------------------------------------------------------------------------------------

    def read_range(self, key: str, start: int, stop: int | None) -> bytearray:
        with self._open_for_read(key) as f:
            data, got = self._read_clipped(f, start, stop)
        self._check_length(key, start, stop, got)
        return data

    def read_suffix(self, key: str, nbytes: int) -> tuple[int, bytearray]:
        with self._open_for_read(key) as f:
            return f.size, self._read_clipped(f, max(0, f.size - nbytes), None)[0]

    def _read_clipped(self, f: "posix.OpenFile", start: int, stop: int | None) -> tuple[bytearray, int]:
        """Bytes ``[start, stop)`` clipped to the file (``start < 0``: from its end); and the count read."""
        lo = max(0, f.size + start) if start < 0 else min(start, f.size)
        hi = f.size if stop is None else min(max(stop, lo), f.size)
        data = bytearray(hi - lo)
        return data, self._direct.pread(f, lo, [memoryview(data)])

    def read_range_into(self, key: str, start: int, out: bytearray | memoryview) -> memoryview:
        view = memoryview(out).cast("B")
        with self._open_for_read(key) as f:
            got = self._direct.pread(f, start, [view])
        self._check_length(key, start, start + len(view), got)
        return view

    def read_range_scattered(self, key: str, start: int, views: list[memoryview]) -> None:
        with self._open_for_read(key) as f:
            got = self._direct.pread(f, start, views)
        expected = sum(len(v) for v in views)
        self._check_length(key, start, start + expected, got)

    def read_range_placed(self, key: str, start: int, stop: int, room: memoryview) -> memoryview:
        room = memoryview(room).cast("B")
        with self._open_for_read(key) as f:
            view = self._direct.pread_placed(f, start, stop - start, room)
        self._check_length(key, start, stop, len(view))
        return view

    def _open_for_read(self, key: str) -> "posix.OpenFile":
        """Open ``key`` for reading: no symlink on the way, and a regular file (a FIFO would block)."""
        self._check_dirs(check_key(key, self.url))
        try:
            name, dir_fd = self._locate(key)
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except FileNotFoundError:
            raise self._missing(key) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._not_regular(key, "a symbolic link") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise self._not_regular(key, posix.kind_of(st.st_mode))
        return posix.OpenFile(fd, st)

    def _check_dirs(self, key: str) -> None:
        """Every directory between the root and ``key`` must be a real directory, not a symlink that
        could make a read land in another checkpoint."""
        parts = key.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            rel = "/".join(parts[:i])
            if rel in self._checked_dirs:
                continue
            try:
                name, dir_fd = self._locate(rel)
                mode = os.lstat(name, dir_fd=dir_fd).st_mode
            except FileNotFoundError:
                raise self._missing(key) from None
            if not stat.S_ISDIR(mode):
                raise self._not_regular(rel, posix.kind_of(mode), "a directory")
            self._checked_dirs.add(rel)

    def _not_regular(self, key: str, what: str, expected: str = "a regular file") -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{self.key_url(key)} is {what} where {expected} was expected: shardstore reads only the "
            "checkpoint's own files and never follows links out of it; remove it or re-run the save"
        )

    def _locate(self, key: str) -> tuple[str, int | None]:
        """``key`` as (name, dir_fd) for ``os`` calls: relative to the pinned tree when there is one."""
        if self._pin is None:
            return self._path(key), None
        return check_key(key, self.url), self._pin

    def pinned(self) -> "LocalStorage":
        """A read-only view that keeps reading the tree now at the root even after a save swaps another
        one in (an open directory follows its tree through renames): a load never mixes two
        checkpoints. Once the swapped-out tree is deleted, its reads fail as missing objects."""
        view = self._derived(self._root, self.url)
        try:
            view._pin = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return view  # nothing there to pin: reads report what is missing
        weakref.finalize(view, os.close, view._pin)
        return view

    def private(self) -> "LocalStorage":
        view = self._derived(self._root, self.url)
        view._private = True
        return view

    def exists(self, key: str) -> bool:
        name, dir_fd = self._locate(key)
        try:
            return stat.S_ISREG(os.lstat(name, dir_fd=dir_fd).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def size(self, key: str) -> int:
        """One ``lstat`` (no open): a load checks the size of every object it reads before reading any.
        Refuses what a read refuses: a symlink or anything not a regular file."""
        self._check_dirs(check_key(key, self.url))
        name, dir_fd = self._locate(key)
        try:
            st = os.lstat(name, dir_fd=dir_fd)
        except FileNotFoundError:
            raise self._missing(key) from None
        if not stat.S_ISREG(st.st_mode):
            raise self._not_regular(key, posix.kind_of(st.st_mode))
        return st.st_size

    def fingerprint(self, key: str) -> str:
        """Size, mtime and inode: every write renames a new inode in, so a rewrite shows even at equal size."""
        with self._open_for_read(key) as f:
            st = f.st
        return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"

    def modified(self, key: str) -> float | None:
        with self._open_for_read(key) as f:
            return f.st.st_mtime

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self._root
        start = len(self._root) + 1
        found = []
        for dirpath, _, files in os.walk(base):  # never descends into symlinked directories
            found.extend(os.path.join(dirpath, f)[start:] for f in files)
        return sorted(found)

    def list_names(self, prefix: str) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self._root) if n.startswith(prefix))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def is_empty(self) -> bool:
        try:
            return not os.listdir(self._root)
        except (FileNotFoundError, NotADirectoryError):
            return not os.path.lexists(self._root)

    # -- writes --------------------------------------------------------------------------------------

    def write(self, key: str, data: Blob) -> None:
        path = self._path(key)
        tmp, deferred = self._write_tmp(path, data, defer=True)
        self._replace(tmp, path, deferred=deferred)

    def write_parts(self, key: str, parts: Iterable[bytes | bytearray | memoryview]) -> None:
        def fill(fd: int, tmp: str) -> None:
            for part in parts:  # appended at the file position (write_all writes at given offsets)
                view = memoryview(part).cast("B")
                while view:
                    view = view[os.write(fd, view):]
            if self.durable:
                posix.fsync_file(fd, tmp)

        path = self._path(key)
        self._replace(self._tmp_file(path, fill), path)

    def _replace(self, tmp: str, path: str, deferred: bool = False) -> None:
        """Rename the finished temporary ``tmp`` over ``path`` (a new inode: never a rewrite in place;
        nothing to rename where ``tmp`` is ``path``, a new key of a private tree); ``deferred``: its bytes
        are not durable yet, ``sync()`` makes them so."""
        try:
            if tmp != path:
                os.replace(tmp, path)
        except BaseException:
            posix.unlink(tmp)
            raise
        self._touched(os.path.dirname(path))
        if deferred and self.durable:
            with self._lock:
                self._unsynced.add(path)

    def create_exclusive(self, key: str, data: bytes) -> None:
        """``link`` never replaces an existing name, so of racing writers exactly one succeeds."""
        path = self._path(key)
        tmp, _ = self._write_tmp(path, data, defer=False, in_place=False)
        try:
            os.link(tmp, path)
        finally:
            posix.unlink(tmp)
        self._touched(os.path.dirname(path))
        self.sync()

    def _write_tmp(self, path: str, data: Blob, defer: bool, in_place: bool = True) -> tuple[str, bool]:
        """Write ``data`` to a fresh temporary next to ``path`` (``_tmp_file``); its path, and whether its
        fsync is left to ``sync()`` (only with ``defer``: a small object, or one written with
        ``O_DIRECT``); else it is fsync'd here when durable. Only the first buffer's head can go with
        ``O_DIRECT``."""
        views = as_views(data)
        nbytes = sum(len(v) for v in views)
        deferred = False

        def fill(fd: int, tmp: str) -> None:
            nonlocal deferred
            direct = self._direct.write_head(tmp, views[0]) if self.durable and views else 0
            posix.write_all(fd, views, direct)
            deferred = defer and (nbytes < _SYNC_AT_WRITE or direct > 0)
            if deferred and self.durable and nbytes - direct >= _WRITEBACK_FROM:
                posix.start_writeback(fd)
            if self.durable and not deferred:
                posix.fsync_file(fd, tmp)

        return self._tmp_file(path, fill, in_place), deferred

    def _tmp_file(self, path: str, fill: Callable[[int, str], Any], in_place: bool = True) -> str:
        """A fresh temporary next to ``path`` that ``fill(fd, tmp)`` writes (and fsyncs, when it must be
        durable before its rename); its path: ``path`` itself where the tree is private, ``in_place`` is
        allowed and ``path`` is new."""
        self._make_dirs(os.path.dirname(path))
        try:
            tmp, fd = self._open_new(path, in_place)
        except FileNotFoundError:  # a directory remembered as made was removed since, through another view
            self._made_dirs.clear()
            self._make_dirs(os.path.dirname(path))
            tmp, fd = self._open_new(path, in_place)
        try:
            fill(fd, tmp)
        except BaseException as exc:
            os.close(fd)
            posix.unlink(tmp)
            if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:  # a full disk: say where
                raise OSError(exc.errno, exc.strerror, path) from exc
            raise
        os.close(fd)
        return tmp

    def _open_new(self, path: str, in_place: bool) -> tuple[str, int]:
        """A new file for ``path``, open for writing: ``path`` itself where ``_tmp_file`` allows, else a
        fresh temporary beside it."""
        if self._private and in_place:
            fd = self._create(path)  # None where the key exists already: it gets a temporary
            if fd is not None:
                return path, fd
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        return tmp, self._create(tmp, must_be_new=True)

    @staticmethod
    def _create(path: str, must_be_new: bool = False) -> int | None:
        """A new file at ``path``, open for writing; None if ``path`` exists (unless ``must_be_new``)."""
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            if must_be_new:
                raise
            return None

    def _make_dirs(self, directory: str) -> None:
        """Create ``directory`` and missing parents, remembering each parent whose entries changed.

        ``mkdir`` first, the parents only where it finds none, and every directory remembered: a save of
        a thousand tensors writes two files into each of a thousand new directories, and a ``stat`` before
        each write (a lookup waiting on the parent's lock while other threads create in it) was a fifth
        of that save's time."""
        if directory in self._made_dirs:
            return
        try:
            os.mkdir(directory)
        except FileExistsError:
            pass  # a file there is reported by the write under it
        except FileNotFoundError:
            self._make_dirs(os.path.dirname(directory))
            return self._make_dirs(directory)
        else:
            if directory == self._root:
                posix.mark_top_directory(directory)  # its tensors' directories spread over the disk's groups
            self._touched(os.path.dirname(directory))
        self._made_dirs.add(directory)

    def _touched(self, directory: str) -> None:
        if self.durable:
            with self._lock:
                self._dirty.add(directory)

    def sync(self) -> None:
        with self._lock:
            dirty, self._dirty = list(self._dirty), set()
            files, self._unsynced = list(self._unsynced), set()
        if len(dirty) + len(files) >= _SYNCFS_FROM and posix.syncfs(min(dirty or files, key=len)):
            return
        # Files, then the directories naming them (a name is never durable before its bytes); each group
        # concurrently: the journal batches them.
        for sync_one, paths in ((posix.fsync_path, files), (posix.fsync_dir, dirty)):
            io_map(sync_one, paths)

    def lock(self, key: str, timeout: float) -> "posix.FileLock":
        path = self._path(key)
        self._make_dirs(os.path.dirname(path))
        deadline = time.monotonic() + timeout
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            if posix.try_flock(fd) and posix.same_file(fd, path):
                return posix.FileLock(fd, path)
            os.close(fd)  # held by another, or removed by its holder after we opened it: try again
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.key_url(key)} is locked by another process")
            time.sleep(0.01)

    def age(self) -> float:
        try:
            return time.time() - os.lstat(self._root).st_mtime
        except FileNotFoundError:
            return 0.0

    def delete(self, key: str) -> None:
        posix.unlink(self._path(key))  # if still pending in sync(), posix.fsync_path skips it

    def delete_prefix(self, prefix: str = "") -> None:
        base = self._path(prefix) if prefix else self._root
        if os.path.islink(base) or os.path.isfile(base):
            posix.unlink(base)
        elif os.path.isdir(base):
            shutil.rmtree(base, onerror=posix.gone_is_fine)  # removes links inside, never what they point to
        self._made_dirs.clear()

    # -- derived storages and whole trees --------------------------------------------------------------

    @property
    def name(self) -> str:
        """The last component of the directory the URL reaches, not of the URL: a save through a symlink
        (``latest -> step-100``) or a URL ending in ``.`` or ``..`` then takes the same commit lock and
        staging siblings as a save naming that directory itself (else two racing overwrites, each under
        its own lock, could both commit, the second swapping out and deleting the first's checkpoint)."""
        name = os.path.basename(self._root)
        if not name:
            raise UnsafeKeyError(f"{self.url} is a filesystem root: a checkpoint needs a directory of its own")
        return name

    def parent(self) -> "LocalStorage":
        """The directory holding the resolved root, named by its path (so a staging sibling's URL,
        which every rank opens, names the directory ``begin`` made)."""
        self.name  # noqa: B018 - refuses a filesystem root
        directory = os.path.dirname(self._root)
        return self._derived(directory, f"file://{directory}" if self.url.startswith("file://") else directory)

    def rename_tree(self, dest: "Storage", *, exchange: bool = False) -> None:
        if not isinstance(dest, LocalStorage):
            raise NotImplementedError(f"cannot rename {self.url} onto {dest.url}: not the same kind of storage")
        if exchange:
            posix.exchange(self._root, dest._root)
        else:
            os.rename(self._root, dest._root)  # onto a non-empty directory it fails: never a mix
        self._made_dirs.clear()
        dest._made_dirs.clear()
        for directory in dict.fromkeys((os.path.dirname(self._root), os.path.dirname(dest._root))):
            self._touched(directory)

    def link_from(self, source: "Storage", key: str) -> None:
        """A hard link to ``source``'s object, synced with this tree's own objects: its bytes are durable
        only if ``source`` was saved with ``durable=True`` (on a clean file the fsync costs next to nothing);
        a copy where the two are on different filesystems or ``source`` is remote.
        A pinned ``source`` is linked from its pinned tree, as it is read: by path, a save that swapped
        another checkpoint in at its URL since would hand over that one's object under this one's digest."""
        if not isinstance(source, LocalStorage):
            return super().link_from(source, key)
        source.size(key)  # a regular file reached through real directories, or the error that says why not
        name, dir_fd = source._locate(key)
        path = self._path(key)
        self._make_dirs(os.path.dirname(path))
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            os.link(name, tmp, src_dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            return super().link_from(source, key)
        self._replace(tmp, path, deferred=True)

    def copy_to(self, key: str, dest: "Storage") -> None:
        with self._open_for_read(key) as f:
            data = bytearray(f.size)
            posix.pread_into(f.fd, 0, memoryview(data))
        dest.write(key, data)
