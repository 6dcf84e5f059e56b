"""The encode slab: one slab, regions lowest first, bounded in bytes, kept between saves."""

from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import Future

import pytest

from shardstore import buffers
from shardstore.buffers import EncodeSlab

MIB = 1 << 20


def _done(error: Exception | None = None) -> Future:
    future: Future = Future()
    future.set_exception(error) if error else future.set_result(None)
    return future


@pytest.fixture(autouse=True)
def _no_kept_slab(monkeypatch):
    """Each test starts without a slab kept by an earlier slab of this process."""
    monkeypatch.setattr(buffers, "_kept", (0, None))


def test_regions_are_carved_from_one_slab_and_reused_once_written():
    slab = EncodeSlab(budget=16 * MIB, slots=4)
    writes = [Future(), Future()]
    first = slab.take(3 * MIB)
    slab.busy(first, writes[0])
    second = slab.take(MIB)
    assert second.data_ptr() == first.data_ptr() + 3 * MIB  # after the region in flight
    slab.busy(second, writes[1])
    writes[0].set_result(None)
    again = slab.take(2 * MIB)
    assert again.data_ptr() == first.data_ptr() and slab.held == 16 * MIB  # the first write ended: its bytes


def test_a_fresh_slab_is_used_only_as_far_as_the_writes_in_flight_need():
    """Going round a fresh slab in order faults it all in: the lowest free bytes are used first."""
    slab = EncodeSlab(budget=64 * MIB, slots=6)
    base, highest, writes = None, 0, []
    for _ in range(200):
        region = slab.take(MIB)
        base = region.data_ptr() if base is None else base
        highest = max(highest, region.data_ptr() - base + MIB)
        writes.append(Future())
        slab.busy(region, writes[-1])
        if len(writes) >= 3:
            writes[-3].set_result(None)  # about three writes in flight at a time
    assert highest <= 3 * MIB


class _EndsWhenWaitedFor(Future):
    """A write that may end at any time, and has ended once the slab waits for it."""

    def result(self, timeout=None):
        if not self.done():
            self.set_result(None)
        return super().result(timeout)


def test_regions_in_flight_never_overlap_and_the_slab_stays_within_the_budget():
    rng = random.Random(0)
    slab = EncodeSlab(budget=8 * MIB, slots=6)
    pending: list[tuple[int, int, Future]] = []
    for _ in range(500):
        size = rng.choice([1000, 4096, 5000, MIB, 3 * MIB + 7, 6 * MIB])
        region = slab.take(size)
        start = region.data_ptr()
        assert region.numel() >= size and start % 4096 == 0
        pending = [(a, b, f) for a, b, f in pending if not f.done()]  # ended writes free their region
        assert all(start + size <= a or b <= start for a, b, _ in pending), "a region still being written was handed out"
        future = _EndsWhenWaitedFor()
        slab.busy(region, future)
        pending.append((start, start + size, future))
        for _, _, f in pending:  # other writes end in any order
            if rng.random() < 0.3 and not f.done():
                f.set_result(None)
        assert slab.held == 8 * MIB and len(slab._flight) <= 6
    slab.drain()


def test_an_object_bigger_than_the_budget_waits_for_every_write_and_gets_a_slab_of_its_size():
    slab = EncodeSlab(budget=4 * MIB, slots=6)
    slab.busy(slab.take(2 * MIB), _done())
    big = slab.take(10 * MIB)
    assert big.numel() >= 10 * MIB and not slab._flight and slab.held == 10 * MIB
    slab.busy(big, _done())
    assert slab.take(MIB).data_ptr() == big.data_ptr()  # the big slab serves the small ones after it


def test_no_more_than_slots_writes_are_in_flight():
    slab = EncodeSlab(budget=64 * MIB, slots=2)
    pending = [Future() for _ in range(3)]
    slab.busy(slab.take(MIB), pending[0])
    slab.busy(slab.take(MIB), pending[1])
    pending[0].set_result(None)  # the oldest finishes: take retires it instead of waiting on the newest
    slab.take(MIB)
    assert len(slab._flight) == 1 and slab._flight[0][2] is pending[1]


def test_small_regions_are_page_aligned_for_o_direct():
    slab = EncodeSlab(budget=16 * MIB, slots=4)
    first = slab.take(1000)
    slab.busy(first, Future())
    second = slab.take(1000)
    assert first.data_ptr() % 4096 == 0 and second.data_ptr() == first.data_ptr() + 4096


