"""Tied targets: state dict entries that are one tensor (tied input and output embeddings).

A load writes such a tensor once per key, so if the checkpoint holds different values under those keys,
whichever is copied last would silently win. Instead each key of a tie is filled into scratch memory of
its own; only when all of them agree is the shared tensor written (once), otherwise the load is refused
naming the keys. (Targets sharing some elements but not all are refused up front: ``inputs``.)
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch

from shardstore.errors import StateDictMismatchError
from shardstore.placing import copy_into
from shardstore.flatten import KeyPath, fqn

__all__ = ["Destinations"]

Tie = tuple[KeyPath, ...]


@dataclass(frozen=True)
class Destinations:
    """Where this rank's verified chunks go: its targets, tied ones replaced by scratch memory."""

    targets: Mapping[KeyPath, torch.Tensor]
    ties: tuple[Tie, ...]
    scratch: Mapping[KeyPath, torch.Tensor]

    @classmethod
    def of(cls, targets: Mapping[KeyPath, torch.Tensor], loaded: Collection[KeyPath]) -> "Destinations":
        """For ``targets`` (local tensors), of which the keys ``loaded`` receive data."""
        ties = _ties(targets, loaded)
        scratch = {k: torch.empty(targets[k].shape, dtype=targets[k].dtype, device=targets[k].device) for t in ties for k in t}
        return cls(targets, ties, scratch)

    def by_key(self) -> dict[KeyPath, list[torch.Tensor]]:
        """What ``placing.place`` copies into, per key."""
        return {k: [self.scratch.get(k, t)] for k, t in self.targets.items()}

    def check_ties(self) -> None:
        """Refuse, before writing any tied tensor, a tie whose keys the checkpoint gives different values
        (bit for bit); call once the scratch memory is filled."""
        for first, *rest in self.ties:
            for other in rest:
                if not torch.equal(_bits(self.scratch[first]), _bits(self.scratch[other])):
                    raise StateDictMismatchError(
                        f"state dict entries {fqn(first)!r} and {fqn(other)!r} are one tensor (tied), but the "
                        "checkpoint holds different values for them, so either would silently win. Untie them "
                        "before loading (e.g. t.clone() for one), or leave one key out (strict=False) and tie "
                        "them again afterwards"
                    )

    def write_ties(self, written: dict[str, None]) -> None:
        """Write each tied tensor once, from its checked scratch copy."""
        for tie in self.ties:
            copy_into(self.targets[tie[0]], self.scratch[tie[0]])
            written.update(dict.fromkeys(fqn(k) for k in tie))


def _ties(targets: Mapping[KeyPath, torch.Tensor], loaded: Collection[KeyPath]) -> tuple[Tie, ...]:
    """Groups of keys among ``loaded`` whose targets are one view of one memory."""
    groups: dict[tuple, list[KeyPath]] = {}
    for key in (k for k in targets if k in loaded and targets[k].numel()):
        t = targets[key]
        groups.setdefault(view_identity(t), []).append(key)
    return tuple(tuple(keys) for keys in groups.values() if len(keys) > 1)


def view_identity(t: torch.Tensor) -> tuple:
    """What makes two tensors one view of one memory: where it starts, its layout and how it reads
    (``w`` and ``w.conj()`` share memory but read other values: they are not tied, they overlap)."""
    return t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.is_conj(), t.is_neg()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)
