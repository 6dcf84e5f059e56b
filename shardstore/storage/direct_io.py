"""Which bytes of a local file move around the page cache (``O_DIRECT``), and how.

Cold reads of 1 MiB or more go around the page cache: the device then gets requests of several MiB
(from 2 MiB pages) where the cache's 4 KiB pages cut them at 1 MiB (254 segments). Cold reads of a
2 GiB file here, 16 threads: 1.6-1.8 GiB/s that way against 0.55-0.95 GiB/s through the page cache.
Bytes the cache holds are copied from it, and a buffered read asks for exactly its bytes: the kernel's
readahead (8 MiB here) would fetch the neighbouring column bands that other ranks read. Big aligned
writes go around it too (no page-cache copy, no dirty pages for fsync to flush: ~1.5x the bandwidth of
buffered writes plus fsync, measured). A filesystem that refuses ``O_DIRECT`` (tmpfs, some network
filesystems) is then read and written through the page cache.
"""

from __future__ import annotations

import errno
import os
import threading

from shardstore.buffers import staging_buffer
from shardstore.storage import posix

__all__ = ["DirectIO", "bounce_buffer"]

_ALIGN = posix.DIRECT_ALIGN
_WRITE_MIN = 1 << 20  # below this, O_DIRECT gains nothing over the page cache
_SYNC_WRITE_MIN = 8 << 20  # heads from this size are written O_DSYNC: durable as they land (``write_head``)
_READ_MIN = 1 << 20  # reads from this size go around the page cache when it does not hold them
_BOUNCE_BYTES = (4 << 20) + 2 * _ALIGN  # a 4 MiB range at any offset in one aligned O_DIRECT read

_bounce = threading.local()


def bounce_buffer() -> memoryview:
    """This thread's buffer for ``O_DIRECT`` reads (on huge pages, block-aligned), kept for its life:
    the read threads are a long-lived pool, so a load's reads reuse memory already touched."""
    if not hasattr(_bounce, "buffer"):
        _bounce.buffer = memoryview(staging_buffer(_BOUNCE_BYTES))
    return _bounce.buffer


class DirectIO:
    """Reads and writes of open local files, around the page cache where that pays; ``ok`` turns False
    for good once the filesystem refuses ``O_DIRECT``."""

    def __init__(self) -> None:
        self.ok = hasattr(os, "O_DIRECT")

    def pread(self, f: posix.OpenFile, start: int, views: list[memoryview]) -> int:
        """Fill ``views`` from the file's bytes at ``start``; the count read (short only at its end). A cold
        read of ``_READ_MIN`` bytes or more goes ``O_DIRECT`` into this thread's bounce buffer, then is
        copied out."""
        if self._goes_direct(f, start, sum(len(v) for v in views)):
            try:
                return posix.pread_direct(f.fd, start, views, bounce_buffer())
            except OSError as exc:
                self._refused(exc)
        return _pread_buffered(f, start, views)

    def pread_placed(self, f: posix.OpenFile, start: int, length: int, room: memoryview) -> memoryview:
        """``pread`` of one range into ``room`` wherever in it suits (``Storage.read_range_placed``): a direct
        read lands in place, where the room is block-aligned (memory under ``HUGE_PAGE`` is not a mapping
        of its own); the view holding the bytes."""
        if posix.address(room) % _ALIGN:
            return room[: self.pread(f, start, [room[:length]])]
        if self._goes_direct(f, start, length):
            try:
                return posix.pread_direct_placed(f.fd, start, length, room)
            except OSError as exc:
                self._refused(exc)
        return room[: _pread_buffered(f, start, [room[:length]])]

    def write_head(self, path: str, view: memoryview) -> int:
        """Write the block-aligned head of ``view`` to the new file ``path`` with ``O_DIRECT``; the bytes
        written (0 where the data is small or unaligned, or the filesystem refuses O_DIRECT). A head of
        ``_SYNC_WRITE_MIN`` bytes or more is written ``O_DSYNC`` too: durable when the write returns.

        Why: a device with a write cache (the benchmark VM's disk) takes O_DIRECT writes into it at once
        and persists them only when flushed, and a flush holds up the writes behind it; so a save whose
        objects are all flushed at the end pays for encoding them, then for persisting them, one after
        the other (1 GiB in one process: writes done 0.8-1.0 s in, then a 1.45 s flush). Written
        ``O_DSYNC``, each object is persisted while the next ones are encoded: 1 GiB, fresh processes
        alternating with the code before, first save 2.57 -> 2.30 s in one process, 2.50 -> 2.27 s on
        2 ranks, 2.65 -> 2.31 s on 4 (medians of 3-4 starts). Smaller heads wait for ``sync()``: a
        flush each cost more than it overlapped (1 GiB in 2 MiB writes: 2.6 s against 2.1 s)."""
        head = len(view) // _ALIGN * _ALIGN
        if head < _WRITE_MIN or posix.address(view) % _ALIGN or not self.ok:
            return 0
        durable_now = os.O_DSYNC if head >= _SYNC_WRITE_MIN and hasattr(os, "O_DSYNC") else 0
        try:
            fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC | durable_now)
        except OSError as exc:
            self._refused(exc)
            return 0
        try:
            posix.write_all(fd, [view[:head]])
        finally:
            os.close(fd)
        return head

    def _goes_direct(self, f: posix.OpenFile, start: int, length: int) -> bool:
        return length >= _READ_MIN and self.ok and not posix.resident(f.fd, start, length, f.size)

    def _refused(self, exc: OSError) -> None:
        """Re-raise ``exc`` unless it is the filesystem refusing ``O_DIRECT``: then stop using it."""
        if exc.errno != errno.EINVAL:
            raise exc
        self.ok = False


def _pread_buffered(f: posix.OpenFile, start: int, views: list[memoryview]) -> int:
    """Fill ``views`` through the page cache, asking for exactly their bytes: no readahead, unless they
    reach the file's end, past which there is nothing to read ahead (a small object read whole; each
    call that releases the GIL costs a thousand-object load a wait for it on every read thread)."""
    if start + sum(len(v) for v in views) < f.size:
        posix.no_readahead(f.fd)
    return posix.preadv_all(f.fd, start, views)