def test_a_failed_write_raises_from_drain():
    slab = EncodeSlab(budget=16 * MIB, slots=2)
    slab.busy(slab.take(MIB), _done(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        slab.drain()


def test_a_failed_write_that_ended_behind_a_running_one_raises_from_the_next_take():
    slab = EncodeSlab(budget=16 * MIB, slots=4)
    slab.busy(slab.take(MIB), Future())  # still running
    slab.busy(slab.take(MIB), _done(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        slab.take(MIB)


def test_the_next_ring_of_the_process_encodes_into_the_slab_a_closed_one_kept():
    slab = EncodeSlab(budget=8 * MIB, slots=2, kept=True)
    first = slab.take(MIB)
    slab.busy(first, _done())
    slab.close()
    assert EncodeSlab(budget=8 * MIB, slots=2, kept=True).take(MIB).data_ptr() == first.data_ptr()
    assert EncodeSlab(budget=8 * MIB, slots=2, kept=True).take(MIB).data_ptr() != first.data_ptr()  # one slab at a time


def test_a_slab_is_not_kept_while_a_write_from_it_may_still_run_nor_when_huge(monkeypatch):
    slab = EncodeSlab(budget=8 * MIB, slots=2, kept=True)
    slab.busy(slab.take(MIB), Future())  # never finishes (an interrupted save)
    slab.close()
    assert buffers._kept[1] is None
    monkeypatch.setattr(buffers, "KEEP_LIMIT", 8 * MIB)
    slab = EncodeSlab(budget=8 * MIB, slots=2, kept=True)
    slab.busy(slab.take(12 * MIB), _done())
    slab.close()
    assert buffers._kept[1] is None


def test_writes_from_outside_the_slab_count_toward_its_slots_and_hold_no_region():
    slab = EncodeSlab(budget=4 * MIB, slots=3)
    slab.busy(slab.take(MIB), _done())  # maps the slab
    pending = [Future(), Future()]
    for future in pending:  # e.g. small tensors written from their own memory
        slab.wait_for_slot()
        slab.busy(None, future)
    whole = slab.take(4 * MIB)  # all of the slab is free: the two writes hold none of it
    slab.busy(whole, Future())
    threading.Timer(0.2, pending[0].set_result, [None]).start()
    slab.wait_for_slot()  # three in flight: waits for the oldest
    assert pending[0].done() and not pending[1].done()


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


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux only")
def test_a_fresh_slab_is_faulted_in_just_ahead_of_the_encoder():
    """A process's first save finds its slab's pages there: a thread faults them in, lowest first, at
    most ``_FAULT_AHEAD`` past the furthest byte handed out (only where asked: where a core is spare)."""
    slab, alone = EncodeSlab(128 * MIB, slots=2, fault_ahead=True), EncodeSlab(128 * MIB, slots=2)
    kept, lone = slab.take(MIB), alone.take(MIB)  # nothing written into either
    resident = lambda: _settled(lambda: _resident_bytes(kept.data_ptr(), 128 * MIB))  # noqa: E731
    assert MIB + buffers._FAULT_AHEAD <= resident() <= MIB + buffers._FAULT_AHEAD + buffers.HUGE_PAGE
    slab.busy(kept, _done())
    slab.take(64 * MIB)  # the lowest free stretch: from 0
    assert resident() == 64 * MIB + buffers._FAULT_AHEAD  # huge pages: faulted in 2 MiB at a time
    assert _resident_bytes(lone.data_ptr(), 128 * MIB) == 0
    slab.close()
    assert _settled(lambda: sum(t.name == "shardstore-fault-in" for t in threading.enumerate())) == 0


def _settled(measure, seconds: float = 20.0):
    """``measure()`` once it gives the same value twice 0.2 s apart."""
    deadline, last = time.monotonic() + seconds, None
    while time.monotonic() < deadline:
        value = measure()
        if value == last:
            return value
        last = value
        time.sleep(0.2)
    return last


def _resident_bytes(address: int, nbytes: int) -> int:
    """Bytes of ``[address, address + nbytes)`` in memory (``mincore``; the range is page-aligned)."""
    import ctypes
    import mmap

    import numpy as np

    pages = np.zeros(nbytes // mmap.PAGESIZE, dtype=np.uint8)
    mincore = ctypes.CDLL(None, use_errno=True).mincore
    assert mincore(ctypes.c_void_p(address), ctypes.c_size_t(nbytes), ctypes.c_void_p(pages.ctypes.data)) == 0
    return int((pages & 1).sum()) * mmap.PAGESIZE


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux /proc only")
def test_huge_pages_are_asked_for_only_where_o_direct_uses_the_memory():
    """Encode buffers (written with O_DIRECT) ask for huge pages; async staging memory (filled by the
    CPU only) does not: fresh huge pages filled at half the speed of 4 KiB ones."""
    import torch

    from shardstore.staging import StagingPool

    slab = EncodeSlab(budget=16 * MIB, slots=2)
    encode = slab.take(3 * MIB)
    staged = StagingPool().buffer(0, 3 * MIB, pinned=False)
    assert "hg" in _vm_flags(encode.data_ptr())
    assert "hg" not in _vm_flags(staged.data_ptr()) and staged.dtype == torch.uint8


def test_a_save_of_small_tensors_encodes_into_a_slab_of_a_few_objects(tmp_path):
    """A slab is touched all over as its regions go round: a save of small objects must not map (and
    fault in) the whole 256 MiB budget."""
    import torch

    import shardstore

    strided = {f"w{i}": torch.randn(1 << 14, 2)[:, 0] for i in range(40)}  # 64 KiB each, encoded: a copy
    shardstore.save(strided, str(tmp_path / "ck"))
    assert buffers._kept[1] is not None and buffers._kept[1].numel() <= 6 * (64 << 10) + 6 * 4096


def test_a_save_writes_small_tensors_from_their_own_memory(tmp_path, monkeypatch):
    """A small contiguous tensor's object is its own bytes and an index: written uncopied, no slab;
    a big one (O_DIRECT wants aligned memory) and a strided one are encoded into the slab."""
    import numpy as np
    import torch

    import shardstore
    from shardstore.storage.local import LocalStorage

    written, write = {}, LocalStorage.write

    def recording(self, key, data):
        written[key] = data
        return write(self, key, data)

    monkeypatch.setattr(LocalStorage, "write", recording)
    state = {}
    for i in range(4):  # interleaved: writes of both kinds in flight at once
        state |= {f"small{i}": torch.randn(1 << 14), f"big{i}": torch.randn(1 << 19), f"strided{i}": torch.randn(1 << 14, 2)[:, 0]}
    shardstore.save(state, str(tmp_path / "ck"))
    small = written["small0/c.0"]
    assert isinstance(small, list) and np.frombuffer(small[0], np.uint8).ctypes.data == state["small0"].data_ptr()
    assert all(isinstance(written[k], memoryview) for k in ("big0/c.0", "strided0/c.0"))
    assert buffers._kept[1] is not None  # the big and the strided ones
    loaded = {k: torch.zeros_like(v) for k, v in state.items()}
    shardstore.load(loaded, str(tmp_path / "ck"))
    assert all(torch.equal(loaded[k], v) for k, v in state.items())



@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_faulting_ahead_is_asked_for_only_where_a_core_is_spare(monkeypatch):
    from shardstore.coordinator import Coordinator
    from shardstore.workers import cores_per_rank, spare_core

    usable = len(os.sched_getaffinity(0))
    assert spare_core(usable - 1) == (usable > 1) and not spare_core(usable)
    assert cores_per_rank(1) == min(usable, 8) and cores_per_rank(usable) == 1 and cores_per_rank(usable + 1) == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert Coordinator(None).ranks_on_this_host == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # torchrun's count of ranks on this host
    assert Coordinator(None).ranks_on_this_host == 3


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux only")
def test_a_loads_fresh_scratch_is_faulted_in_whole():
    import torch

    from shardstore.buffers import fault_in, staging_buffer

    scratch, untouched = (torch.frombuffer(staging_buffer(16 * MIB), dtype=torch.uint8) for _ in range(2))
    fault_in(scratch)
    assert _settled(lambda: _resident_bytes(scratch.data_ptr(), 16 * MIB)) == 16 * MIB
    assert _resident_bytes(untouched.data_ptr(), 16 * MIB) == 0


def test_a_rank_with_cores_to_spare_encodes_a_big_object_on_several_threads(tmp_path, monkeypatch):
    """``encoders`` > 1: the inner chunks of a big object are gathered on that many threads, and the
    bytes written are those one thread writes; a small object stays on the caller's thread."""
    import threading
    import time

    import torch

    from shardstore import codec
    from shardstore.cell_writer import cells_of, write_cells
    from shardstore.coordinator import Coordinator
    from shardstore.saving import plan_save
    from shardstore.storage.local import LocalStorage

    gather, threads = codec._gather, set()

    def slow_gather(*args):
        threads.add(threading.get_ident())
        time.sleep(0.01)  # long enough that helpers take chunks while the caller gathers one
        gather(*args)

    monkeypatch.setattr(codec, "_gather", slow_gather)
    state = {"big": torch.randn(4096, 1024), "small": torch.randn(2048, 1024)}  # 16 and 8 MiB
    job = plan_save(Coordinator(None), state, None)
    assert all(len(list(a.inner_chunk_shape)) == 2 and a.inner_chunk_shape != a.chunk_shape for a in job.plan.arrays)
    objects = {}
    for encoders in (1, 3):
        storage = LocalStorage(str(tmp_path / f"encoders{encoders}"))
        for key in ("big", "small"):
            threads.clear()
            cells = [(task, data) for task, data in cells_of(job.plan, 0, job.tensors) if task.key == (key,)]
            write_cells(storage, job.plan, cells, encoders=encoders)
            spread = encoders > 1 and key == "big"
            assert len(threads) >= 2 if spread else threads == {threading.get_ident()}
        objects[encoders] = {k: storage.read(k) for k in storage.list("")}
    assert objects[1] == objects[3] and len(objects[1]) == 2
