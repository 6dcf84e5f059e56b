"""Host memory for bytes on their way to or from storage: fresh staging memory (on huge pages where it
meets ``O_DIRECT``), and the ring of encode buffers a save reuses, bounded in bytes.

Touching fresh memory costs a page fault per 4 KiB page (filling it was ~4x slower than copying here), so
a save encodes every object into a few reused buffers. The ring holds at most ``budget`` bytes of them
(plus one object bigger than that, which needs its whole size once): a rank's peak memory during a save
is its shard plus the ring, whatever the number and size of its objects.
"""

from __future__ import annotations

import mmap
from collections import deque
from concurrent.futures import Future

import torch

__all__ = ["staging_buffer", "EncodeRing", "HUGE_PAGE"]

HUGE_PAGE = 2 << 20  # smaller buffers gain nothing from a mapping of their own


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


class EncodeRing:
    """Reused uint8 buffers for encoded objects whose writes are in flight.

    ``take(nbytes)`` waits for the oldest writes until the buffers held (in flight and free) leave room
    for ``nbytes`` within ``budget`` and fewer than ``slots`` writes are in flight, then hands back a
    buffer of at least ``nbytes``: a free one that fits, else fresh memory (free buffers are dropped to
    make room). ``busy(buffer, future)`` marks it in flight until ``future`` completes; ``drain()`` waits
    for every write and raises the first error.
    """

    def __init__(self, budget: int, slots: int) -> None:
        self.budget, self.slots = budget, slots
        self._free: list[torch.Tensor] = []
        self._flight: deque[tuple[torch.Tensor, Future]] = deque()

    @property
    def held(self) -> int:
        """Bytes of every buffer the ring keeps (in flight or free; not the one handed out by ``take``
        until it is marked ``busy``)."""
        return sum(b.numel() for b in self._free) + sum(b.numel() for b, _ in self._flight)

    def take(self, nbytes: int) -> torch.Tensor:
        while self._flight and (len(self._flight) >= self.slots or not self._fits(nbytes)):
            self._retire()
        fitting = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
        if fitting:
            return self._free.pop(min(fitting, key=lambda i: self._free[i].numel()))
        self._free.sort(key=torch.Tensor.numel)
        while self._free and self.held + max(nbytes, HUGE_PAGE) > self.budget:
            self._free.pop()  # the biggest first
        # at least one huge page, so the buffer is a mapping of its own: page-aligned, as O_DIRECT needs
        return torch.frombuffer(staging_buffer(max(nbytes, HUGE_PAGE)), dtype=torch.uint8)

    def busy(self, buffer: torch.Tensor, future: Future) -> None:
        self._flight.append((buffer, future))

    def drain(self) -> None:
        while self._flight:
            self._retire()

    def _fits(self, nbytes: int) -> bool:
        """Whether ``nbytes`` can be had within the budget: from a free buffer, or beside the in-flight ones."""
        in_flight = sum(b.numel() for b, _ in self._flight)
        return any(b.numel() >= nbytes for b in self._free) or in_flight + max(nbytes, HUGE_PAGE) <= self.budget

    def _retire(self) -> None:
        buffer, future = self._flight.popleft()
        try:
            future.result()
        finally:
            self._free.append(buffer)
