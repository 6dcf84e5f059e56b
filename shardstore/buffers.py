"""Host memory for bytes on their way to or from storage: fresh staging memory (on huge pages where it
meets ``O_DIRECT``), and the slab a save encodes its objects into, bounded in bytes.

Touching fresh memory costs a page fault per 4 KiB page, and the kernel clears a huge page on its first
touch (filling fresh memory was ~4x slower than copying here), so a save encodes every object into one
slab of ``budget`` bytes (or of its biggest object, where that is bigger), its lowest free bytes first:
a rank's peak memory during a save is its shard plus the slab, whatever the number and size of its
objects. The slab outlives the save: the next save of the process encodes into the same memory, and
the first save faults it in on a thread of its own just ahead of the encoder (``FaultAhead``). A load's
landing scratch is the same kind of memory and is kept the same way (``take_kept`` / ``keep``): one
piece of memory per process, so a job that resumes and then saves encodes into the pages its load
faulted in, and repeated loads land in warm pages (a 50 MiB load of 10 tensors: fetching into fresh
scratch took 0.08 s from the page cache, into reused scratch 0.01 s).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections import deque
from concurrent.futures import Future

import torch

__all__ = ["staging_buffer", "FaultAhead", "EncodeSlab", "fault_in", "take_kept", "keep", "HUGE_PAGE"]

HUGE_PAGE = 2 << 20  # smaller buffers gain nothing from a mapping of their own
_MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault pages in, writable, without writing them
_FAULT_STEP = 4 << 20  # bytes faulted in per call, lowest first
_FAULT_AHEAD = 32 << 20  # how far past the furthest byte in use memory is faulted in ahead
_FAULT_IDLE = 1.0  # seconds a fault-in thread waits for more to do before it ends


def staging_buffer(nbytes: int, huge_pages: bool = True):
    """Fresh host memory for bytes on their way to or from storage, a mapping of its own (page-aligned,
    as ``O_DIRECT`` needs) from ``HUGE_PAGE`` bytes on.

    ``huge_pages`` asks for transparent huge pages: ``O_DIRECT`` from or into them ran at about twice
    the speed of 4 KiB pages here (a request carries at most 254 pages), and touching fresh memory costs
    a page fault per 4 KiB page otherwise. But the kernel clears a whole huge page on its first touch,
    so memory that is only ever filled by the CPU, once, fills faster without them (a fresh 1 GiB copy
    here: ~1.9 GiB/s on 4 KiB pages, ~0.95 on huge pages)."""
    if nbytes < HUGE_PAGE:
        return bytearray(nbytes)
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) if hasattr(mmap, "MAP_ANONYMOUS") else bytearray(nbytes)
    if huge_pages and hasattr(buffer, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return buffer


class FaultAhead:
    """Faults fresh memory in on a thread of its own, lowest bytes first, at most ``_FAULT_AHEAD``
    bytes past the furthest byte its user asked for (``want``); ``stop`` ends it for good.

    Why: a process's first save spent most of its extra time faulting its fresh encode slab in (a trap
    per page, the kernel clearing each) on the thread that encodes; faulted in on another core just ahead
    of the encoder, the pages are there when it gets to them. Only just ahead: faulting a whole 256 MiB
    slab made four ranks on two cores fault in memory they never used. Measured: see ``EncodeSlab``.
    ``madvise`` runs without the GIL (ctypes releases it)."""

    def __init__(self, memory: torch.Tensor, madvise) -> None:
        self._memory, self._madvise = memory, madvise  # the memory stays mapped while a thread runs
        self._done = self._wanted = 0
        self._stopped = self._running = False
        self._cond = threading.Condition()

    @classmethod
    def of(cls, memory: torch.Tensor) -> "FaultAhead | None":
        """One for ``memory`` where the system can (Linux 5.14+), else None: pages fault in as written."""
        madvise = _libc_madvise()
        return None if madvise is None or memory.numel() < HUGE_PAGE else cls(memory, madvise)

    def want(self, upto: int) -> None:
        """Fault in up to ``_FAULT_AHEAD`` past byte ``upto``; a thread runs while there is some to do."""
        with self._cond:
            self._wanted = max(self._wanted, min(upto + _FAULT_AHEAD, self._memory.numel()))
            if not (self._running or self._stopped) and self._done < self._wanted:
                self._running = True
                threading.Thread(target=self._run, name="shardstore-fault-in", daemon=True).start()
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        start = self._memory.data_ptr()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopped or self._done < self._wanted, timeout=_FAULT_IDLE)
                if self._stopped or self._done >= self._wanted:
                    self._running = False
                    return
                lo, hi = self._done, min(self._done + _FAULT_STEP, self._wanted)
            refused = self._madvise(ctypes.c_void_p(start + lo), ctypes.c_size_t(hi - lo), _MADV_POPULATE_WRITE)
            with self._cond:
                self._done, self._stopped = hi, self._stopped or refused != 0  # refused: an older kernel


def fault_in(memory: torch.Tensor) -> None:
    """Fault all of ``memory`` (uint8, over ``staging_buffer``) in on a thread of its own (``FaultAhead``) where
    the system can: a load's fresh landing scratch, which its first reads would otherwise fault in on
    the threads that read and verify (1 GiB loaded by a fresh process, page cache dropped, 4 starts
    each: 1.06-1.26 s before, 0.75-0.87 s after)."""
    fault = FaultAhead.of(memory)
    if fault is not None:
        fault.want(memory.numel())


def _libc_madvise():
    try:
        return ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # no C library to look in (Windows), or no madvise
        return None


class EncodeSlab:
    """One slab of memory that encoded objects are carved from while their writes are in flight.

    ``take(nbytes)`` waits for the oldest writes until fewer than ``slots`` are in flight and a
    block-aligned stretch of ``nbytes`` is free of every region in flight (the lowest such), then hands
    it back. ``busy(buffer, future)`` marks the stretch just taken in flight until ``future``
    completes (a write of memory outside the slab counts toward ``slots`` too: ``wait_for_slot``, then
    ``busy(None, future)``); ``drain()`` waits for every write and raises the first error. The slab
    holds ``budget`` bytes, or the biggest object's size where that is more (that object waits for
    every write before it and takes the slab whole).

    Why one slab, and not a buffer per object: with objects of mixed sizes (1-256 MiB) buffers that
    fit none of the next ones were dropped and fresh ones mapped, so a save of 1 GiB faulted in about
    1 GiB of fresh memory; clearing those huge pages was a third of the save's CPU. With
    ``kept``, the slab is handed to the next one of the process when this one closes (not one over
    ``KEEP_LIMIT`` bytes: a process saving one huge unsharded tensor would hold its size for good).
    With ``fault_ahead`` (where a core is spare: ``workers.spare_core``) a fresh slab is faulted in
    just ahead of the encoder (``FaultAhead``): 1 GiB saved by a fresh process, page cache dropped,
    1.69-2.30 s before, 1.35-1.69 s after (median 2.07 against 1.48 s, 4 starts each); but four ranks on two
    cores, each faulting ahead, saved 1 GiB in 2.42-2.84 s against 1.75-2.59 s without.
    """

    def __init__(self, budget: int, slots: int, kept: bool = False, fault_ahead: bool = False) -> None:
        self.budget, self.slots, self._kept, self._fault_ahead = budget, slots, kept, fault_ahead
        self._slab: torch.Tensor | None = take_kept() if kept else None
        self._flight: deque[tuple[int, int, Future]] = deque()  # (start, stop, write), oldest first
        self._taken = (0, 0)
        self._fault: FaultAhead | None = None  # faulting a fresh slab in ahead of use (``fault_ahead``)

    @property
    def held(self) -> int:
        """Bytes of the slab (0 before the first ``take``)."""
        return 0 if self._slab is None else self._slab.numel()

    def take(self, nbytes: int) -> torch.Tensor:
        size = -(-max(nbytes, 1) // _ALIGN) * _ALIGN
        if self.held < size:
            self.drain()  # a bigger slab replaces this one once nothing is written from it
            self._slab = torch.frombuffer(staging_buffer(max(self.budget, size)), dtype=torch.uint8)
            self._stop_faulting()
            self._fault = FaultAhead.of(self._slab) if self._fault_ahead else None
        self._retire_ended()
        start = self._place(size)
        while start is None:
            self._retire()
            start = self._place(size)
        self._taken = (start, start + size)
        if self._fault is not None:
            self._fault.want(start + size)
        return self._slab[start : start + size]

    def busy(self, buffer: torch.Tensor | None, future: Future) -> None:
        """Mark ``buffer`` (what ``take`` just handed out; None: a write from memory outside the slab,
        after ``wait_for_slot``) in flight until ``future`` completes."""
        self._flight.append((*self._taken, future) if buffer is not None else (0, 0, future))

    def wait_for_slot(self) -> None:
        """Wait until fewer than ``slots`` writes are in flight (raising the first error)."""
        self._retire_ended()
        while len(self._flight) >= self.slots:
            self._retire()

    def drain(self) -> None:
        while self._flight:
            self._retire()

    def close(self) -> None:
        """Once every write has ended (a failed save's too): with ``kept``, hand the slab on."""
        if self._kept and self._slab is not None and all(f.done() for *_, f in self._flight):
            keep(self._slab)
        self._stop_faulting()
        self._slab, self._flight = None, deque()

    def _stop_faulting(self) -> None:
        if self._fault is not None:
            self._fault.stop()
            self._fault = None

    def _place(self, size: int) -> int | None:
        """The lowest offset with ``size`` bytes free of every region in flight; None while there is
        none, or ``slots`` writes are in flight. Lowest first: a slab is faulted in only as far as the
        writes in flight need (going round a fresh 256 MiB slab in order, four ranks on two cores faulted
        in 1 GiB on their first save, slower than their writes), and later saves reuse those pages."""
        if len(self._flight) >= self.slots:
            return None
        end = 0
        for start, stop, _ in sorted(self._flight, key=lambda region: region[:2]):
            if start - end >= size:
                return end
            end = stop
        return end if self.held - end >= size else None

    def _retire_ended(self) -> None:
        """Forget the regions whose writes have ended (raising the first error), oldest or not."""
        ended, running = [], deque()
        for region in self._flight:  # one look at each: a write ending meanwhile is kept, not lost
            (ended if region[2].done() else running).append(region)
        self._flight = running
        for *_, future in ended:
            future.result()

    def _retire(self) -> None:
        *_, future = self._flight.popleft()
        future.result()


_ALIGN = 4096  # where each object starts in the slab: O_DIRECT writes need block-aligned memory
KEEP_LIMIT = 512 << 20  # the most staging memory a process keeps between saves and loads

_kept: tuple[int, torch.Tensor | None] = (0, None)  # (pid, memory): a forked child starts without one
_kept_lock = threading.Lock()


def take_kept(at_least: int = 0) -> torch.Tensor | None:
    """The staging memory the process kept (uint8), if it holds ``at_least`` bytes: it is the caller's
    until handed back with ``keep``; else None, and it stays kept."""
    global _kept
    with _kept_lock:
        pid, memory = _kept
        if pid != os.getpid() or memory is None or memory.numel() < at_least:
            return None
        _kept = (pid, None)
    return memory


def keep(memory: torch.Tensor) -> None:
    """Keep ``memory`` (from ``take_kept``, or fresh over ``staging_buffer``; nothing may still write
    into it) for the next save or load of the process, unless the memory kept already is bigger (two
    ran at once: the other is returned to the system) or it holds over ``KEEP_LIMIT`` bytes (a process
    that saved one huge unsharded tensor would hold its size for good)."""
    global _kept
    if memory.numel() > KEEP_LIMIT:
        return
    with _kept_lock:
        pid, kept = _kept
        if pid != os.getpid() or kept is None or kept.numel() < memory.numel():
            _kept = (os.getpid(), memory)
