"""The only module of ``shardstore`` that talks to ``torch.distributed``.

A save or load is a sequence of steps that every rank runs; between steps the ranks agree. ``agree``
is the heart of it: each rank reports success or its error, and if any rank failed, every rank raises
the same error naming the failing ranks, so nobody waits forever for a peer that already gave up.
Without an initialised process group (one process, no ``torch.distributed``), every call is local.

An async save runs its write and commit steps on a background thread while the training job issues its
own collectives on the same ranks; two threads issuing collectives on one group could interleave them
(each rank matching another thread's call). ``Coordinator.background`` therefore talks over a gloo group
of its own with the same ranks, created once per process group and reused, as torch DCP's ``async_save``
does.
"""

from __future__ import annotations

import os
import traceback
from typing import Any, Callable, TypeVar

import torch.distributed as dist

from shardstore.errors import ShardstoreError

__all__ = ["Coordinator", "RemoteRankError"]

T = TypeVar("T")

_background_groups: dict[tuple[int, ...], Any] = {}  # global ranks of a process group -> their background gloo group


class RemoteRankError(ShardstoreError, RuntimeError):
    """Another rank failed during a collective step; this rank stops too."""


class Coordinator:
    """Collective helpers over one process group (or none)."""

    def __init__(self, process_group=None) -> None:
        self.active = dist.is_available() and dist.is_initialized()
        self.group = process_group
        self.rank = dist.get_rank(process_group) if self.active else 0
        self.world_size = dist.get_world_size(process_group) if self.active else 1

    @property
    def ranks_on_this_host(self) -> int:
        """``LOCAL_WORLD_SIZE`` where the launcher (torchrun) sets it, else every rank of the group: the
        guess that never counts a busy core as spare."""
        try:
            return max(1, int(os.environ["LOCAL_WORLD_SIZE"]))
        except (KeyError, ValueError):
            return self.world_size

    def background(self) -> "Coordinator":
        """A coordinator over the same ranks, in the same order, on a gloo group used only by background
        saves (collective the first time for a set of ranks: every rank of the group must call). One per
        set of ranks, however the group is passed (None, the world group, a mesh's group)."""
        if not self.active:
            return self
        ranks = tuple(dist.get_process_group_ranks(self.group if self.group is not None else dist.group.WORLD))
        if ranks not in _background_groups:
            _background_groups[ranks] = _new_background_group(self.group)
        return Coordinator(_background_groups[ranks])

    def _global(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank) if self.group is not None else group_rank

    def all_gather(self, obj: Any) -> list:
        if not self.active:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self._global(0), group=self.group)
        return box[0]

    def agree(self, step: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` here; raise everywhere if it raised on any rank (the local error itself here)."""
        try:
            result, error = fn(), None
        except Exception as exc:  # noqa: BLE001 - reported to every rank below
            result, error = None, exc
        reports = self.all_gather(None if error is None else _describe(error))
        if error is not None:
            raise error
        failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
        if failed:
            detail = "\n".join(f"  rank {r}: {msg}" for r, msg in failed)
            raise RemoteRankError(f"{step} failed on rank(s) {[r for r, _ in failed]}:\n{detail}")
        return result

    def decide(self, step: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand its result (or its error) to every rank."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                error = exc
        result, message = self.broadcast((result, None if error is None else _describe(error)))
        if error is not None:
            raise error
        if message is not None:
            raise RemoteRankError(f"{step} failed on rank 0: {message}")
        return result


def _new_background_group(group):
    ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    # Over the whole world every rank calls, so the group takes torch's next sequential name; a group of
    # some ranks only is named by its ranks, which another group over the same ranks (a flattened mesh)
    # would share, waiting forever on its rendezvous keys, so only a sub-group takes that risk.
    local = len(ranks) < dist.get_world_size()
    background = dist.new_group(ranks, backend="gloo", use_local_synchronization=local)
    if dist.get_process_group_ranks(background) != ranks:  # new_group orders by global rank
        raise ValueError(
            f"the process group's ranks {ranks} are not in increasing global order, so no background group "
            "can keep their order; pass a process group whose group ranks follow the global ranks"
        )
    return background


def _describe(error: BaseException) -> str:
    last = traceback.extract_tb(error.__traceback__)[-1:] if error.__traceback__ else []
    where = f" (at {last[0].filename}:{last[0].lineno})" if last else ""
    return f"{type(error).__name__}: {error}{where}"
