"""Staging for async saves: copies of this rank's cells in host memory that is reused across saves.

An async save may return only once the caller can mutate its tensors, so every value it writes must first
be copied somewhere the caller does not touch. Fresh memory is slow here (the VM hands freed pages back,
so touching new pages costs ~5-20x a copy into touched ones on a 2-core VM) and pinning host memory
for CUDA copies costs ~0.6 s per GiB, so the copies go into a per-process ``StagingPool`` whose buffers
are allocated once and reused by every later save of the same size (pinned ones for CUDA tensors).

Memory is bounded by ``max_staging_bytes``: the cells are cut into consecutive waves (``plan_waves``,
pure) staged alternately into two buffers of at most half the budget each, the caller staging the next
wave while a background writer encodes and writes the previous one (``WaveHandoff``), so staging
overlaps writing. Without a budget, or when everything fits, all cells are one wave in one buffer.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Iterator, Sequence

import torch

from shardstore.errors import StagingAbortedError
from shardstore.buffers import staging_buffer
from shardstore.cell_writer import cell_values
from shardstore.inputs import local_tensor
from shardstore.plan import WriteTask

__all__ = [
    "StagingPool", "staging_pool", "plan_waves", "slot_sizes", "waves_stay_staged", "cell_nbytes", "staged_pinned",
    "stage_waves", "WaveHandoff",
]

_ALIGN = 64  # every staged cell starts at a multiple of this (any dtype may view it)
_SLOTS = 2  # buffers the waves alternate between: one being staged while the other is written


class StagingPool:
    """Host buffers kept for the life of the process, one per (slot, pinned) pair: a save that fits in
    what an earlier one used allocates nothing; a bigger one replaces the slot's buffer (the old one is
    dropped first, so the pool never holds more than the biggest save needed). ``reserve`` may run on
    another thread than the saves: a lock keeps one buffer per slot."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, bool], torch.Tensor] = {}
        self._lock = threading.Lock()

    def buffer(self, slot: int, nbytes: int, pinned: bool, touch: bool = False) -> torch.Tensor:
        """At least ``nbytes`` of slot ``slot`` as a flat uint8 tensor (pinned: page-locked, for CUDA).
        ``touch`` writes every page of a newly allocated buffer, so the kernel faults it in now."""
        key = (slot, pinned)
        with self._lock:
            held = self._buffers.get(key)
            if held is None or held.numel() < nbytes:
                self._buffers.pop(key, None)
                held = self._buffers[key] = _allocate(nbytes, pinned)
                if touch:
                    held.fill_(0)
            return held

    def reserve(self, sizes: Sequence[int], pinned: bool) -> None:
        """Give slot ``i`` at least ``sizes[i]`` bytes, faulted in: the first save that needs no more
        then copies into memory already touched, which on a fresh process is most of its stall."""
        for slot, nbytes in enumerate(sizes):
            self.buffer(slot, nbytes, pinned, touch=True)

    def nbytes(self) -> int:
        """Host memory the pool holds."""
        with self._lock:
            return sum(b.numel() for b in self._buffers.values())


def _allocate(nbytes: int, pinned: bool) -> torch.Tensor:
    """A pool buffer. Not on huge pages: the CPU fills it (cells are encoded from it, never written
    with ``O_DIRECT``), and a first async save of 1 GiB blocked its caller 1.0-1.2 s filling fresh
    huge pages against 0.5 s on 4 KiB pages."""
    if pinned:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return torch.frombuffer(staging_buffer(max(nbytes, 1), huge_pages=False), dtype=torch.uint8)


_pool: tuple[int, StagingPool] | None = None


def staging_pool() -> StagingPool:
    """This process's pool (a forked child gets a pool of its own)."""
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        _pool = (os.getpid(), StagingPool())
    return _pool[1]


