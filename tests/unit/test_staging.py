"""Staging for async saves, in one process: waves within the budget, buffers reused, the hand-off between
the caller and the writer (neither waits for a side that stopped)."""

from __future__ import annotations

import ctypes
import mmap
import threading

import pytest
import torch

from shardstore.errors import StagingAbortedError
from shardstore.staging import StagingPool, WaveHandoff, plan_waves, slot_sizes, waves_stay_staged


def test_without_a_budget_or_within_it_every_cell_is_one_wave():
    assert plan_waves([64, 128, 64], None) == [range(0, 3)]
    assert plan_waves([64, 128, 64], 256) == [range(0, 3)]
    assert plan_waves([], 10) == []


def test_above_the_budget_waves_take_at_most_half_of_it_and_a_bigger_cell_goes_alone():
    waves = plan_waves([64] * 10, 256)
    assert waves == [range(0, 2), range(2, 4), range(4, 6), range(6, 8), range(8, 10)]
    assert plan_waves([64, 512, 64, 64], 256) == [range(0, 1), range(1, 2), range(2, 4)]


def test_cells_stay_staged_until_the_save_ends_only_when_no_buffer_is_staged_twice():
    assert waves_stay_staged(plan_waves([64] * 4, None)) and waves_stay_staged(plan_waves([64] * 4, 256))
    assert not waves_stay_staged(plan_waves([64] * 6, 256))  # three waves: the third reuses the first's buffer


def test_the_pool_reuses_a_buffer_big_enough_and_replaces_a_small_one():
    pool = StagingPool()
    first = pool.buffer(0, 4 << 20, pinned=False)
    assert pool.buffer(0, 1 << 20, pinned=False).data_ptr() == first.data_ptr()
    assert pool.buffer(0, 4 << 20, pinned=False).data_ptr() == first.data_ptr()
    pool.buffer(1, 100, pinned=False)
    assert pool.nbytes() == (4 << 20) + 100
    pool.buffer(0, 8 << 20, pinned=False)  # grows: the old buffer is dropped, not kept beside it
    assert pool.nbytes() == (8 << 20) + 100


def test_slot_sizes_are_the_biggest_wave_staged_into_each_slot():
    sizes = [64, 64, 256, 64, 128, 64]
    assert slot_sizes(sizes, plan_waves(sizes, None)) == [640]
    assert plan_waves(sizes, 256) == [range(0, 2), range(2, 3), range(3, 4), range(4, 5), range(5, 6)]
    assert slot_sizes(sizes, plan_waves(sizes, 256)) == [128, 256]  # waves 0, 2, 4 / waves 1, 3
    assert slot_sizes([], plan_waves([], None)) == []


def _resident_pages(buffer: torch.Tensor) -> int:
    """Pages of ``buffer`` that the kernel has faulted in (mincore through the buffer's own mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pages = -(-buffer.numel() // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    assert libc.mincore(ctypes.c_void_p(buffer.data_ptr()), ctypes.c_size_t(buffer.numel()), vec) == 0
    return sum(v & 1 for v in vec)


def test_reserve_faults_every_slot_in_and_the_saves_then_use_those_buffers():
    pool = StagingPool()
    pool.reserve([8 << 20, 4 << 20], pinned=False)
    reserved = [pool.buffer(0, 8 << 20, False), pool.buffer(1, 4 << 20, False)]
    assert [_resident_pages(b) for b in reserved] == [(8 << 20) // mmap.PAGESIZE, (4 << 20) // mmap.PAGESIZE]
    assert pool.buffer(0, 1 << 20, False).data_ptr() == reserved[0].data_ptr() and pool.nbytes() == 12 << 20
    untouched = StagingPool().buffer(0, 8 << 20, False)  # an ordinary allocation is faulted in by its first copy
    assert _resident_pages(untouched) < (8 << 20) // mmap.PAGESIZE


def _cell(value: float) -> list:
    return [("task", torch.tensor([value]))]


def test_the_writer_takes_waves_in_order_and_reports_each_written():
    handoff = WaveHandoff(3)
    taken = []

    def writer():
        for task, value in handoff.cells():
            taken.append(value.item())
        handoff.close()

    thread = threading.Thread(target=writer)
    thread.start()
    for i in range(3):
        handoff.put(_cell(float(i)))
        if i >= 1:
            assert handoff.wait_written(i)  # wave i-1 is written once wave i is staged
    thread.join(10)
    assert taken == [0.0, 1.0, 2.0]


def test_a_caller_waiting_for_a_buffer_is_released_when_the_writer_stops():
    handoff = WaveHandoff(3)
    handoff.put(_cell(0.0))
    threading.Timer(0.1, handoff.close).start()  # the writer failed before writing anything
    assert handoff.wait_written(1) is False


def test_a_staging_failure_stops_the_writer_with_it():
    handoff = WaveHandoff(2)
    handoff.put(_cell(0.0))
    handoff.put(RuntimeError("CUDA error: an illegal memory access"))
    cells = handoff.cells()
    assert next(cells)[1].item() == 0.0
    with pytest.raises(StagingAbortedError, match="staging this rank's tensors failed: RuntimeError"):
        next(cells)
