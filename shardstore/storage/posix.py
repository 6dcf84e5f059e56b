"""The system calls ``LocalStorage`` is built from: ``flock`` locks, positioned reads and writes, fsync of
files and directories, and the atomic exchange of two directory trees (Linux ``renameat2``). Kept apart
so that ``local.py`` reads as the storage contract and this as the POSIX details under it."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import mmap
import os
import stat

import numpy as np

from shardstore.memcopy import address
from shardstore.storage.base import HeldLock

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_FS_IOC_GETFLAGS = 0x80086601  # <linux/fs.h>, as on 64-bit Linux
_FS_IOC_SETFLAGS = 0x40086602
_FS_TOPDIR_FL = 0x00020000


class FileLock(HeldLock):
    """An ``flock``ed file; the kernel drops the lock when the holding process dies."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd, self.path = fd, path

    def held(self) -> bool:
        return self.fd >= 0 and same_file(self.fd, self.path)

    def release(self) -> None:
        """Remove the file and unlock it; unlocked even where the removal fails (a read-only or failing
        disk), or the lock would be held until the process exits, and every later taker time out."""
        if self.fd >= 0:
            try:
                if same_file(self.fd, self.path):
                    unlink(self.path)  # before unlocking, so a waiter never locks a removed file for good
            finally:
                os.close(self.fd)
                self.fd = -1


def try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


class OpenFile:
    """A regular file open for reading, as a context manager (closed on exit), with the ``fstat`` taken
    when it was opened (checking it is a regular file), so nothing needs a second one."""

    def __init__(self, fd: int, st: os.stat_result) -> None:
        self.fd, self.st = fd, st

    @property
    def size(self) -> int:
        return self.st.st_size

    def __enter__(self) -> "OpenFile":
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def kind_of(mode: int) -> str:
    """What a mode (from ``lstat`` or ``fstat``) that is not the expected kind names, for an error."""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a directory" if stat.S_ISDIR(mode) else "not a regular file"


_IOV_MAX = 1024  # buffers one preadv takes (Linux's IOV_MAX)


def pread_into(fd: int, offset: int, view: memoryview) -> int:
    """Read up to ``len(view)`` bytes at ``offset`` straight into ``view``; returns the count read."""
    return preadv_all(fd, offset, [view])


def preadv_all(fd: int, offset: int, views: list[memoryview]) -> int:
    """Fill ``views`` one after another from the bytes at ``offset`` (short reads resumed, at most
    ``_IOV_MAX`` buffers a call); returns the count read, less than their total only at end of file."""
    views, done, i = list(views), 0, 0
    while i < len(views):
        n = os.preadv(fd, views[i : i + _IOV_MAX], offset + done)
        if not n:
            break
        done += n
        while i < len(views) and n >= len(views[i]):
            n -= len(views[i])
            i += 1
        if n:
            views[i] = views[i][n:]
    return done