def cell_nbytes(task: WriteTask, itemsize: int) -> int:
    """Bytes a staged cell takes, rounded up to the alignment of the next one."""
    return -(-math.prod(task.cell_box.sizes) * itemsize // _ALIGN) * _ALIGN


def plan_waves(sizes: Sequence[int], budget: int | None) -> list[range]:
    """Consecutive cells (by their staged sizes) grouped into waves: one wave when there is no budget or
    everything fits in it, else waves of at most ``budget // 2`` bytes each (a bigger cell alone), so two
    waves in flight stay within the budget."""
    if budget is None or sum(sizes) <= budget:
        return [range(len(sizes))] if sizes else []
    waves, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > budget // 2:
            waves.append(range(start, i))
            start, total = i, 0
        total += size
    return waves + [range(start, len(sizes))]


def slot_sizes(sizes: Sequence[int], waves: Sequence[range]) -> list[int]:
    """Bytes each pool slot needs for these waves (wave ``i`` is staged into slot ``i % 2``)."""
    need = [0] * min(len(waves), _SLOTS)
    for i, wave in enumerate(waves):
        need[i % _SLOTS] = max(need[i % _SLOTS], sum(sizes[j] for j in wave))
    return need


def waves_stay_staged(waves: Sequence[range]) -> bool:
    """Whether every staged cell keeps its values until the save ends: no buffer is staged twice, so the
    writer may read cells ahead of the one it is writing."""
    return len(waves) <= _SLOTS


Cells = list[tuple[WriteTask, torch.Tensor]]  # staged cells: each write task with its copied values


class WaveHandoff:
    """Staged waves from the caller's thread to the background writer, and back the news that a wave was
    written (its buffer may be staged into again). ``close`` (the writer is done, or failed) releases a
    caller waiting for a buffer, so neither side waits for one that is gone."""

    def __init__(self, count: int) -> None:
        self._cond = threading.Condition()
        self._waves: list[Cells | BaseException | None] = []  # None: written
        self._count = count
        self._written = 0
        self._closed = False

    def put(self, wave: Cells | BaseException) -> None:
        with self._cond:
            self._waves.append(wave)
            self._cond.notify_all()

    def wait_first(self) -> None:
        """Wait until the first wave (or the failure that stopped staging) was handed in; at once when
        there are no waves."""
        with self._cond:
            self._cond.wait_for(lambda: self._waves or not self._count)

    def wait_written(self, count: int) -> bool:
        """Wait until ``count`` waves were written; False when the writer stopped first."""
        with self._cond:
            self._cond.wait_for(lambda: self._written >= count or self._closed)
            return self._written >= count

    def cells(self) -> Iterator[tuple[WriteTask, torch.Tensor]]:
        """The writer's side: every staged cell in order. A wave counts as written once the cell after it
        is asked for (``write_cells`` has copied each cell out by then)."""
        for i in range(self._count):
            with self._cond:
                self._cond.wait_for(lambda: len(self._waves) > i)
                wave = self._waves[i]
            if isinstance(wave, BaseException):
                raise StagingAbortedError(f"staging this rank's tensors failed: {wave!r}; nothing was committed") from wave
            yield from wave
            with self._cond:
                self._waves[i], self._written = None, i + 1
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def staged_pinned(tasks: Sequence[WriteTask], tensors: dict) -> bool:
    """Whether these cells are staged in pinned memory: any of them is on a CUDA device."""
    return any(local_tensor(t.key, tensors[t.key]).is_cuda for t in tasks)


def stage_waves(tasks: Sequence[WriteTask], tensors: dict, waves: list[range], handoff: WaveHandoff,
                pool: StagingPool) -> None:
    """Copy every cell into the pool, wave by wave, handing each wave to the writer; returns once all
    are copied (the caller may then mutate its tensors) or the writer stopped. A failure is handed to the
    writer (which raises it on every rank) rather than raised here; an interrupt is raised here too."""
    try:
        pinned = staged_pinned(tasks, tensors)
        for i, wave in enumerate(waves):
            if i >= _SLOTS and not handoff.wait_written(i - _SLOTS + 1):
                return
            handoff.put(_stage_wave([tasks[j] for j in wave], tensors, pool, i % _SLOTS, pinned))
    except BaseException as exc:  # noqa: BLE001 - raised by the writer, on every rank
        handoff.put(exc)  # the writer never waits for a wave that will not come
        if not isinstance(exc, Exception):
            raise  # an interrupt stops the caller too


def _stage_wave(tasks: list[WriteTask], tensors: dict, pool: StagingPool, slot: int, pinned: bool) -> Cells:
    values = [cell_values(local_tensor(t.key, tensors[t.key]), t) for t in tasks]
    sizes = [cell_nbytes(t, v.element_size()) for t, v in zip(tasks, values)]
    memory = pool.buffer(slot, sum(sizes), pinned)
    cells, offset = [], 0
    for task, value, size in zip(tasks, values, sizes):
        staged = memory[offset : offset + value.numel() * value.element_size()].view(value.dtype).view(value.shape)
        staged.copy_(value, non_blocking=value.is_cuda)
        cells.append((task, staged))
        offset += size
    if any(v.is_cuda for v in values):
        torch.cuda.synchronize()  # the writer reads these bytes on another thread
    return cells
