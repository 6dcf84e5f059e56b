"""The encode ring: reused buffers bounded in bytes, writes retired oldest first."""

from __future__ import annotations

import os
from concurrent.futures import Future

import pytest

from shardstore.buffers import HUGE_PAGE, EncodeRing

MIB = 1 << 20


def _done(error: Exception | None = None) -> Future:
    future: Future = Future()
    future.set_exception(error) if error else future.set_result(None)
    return future


def test_a_retired_buffer_is_reused_for_an_object_that_fits():
    ring = EncodeRing(budget=16 * MIB, slots=4)
    first = ring.take(3 * MIB)
    ring.busy(first, _done())
    ring.drain()
    again = ring.take(2 * MIB)
    ring.busy(again, _done())
    assert again.data_ptr() == first.data_ptr() and ring.held == first.numel()


def test_buffers_held_never_exceed_the_budget_with_many_objects():
    ring = EncodeRing(budget=8 * MIB, slots=6)
    peak = 0
    for size in [3 * MIB, 5 * MIB, 2 * MIB, 4 * MIB, 3 * MIB, 1 * MIB, 6 * MIB] * 3:
        buffer = ring.take(size)
        assert buffer.numel() >= size
        ring.busy(buffer, _done())
        peak = max(peak, ring.held)
    assert peak <= 8 * MIB


def test_an_object_bigger_than_the_budget_gets_its_size_once_and_nothing_else_is_kept():
    ring = EncodeRing(budget=4 * MIB, slots=6)
    ring.busy(ring.take(2 * MIB), _done())
    big = ring.take(10 * MIB)
    assert big.numel() >= 10 * MIB and ring.held == 0  # the free 2 MiB buffer was dropped for it
    ring.busy(big, _done())
    assert ring.held == big.numel()


def test_no_more_than_slots_writes_are_in_flight():
    ring = EncodeRing(budget=64 * MIB, slots=2)
    pending = [Future() for _ in range(3)]
    ring.busy(ring.take(MIB), pending[0])
    ring.busy(ring.take(MIB), pending[1])
    pending[0].set_result(None)  # the oldest finishes: take retires it instead of waiting on the newest
    ring.take(MIB)
    assert len(ring._flight) == 1 and ring._flight[0][1] is pending[1]


def test_small_buffers_are_page_aligned_mappings_for_o_direct():
    buffer = EncodeRing(budget=16 * MIB, slots=2).take(1000)
    assert buffer.numel() >= HUGE_PAGE and buffer.data_ptr() % 4096 == 0


def test_a_failed_write_raises_from_drain():
    ring = EncodeRing(budget=16 * MIB, slots=2)
    ring.busy(ring.take(MIB), _done(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        ring.drain()


def _vm_flags(address: int) -> list[str]:
    """The kernel's VmFlags of the mapping holding ``address`` (Linux /proc/self/smaps)."""
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux /proc only")
def test_huge_pages_are_asked_for_only_where_o_direct_uses_the_memory():
    """Encode buffers (written with O_DIRECT) ask for huge pages; async staging memory (filled by the
    CPU only) does not: fresh huge pages filled at half the speed of 4 KiB ones."""
    import torch

    from shardstore.staging import StagingPool

    ring = EncodeRing(budget=16 * MIB, slots=2)
    encode = ring.take(3 * MIB)
    staged = StagingPool().buffer(0, 3 * MIB, pinned=False)
    assert "hg" in _vm_flags(encode.data_ptr())
    assert "hg" not in _vm_flags(staged.data_ptr()) and staged.dtype == torch.uint8