def resident(fd: int, offset: int, length: int, size: int | None = None) -> bool:
    """Whether bytes ``[offset, offset + length)`` of the open regular file (of ``size`` bytes, else
    asked) are all in the page cache: ``mincore`` of a read-only mapping of them, which reads nothing.
    False where it cannot be told."""
    mincore = _libc_function("mincore")
    start = offset // mmap.PAGESIZE * mmap.PAGESIZE
    end = min(offset + length, os.fstat(fd).st_size if size is None else size)
    if mincore is None or end <= start:
        return False
    try:
        mapping = mmap.mmap(fd, end - start, prot=mmap.PROT_READ, offset=start)
    except (OSError, ValueError):
        return False
    pages = np.zeros(-(-(end - start) // mmap.PAGESIZE), dtype=np.uint8)
    try:
        view = np.frombuffer(mapping, dtype=np.uint8)
        failed = mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(end - start), ctypes.c_void_p(pages.ctypes.data))
        del view  # the mapping cannot close while a view holds it
    finally:
        mapping.close()
    return failed == 0 and bool((pages & 1).all())


def no_readahead(fd: int) -> None:
    """Reads through ``fd`` fetch exactly the pages asked for (``POSIX_FADV_RANDOM``, this open file only)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)


DIRECT_ALIGN = 4096  # O_DIRECT needs block-aligned addresses, offsets and lengths


def pread_direct(fd: int, offset: int, views: list[memoryview], bounce: memoryview) -> int:
    """Fill ``views`` one after another from the bytes at ``offset`` as ``preadv_all`` does, reading
    around the page cache: ``O_DIRECT`` reads of block-aligned windows into ``bounce`` (block-aligned,
    ideally on huge pages), each copied out. Returns the count read (short only at end of file). Raises
    ``OSError`` (EINVAL) before filling anything where the filesystem refuses ``O_DIRECT``."""
    views = [memoryview(v).cast("B") for v in views]
    out, pos, end = _Scatter(views), offset, offset + sum(len(v) for v in views)
    with _direct_mode(fd):
        while pos < end:
            window = pos // DIRECT_ALIGN * DIRECT_ALIGN
            want = min(len(bounce), -(-end // DIRECT_ALIGN) * DIRECT_ALIGN - window)
            got = preadv_all(fd, window, [bounce[:want]])
            usable = min(window + got, end) - pos
            if usable <= 0:
                break
            out.fill(bounce[pos - window : pos - window + usable])
            pos += usable
            if got < want:
                break  # end of file
    return pos - offset


def pread_direct_placed(fd: int, offset: int, length: int, room: memoryview) -> memoryview:
    """The bytes ``[offset, offset + length)`` read around the page cache straight into ``room``: one
    ``O_DIRECT`` read of the block-aligned window around them, no copy. ``room`` starts block-aligned
    and holds ``length + 2 * DIRECT_ALIGN`` bytes; returns the view of it holding the bytes (short only
    at end of file). Raises ``OSError`` (EINVAL) where the filesystem refuses ``O_DIRECT``."""
    window = offset // DIRECT_ALIGN * DIRECT_ALIGN
    want = -(-(offset + length) // DIRECT_ALIGN) * DIRECT_ALIGN - window
    if address(room) % DIRECT_ALIGN or len(room) < want:
        raise ValueError(f"a placed read of {length} bytes needs {want} block-aligned bytes of room, got {len(room)}")
    with _direct_mode(fd):
        got = preadv_all(fd, window, [room[:want]])
    skip = offset - window
    return room[skip : skip + max(0, min(got - skip, length))]


class _direct_mode:
    """``O_DIRECT`` set on an open file for the span of a ``with`` block (the descriptor is the read's
    own, so nobody else sees it)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._flags = fcntl.fcntl(fd, fcntl.F_GETFL)

    def __enter__(self) -> None:
        fcntl.fcntl(self._fd, fcntl.F_SETFL, self._flags | os.O_DIRECT)

    def __exit__(self, *exc) -> None:
        fcntl.fcntl(self._fd, fcntl.F_SETFL, self._flags)


class _Scatter:
    """Consecutive bytes copied into ``views`` one after another (numpy copies big pieces without
    holding the GIL, so the other read threads go on)."""

    def __init__(self, views: list[memoryview]) -> None:
        self._views, self._i, self._at = views, 0, 0

    def fill(self, data: memoryview) -> None:
        while data and self._i < len(self._views):
            view = self._views[self._i]
            n = min(len(data), len(view) - self._at)
            np.copyto(np.frombuffer(view, dtype=np.uint8)[self._at : self._at + n], np.frombuffer(data[:n], dtype=np.uint8))
            data, self._at = data[n:], self._at + n
            if self._at == len(view):
                self._i, self._at = self._i + 1, 0


def write_all(fd: int, views: list[memoryview], done: int = 0) -> None:
    """Write the concatenation of ``views`` from its byte ``done`` on, at offset ``done`` (one
    ``pwritev`` where the system takes it whole)."""
    total = sum(len(v) for v in views)
    while done < total:
        done += os.pwritev(fd, _after(views, done), done)


def _after(views: list[memoryview], skip: int) -> list[memoryview]:
    """``views`` without their first ``skip`` bytes."""
    out = []
    for view in views:
        if skip < len(view):
            out.append(view[skip:])
        skip = max(0, skip - len(view))
    return out


def gone_is_fine(function, path: str, exc_info) -> None:
    """For ``rmtree``: another process removing the same tree at the same time is not an error."""
    if not issubclass(exc_info[0], FileNotFoundError):
        raise exc_info[1]


def unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_file(fd: int, path: str) -> None:
    """Make a file's bytes durable (``path`` names it, for errors and for tests that record syncs)."""
    _fsync(fd, path)


def fsync_dir(directory: str) -> None:
    """Make a directory's entries (names created, renamed or removed in it) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _fsync(fd, directory)
    finally:
        os.close(fd)


def _fsync(fd: int, path: str) -> None:
    """``os.fsync``, whose error (EIO, ENOSPC: write-back failed) names no file; raised naming ``path``,
    so a failed save says which file or directory did not reach the disk."""
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror, path) from exc


def fsync_path(path: str) -> None:
    """Make the bytes of the file at ``path`` durable (it was written and closed earlier; one deleted
    since needs nothing)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fsync_file(fd, path)
    finally:
        os.close(fd)


@functools.cache
def _libc_function(name: str):
    """A C library function by name (looked up once), or None where this system's C library lacks it."""
    return getattr(ctypes.CDLL(None, use_errno=True), name, None)


def syncfs(path: str) -> bool:
    """Make everything written to the filesystem holding ``path`` durable in one call (Linux
    ``syncfs``, which reports write-back errors since 5.8); False where the system has no ``syncfs``."""
    fn = _libc_function("syncfs")
    if fn is None:
        return False
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if fn(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs of the filesystem holding {path} failed: {os.strerror(err)}")
    finally:
        os.close(fd)
    return True


def mark_top_directory(directory: str) -> None:
    """Ask the filesystem to place ``directory``'s sub-directories as unrelated trees (ext4's ``chattr +T``).

    Why: ext4's allocator puts new directories and files in their parent's block group, and without a
    journal it skips inodes freed in the last minutes by scanning past each of them, so a checkpoint of
    thousands of tensor directories written just after the previous one was deleted crawls (measured:
    2.6 s against 4.3 s for 1000 small tensors). Marked, each tensor directory starts in a group of its
    own, away from the freed inodes. Best effort: other filesystems refuse the flag, which changes nothing.
    """
    if os.uname().sysname != "Linux":  # the request numbers are Linux's
        return
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        flags = bytearray(8)
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags)
        value = int.from_bytes(flags, "little") | _FS_TOPDIR_FL
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, value.to_bytes(8, "little"))
    except OSError:
        pass  # not ext2/3/4 (ENOTTY, EOPNOTSUPP, EINVAL): the hint does not apply
    finally:
        os.close(fd)


def exchange(a: str, b: str) -> None:
    """Swap two directory trees in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``)."""
    renameat2 = _libc_function("renameat2")
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available on this system")
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>


def start_writeback(fd: int) -> None:
    """Start writing the file's dirty pages to the device now and return at once (Linux
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)``: no wait, no metadata, nothing made durable), so that a
    later ``syncfs`` or fsync finds less left to write. Does nothing where the call is missing."""
    fn = _libc_function("sync_file_range")
    if fn is not None:
        fn(fd, ctypes.c_int64(0), ctypes.c_int64(0), _SYNC_FILE_RANGE_WRITE)
